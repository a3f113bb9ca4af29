"""MESM's text side (jaxprvr.text.glove / pos / mesm_tokenizer) against re-statements of the official code
(lntzm/MESM @ 8501bdea: dataset/tokenizer.py, dataset/base.py L53-92, runner.py L25-41, data/tokenized_count.py,
model/text_encoder.py L397-445), written below as plain Python loops.

NLTK's data are installed neither here nor in CI. A tiny ``PerceptronTagger(load=False)`` trained on a synthetic
tagged corpus (deterministic under ``random.seed``) stands in for the averaged-perceptron model and the references
reach it through the real ``nltk.pos_tag`` (``nltk.tag._get_tagger`` patched); Punkt is NLTK's own untrained
``PunktSentenceTokenizer`` (real Punkt code, no data) reached through the real ``nltk.word_tokenize``
(``nltk.tokenize.sent_tokenize`` patched). The CLIP reference BPE is OpenAI's simple_tokenizer.py
(tests/openai_clip.py), not ours. Every file is synthetic, written in the official formats.
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import string

import numpy as np
import pytest

from jaxprvr.errors import JaxprvrError
from jaxprvr.text import glove as G
from jaxprvr.text import pos as P
from jaxprvr.text.mesm_tokenizer import MESMTokenizer, MLMVocab

try:
    import nltk
except ImportError:  # a dependency (pyproject); without it the NLTK-facing tests skip
    nltk = None
needs_nltk = pytest.mark.skipif(nltk is None, reason="nltk is not installed")

DIM = 300

# ------------------------------------------------------------------------------------------------ tiny tagger

_LEX = {
    "DT": ["a", "the", "another"], "NN": ["person", "door", "man", "cup", "table", "woman", "dog", "kitchen"],
    "NNS": ["cups", "doors", "dishes"], "VBZ": ["opens", "holds", "takes", "walks", "puts", "cuts"],
    "VBG": ["walking", "holding", "cutting"], "RB": ["quickly", "then", "slowly"], "JJ": ["red", "small", "big"],
    "IN": ["in", "on", "into", "with"], "WRB": ["when", "where", "how"], "PRP": ["he", "she", "it"],
    "CC": ["and", "or"], ".": [".", "?"], ",": [","], "NNP": ["May", "Will"], "MD": ["may", "will"],
    "VB": ["open", "hold"],
}
_TEMPLATES = ["DT NN VBZ DT NN .", "DT JJ NN VBZ IN DT NN .", "PRP VBZ DT NNS RB .",
              "WRB DT NN VBZ , PRP VBZ DT NN .", "DT NN VBZ DT NN CC VBZ IN DT NN .", "PRP VBZ VBG IN DT JJ NN .",
              "WRB PRP VBZ , DT NN VBZ RB .", "NNP VBZ DT NN .", "PRP MD VB DT NN ."]


@pytest.fixture(scope="module")
def tiny_tagger():
    pytest.importorskip("nltk")
    from nltk.tag import PerceptronTagger

    state = random.getstate()
    random.seed(1234)
    sents = []
    for _ in range(300):
        sent = [(random.choice(_LEX[t]), t) for t in random.choice(_TEMPLATES).split()]
        if random.random() < 0.5:
            sent[0] = (sent[0][0].capitalize(), sent[0][1])
        sents.append(sent)
    tagger = PerceptronTagger(load=False)
    tagger.train(sents, nr_iter=4)
    random.setstate(state)
    assert [t for _, t in tagger.tag(["when", "the", "man", "walks"])] == ["WRB", "DT", "NN", "VBZ"]
    # case matters to it (MESM tags GloVe tokens before lowercasing them): May/NNP (weight 2), may/MD (1)
    assert [t for _, t in tagger.tag(["May", "opens", "the", "door"])][0] == "NNP"
    assert [t for _, t in tagger.tag(["he", "may", "open", "the", "door"])][1] == "MD"
    return tagger


PUNKT = None


@pytest.fixture
def nltk_env(monkeypatch, tiny_tagger):
    """nltk.pos_tag -> the tiny tagger; nltk.word_tokenize's sentence split -> an untrained Punkt model."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    punkt = PunktSentenceTokenizer()
    monkeypatch.setattr(nltk.tag, "_get_tagger", lambda lang=None: tiny_tagger)
    monkeypatch.setattr(nltk.tokenize, "sent_tokenize", lambda text, language="english": punkt.tokenize(text))
    return punkt


@pytest.fixture
def no_punkt(monkeypatch, tiny_tagger):
    """NLTK's tagger data 'installed' (the tiny tagger), Punkt's not."""
    def missing(text, language="english"):
        raise LookupError("Resource punkt_tab not found.")

    monkeypatch.setattr(nltk.tag, "_get_tagger", lambda lang=None: tiny_tagger)
    monkeypatch.setattr(nltk.tokenize, "sent_tokenize", missing)


# ------------------------------------------------------------------------------------------------ references

def ref_weights(tokens):
    """tokenizer.py L140-144 / L326-332."""
    weights = []
    for _, tag in nltk.pos_tag(tokens):
        if ("NN" in tag) or ("VB" in tag) or ("JJ" in tag) or ("RB" in tag):
            weights.append(2)
        else:
            weights.append(1)
    return weights


def ref_clip_id2label(path, vocab_size):
    """base.py load_CLIP_keep_vocab."""
    id2label = {}
    with open(path) as f:
        count = 0
        for line in f.readlines():
            id2label[int(line.split(" ")[0])] = count
            count += 1
            if count == vocab_size:
                break
    id2label["<unknown>"] = vocab_size
    id2label["<start>"] = vocab_size + 1
    id2label["<end>"] = vocab_size + 2
    return id2label


def ref_glove_id2label(path, vocab_size):
    """base.py load_GloVe_keep_vocab."""
    id2label = {}
    with open(path) as f:
        count = 0
        for line in f.readlines():
            id2label[int(line.split(" ")[1])] = count
            count += 1
            if count == vocab_size:
                break
    id2label["<unknown>"] = vocab_size
    return id2label


def ref_build_vocab(path):
    """runner.py build_vocab + tokenizer.py Vocabulary: wtoi."""
    words = set()
    with open(path) as f:
        for line in f.readlines():
            words.add(line.split(" ")[0])
    wtoi = {"<PAD>": 0, "<UNK>": 1}
    for i, w in enumerate(sorted(words)):
        wtoi[w] = i + 2
    return wtoi


def _rows(L, tokens, weights, unknowns, labels):
    ids = np.zeros(L, np.int64)
    w = np.zeros(L, np.int64)
    u = np.zeros(L, bool)
    lab = np.zeros(L, np.int64)
    ids[:len(tokens)] = tokens
    w[:len(tokens)] = weights
    u[:len(tokens)] = unknowns
    lab[:len(tokens)] = labels
    return dict(words_id=ids, words_weight=w, unknown_mask=u, words_label=lab, n_words=len(tokens))


def ref_clip(text, L, id2label, st, stmod, weigh=ref_weights):
    """CLIPTokenizer.encode + tokenize (recfw), words_id cut to max_words_l as model.py L114 does (``weigh``: the
    tagging step, nltk.pos_tag + the official rule by default)."""
    bpe_tokens, encoded = [], []
    text = stmod.whitespace_clean(stmod.basic_clean(text)).lower()
    for token in stmod.re.findall(st.pat, text):
        token = "".join(st.byte_encoder[b] for b in token.encode("utf-8"))
        for bpe_token in st.bpe(token).split(" "):
            bpe_tokens.append(bpe_token.replace("</w>", ""))
            encoded.append(st.encoder[bpe_token])
    weight = weigh(bpe_tokens)
    txt_token = encoded[:L - 2]
    weight = weight[:L - 2]
    tokens = [st.encoder["<|startoftext|>"]] + txt_token + [st.encoder["<|endoftext|>"]]
    weights = [0] + weight + [0]
    unknowns = [False] + [False if t in id2label else True for t in txt_token] + [False]
    labels = ([id2label["<start>"]] + [id2label[t] if t in id2label else id2label["<unknown>"] for t in txt_token]
              + [id2label["<end>"]])
    return _rows(L, tokens, weights, unknowns, labels)


def ref_nltk(text, L, wtoi, id2label):
    """NLTKTokenizer.encode + GloVeSimpleTokenizer.tokenize (recfw)."""
    txt_tokens, weights = [], []
    for word, tag in nltk.pos_tag(nltk.tokenize.word_tokenize(text)):
        word = word.lower()
        txt_tokens.append(wtoi.get(word, 1))
        weights.append(2 if ("NN" in tag) or ("VB" in tag) or ("JJ" in tag) or ("RB" in tag) else 1)
    txt_tokens = txt_tokens[:L]
    weights = weights[:L]
    unknowns = [False if t in id2label else True for t in txt_tokens]
    labels = [id2label[t] if t in id2label else id2label["<unknown>"] for t in txt_tokens]
    return _rows(L, txt_tokens, weights, unknowns, labels)


def ref_simple(text, L, wtoi, id2label):
    """GloVeSimpleTokenizer.split_words + encode + tokenize (recfw)."""
    translator = str.maketrans(string.punctuation, " " * len(string.punctuation))
    words = str(text).lower().translate(translator).strip().split()
    txt_tokens, weights = [], []
    for word, tag in nltk.pos_tag(words):
        txt_tokens.append(wtoi.get(word, 1))
        weights.append(2 if ("NN" in tag) or ("VB" in tag) or ("JJ" in tag) or ("RB" in tag) else 1)
    txt_tokens, weights = txt_tokens[:L], weights[:L]
    unknowns = [False if t in id2label else True for t in txt_tokens]
    labels = [id2label[t] if t in id2label else id2label["<unknown>"] for t in txt_tokens]
    return _rows(L, txt_tokens, weights, unknowns, labels)


def ref_pkl(text, L, vocab, vocab_size):
    """base.py load_GloVe_pkl_keep_vocab + NLTKTokenizerWithFeature (recfw)."""
    id2label = {}
    count = 0
    for w, _ in vocab["counter"].most_common(vocab_size):
        id2label[w] = count
        count += 1
    id2label["<unknown>"] = vocab_size
    words, weights = [], []
    for word, tag in nltk.pos_tag(nltk.tokenize.word_tokenize(text)):
        word = word.lower()
        if word in vocab["w2id"]:
            words.append(word)
            weights.append(2 if ("NN" in tag) or ("VB" in tag) or ("JJ" in tag) or ("RB" in tag) else 1)
    feats = [vocab["id2vec"][vocab["w2id"][w]].astype(np.float32) for w in words]
    words, feats, weights = words[:L], feats[:L], weights[:L]
    feats = np.stack(feats)
    result = np.zeros((L, feats.shape[-1]), np.float32)
    result[:len(feats)] = feats
    out = _rows(L, [0] * len(words), weights, [False if w in id2label else True for w in words],
                [id2label[w] if w in id2label else id2label["<unknown>"] for w in words])
    del out["words_id"]
    out["words_vec"] = result
    return out


def ref_glove_table(path, wtoi, unk):
    """text_encoder.py GloVe._load + GloveTextEncoder's row loop (with the <UNK> vector given)."""
    glove = {}
    with open(path, "r") as f:
        for line in f.readlines():
            split_line = line.split()
            word = " ".join(split_line[0: len(split_line) - DIM])
            glove[word] = np.array(split_line[-DIM:], dtype=np.float32)
    glove["<PAD>"] = np.zeros(DIM, np.float32)
    glove["<UNK>"] = unk
    weight = np.random.default_rng(99).standard_normal((len(wtoi), DIM)).astype(np.float32)  # nn.Embedding init
    for w in wtoi.keys():
        weight[wtoi[w], :] = glove[w] if w in glove else glove["<UNK>"]
    return weight


def assert_same(ours, ref):
    """Every key of the reference equal (NaN never equal); ``n_words`` too."""
    for k, v in ref.items():
        if k == "n_words":
            assert ours[k] == v, (k, ours[k], v)
            continue
        a = np.asarray(ours[k])
        assert a.shape == np.asarray(v).shape, (k, a.shape, np.asarray(v).shape)
        assert np.array_equal(a, np.asarray(v)), (k, a, v)


def assert_dtypes(out, L):
    key = "words_vec" if "words_vec" in out else "words_id"
    assert out[key].dtype == (np.float32 if key == "words_vec" else np.int32)
    assert out["words_weight"].dtype == np.float32 and out["words_weight"].shape == (L,)
    assert out["words_label"].dtype == np.int32 and out["unknown_mask"].dtype == bool
    assert isinstance(out["n_words"], int)


# ------------------------------------------------------------------------------------------------ synthetic files

CORPUS = ["A person opens the door.", "The person holds a red cup.", "When the man walks in, he takes a cup.",
          "She puts the cups on the table.", "a dog walks into the kitchen quickly", "The woman cuts the dishes."]

QUERIES = [
    "A person opens the door.",
    "When the man walks in, he takes the red cup quickly.",
    "The person's dog isn't walking slowly into the kitchen",  # 's and n't: NLTK tokens missing from the count file
    "she holds a zebra and a giraffe with an umbrella",  # OOV words
    "a person opens the door then walks in then holds the cup then puts it on the table slowly and quickly",  # long
    "How does the woman cut the dishes?",
    "May opens the door and she may hold the cup",  # case-dependent tags
]
CLIP_QUERIES = QUERIES + ["A man &amp;amp; a dog &lt;b&gt; café naïve — 😀 Ünïcode", "   ", "!!!? ,,, person"]


def write_clip_count(path, st, stmod, corpus, max_words_l=16):
    """data/tokenized_count.py count_CLIP_tokenizer on ``corpus``: ids between SOT and EOT, most frequent first."""
    counts = {}
    for s in corpus:
        ids = ref_clip_ids(s, st, stmod)[:max_words_l - 2]
        for t in ids:
            counts[t] = counts.get(t, 0) + 1
    with open(path, "w") as f:
        for k, v in sorted(counts.items(), key=lambda x: x[1], reverse=True):
            f.write(f"{k} {v}\n")


def ref_clip_ids(text, st, stmod):
    out = []
    text = stmod.whitespace_clean(stmod.basic_clean(text)).lower()
    for token in stmod.re.findall(st.pat, text):
        token = "".join(st.byte_encoder[b] for b in token.encode("utf-8"))
        out.extend(st.encoder[b] for b in st.bpe(token).split(" "))
    return out


def write_glove_count(path, corpus):
    """data/tokenized_count.py count_GloVe_tokenizer on ``corpus``."""
    translator = str.maketrans(string.punctuation, " " * len(string.punctuation))
    counts = {}
    for s in corpus:
        for w in str(s).lower().translate(translator).strip().split():
            counts[w] = counts.get(w, 0) + 1
    wtoi = {"<PAD>": 0, "<UNK>": 1}
    for i, w in enumerate(sorted(set(counts))):
        wtoi[w] = i + 2
    with open(path, "w") as f:
        for w, c in sorted(counts.items(), key=lambda x: x[1], reverse=True):
            f.write(f"{w} {wtoi[w]} {c}\n")


def _vec_line(key, rng):
    return key + " " + " ".join(f"{x:.5f}" for x in rng.standard_normal(DIM)) + "\n"


def write_glove_txt(path, words, missing=("kitchen",), seed=0):
    """A GloVe text file with the vocabulary words except ``missing``, a key with spaces, a repeated key (the later
    line wins), a '<UNK>' key (ignored officially: overwritten) and words outside the vocabulary."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write(_vec_line("zebra", rng))
        f.write(_vec_line("new york", rng))
        f.write(_vec_line("door", rng))  # repeated below
        for w in words:
            if w not in missing:
                f.write(_vec_line(w, rng))
        f.write(_vec_line("<UNK>", rng))
        f.write(_vec_line("doorway", rng))


@pytest.fixture(scope="module")
def openai():
    from tests.openai_clip import openai_clip_module

    mod = openai_clip_module("simple_tokenizer")
    return mod.SimpleTokenizer(), mod


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mesm_text")
    write_glove_count(d / "GloVe_tokenized_count.txt", CORPUS)
    words = [line.split(" ")[0] for line in (d / "GloVe_tokenized_count.txt").read_text().splitlines()]
    write_glove_txt(d / "glove.txt", words)
    rng = np.random.default_rng(5)
    pkl_words = words + ["'s", "n't", "giraffe"]
    pkl_words.remove("kitchen")
    counter = collections.Counter()
    for s in CORPUS + CORPUS[:2]:
        counter.update(w.lower() for w in s.replace(".", " ").replace(",", " ").split() if w.lower() in pkl_words)
    vocab = {"counter": counter, "w2id": {w: i for i, w in enumerate(pkl_words)},
             "id2vec": rng.standard_normal((len(pkl_words), DIM))}  # float64, cast to float32 by the reader
    with open(d / "glove.pkl", "wb") as f:
        pickle.dump(vocab, f)
    return d


@pytest.fixture(scope="module")
def clip_count(tmp_path_factory, openai):
    d = tmp_path_factory.mktemp("mesm_clip")
    write_clip_count(d / "CLIP_tokenized_count.txt", *openai, CORPUS)
    return d / "CLIP_tokenized_count.txt"


# ================================================================================================ CLIP

@pytest.mark.parametrize("L,vocab_size", [(16, 12), (8, 1000), (2, 5)])
def test_clip_encode_matches_official(nltk_env, openai, clip_count, L, vocab_size):
    st, stmod = openai
    id2label = ref_clip_id2label(clip_count, vocab_size)
    for tagger in (None, nltk.tag._get_tagger()):  # nltk.pos_tag itself, and the tagger injected
        tok = MESMTokenizer("CLIP", max_words_l=L, vocab_size=vocab_size, count_file=clip_count,
                            pos_tagger="nltk", nltk_tagger=tagger)
        assert tok.tagger.official == (tagger is None)
        assert tok.num_mlm_classes == vocab_size + 3
        for q in CLIP_QUERIES:
            out = tok.encode(q)
            assert_dtypes(out, L)
            assert_same(out, ref_clip(q, L, id2label, st, stmod))
    # the long query lost pieces, SOT/EOT frame the kept ones and carry weight 0
    out = tok.encode(QUERIES[4])
    assert out["n_words"] == L and out["words_id"][0] == 49406 and out["words_id"][L - 1] == 49407
    assert out["words_weight"][0] == 0 and out["words_weight"][L - 1] == 0


def test_clip_labels_cover_known_and_unknown(nltk_env, openai, clip_count):
    tok = MESMTokenizer("CLIP", max_words_l=16, vocab_size=6, count_file=clip_count, pos_tagger="nltk")
    out = tok.encode("a person opens the zebra")
    n = out["n_words"]
    assert out["words_label"][0] == 7 and out["words_label"][n - 1] == 8  # <start>, <end>
    assert out["unknown_mask"][1:n - 1].any() and not out["unknown_mask"][1:n - 1].all()
    assert (out["words_label"][1:n - 1][out["unknown_mask"][1:n - 1]] == 6).all()
    assert not out["unknown_mask"][[0, n - 1]].any()


def test_clip_empty_query_is_sot_eot(openai, clip_count):
    tok = MESMTokenizer("CLIP", max_words_l=8, vocab_size=4, count_file=clip_count, pos_tagger="none")
    out = tok.encode("  ")
    assert out["n_words"] == 2 and out["words_id"][:3].tolist() == [49406, 49407, 0]
    assert out["words_label"][:2].tolist() == [5, 6]


def test_clip_rule_and_none_taggers(openai, clip_count):
    st, stmod = openai
    id2label = ref_clip_id2label(clip_count, 10)
    rule = MESMTokenizer("CLIP", max_words_l=12, vocab_size=10, count_file=clip_count, pos_tagger="rule")
    none = MESMTokenizer("CLIP", max_words_l=12, vocab_size=10, count_file=clip_count, pos_tagger="none")
    for q in CLIP_QUERIES:  # the official pipeline with another tagging step (the rule tagger: our deviation)
        assert_same(rule.encode(q), ref_clip(q, 12, id2label, st, stmod,
                                             weigh=lambda t: [P.pos_weight(tag) for _, tag in P.rule_tags(t)]))
        assert_same(none.encode(q), ref_clip(q, 12, id2label, st, stmod, weigh=lambda t: [1] * len(t)))
    assert rule.encode("when")["words_weight"][1] == 2 and rule.encode("the")["words_weight"][1] == 1


def test_clip_without_recfw_needs_no_count_file():
    tok = MESMTokenizer("CLIP", max_words_l=8, vocab_size=4, pos_tagger="none", recfw=False)
    out = tok.encode("a person")
    assert out["n_words"] == 4 and not out["words_label"].any() and not out["unknown_mask"].any()


# ================================================================================================ GloVe

@pytest.mark.parametrize("L,vocab_size", [(16, 10), (5, 100), (1, 3)])
def test_glove_nltk_encode_matches_official(nltk_env, files, L, vocab_size):
    count = files / "GloVe_tokenized_count.txt"
    wtoi, id2label = ref_build_vocab(count), ref_glove_id2label(count, vocab_size)
    for tagger in (None, nltk.tag._get_tagger()):
        tok = MESMTokenizer("GloVeNLTK", max_words_l=L, vocab_size=vocab_size, count_file=count,
                            pos_tagger="nltk", nltk_tagger=tagger)
        assert tok._words.split == "punkt" and tok.vocab.wtoi == wtoi and tok.id_mismatches == 0
        assert tok.num_mlm_classes == vocab_size + 1
        for q in QUERIES + ["person opens door. then walks in.", "He sits? Then stands!"]:
            out = tok.encode(q)
            assert_dtypes(out, L)
            assert_same(out, ref_nltk(q, L, wtoi, id2label))


def test_tags_come_from_the_whole_query_before_the_cut(nltk_env, files, openai, clip_count):
    # The official code tags every token and cuts afterwards; the tag of the last kept token can depend on the
    # tokens after it. Find such queries for the tiny tagger, then compare with the references there.
    words = ["a", "cut", "zebra", "when", "she", "the", "walks", "red"]
    cases = []
    for x in words:
        for y in words:
            q = ["a", "a", x, y]
            full = [P.pos_weight(t) for _, t in nltk.pos_tag(q)][:3]
            if full != [P.pos_weight(t) for _, t in nltk.pos_tag(q[:3])]:
                cases.append(" ".join(q))
    assert cases
    count = files / "GloVe_tokenized_count.txt"
    wtoi, id2label = ref_build_vocab(count), ref_glove_id2label(count, 8)
    glove = MESMTokenizer("GloVeNLTK", max_words_l=3, vocab_size=8, count_file=count, pos_tagger="nltk")
    clip = MESMTokenizer("CLIP", max_words_l=5, vocab_size=8, count_file=clip_count, pos_tagger="nltk")
    st, stmod = openai
    clip_labels = ref_clip_id2label(clip_count, 8)
    for q in cases:
        assert_same(glove.encode(q), ref_nltk(q, 3, wtoi, id2label))
        assert_same(clip.encode(q), ref_clip(q, 5, clip_labels, st, stmod))


def test_glove_identity_split_equals_punkt_on_single_sentences(nltk_env, files):
    count = files / "GloVe_tokenized_count.txt"
    wtoi, id2label = ref_build_vocab(count), ref_glove_id2label(count, 8)
    tok = MESMTokenizer("GloVeNLTK", max_words_l=16, vocab_size=8, count_file=count, pos_tagger="nltk",
                        sentence_split="identity")
    for q in QUERIES:
        assert_same(tok.encode(q), ref_nltk(q, 16, wtoi, id2label))
    with pytest.raises(JaxprvrError, match="internal sentence end"):
        tok.encode("person opens door. then walks in.")


def test_glove_auto_split_without_punkt(no_punkt, files):
    count = files / "GloVe_tokenized_count.txt"
    tok = MESMTokenizer("GloVeNLTK", max_words_l=16, vocab_size=8, count_file=count, pos_tagger="nltk")
    assert tok._words.split == "identity" and not tok.official_text
    res = tok.tokenize_all(QUERIES)
    assert res.n_queries == len(QUERIES) and res.n_sentence_ends == 0
    with pytest.raises(JaxprvrError) as e:
        tok.tokenize_all(QUERIES + ["person opens door. then walks in.", "a man sits. he stands."])
    assert f"2 of {len(QUERIES) + 2} queries" in str(e.value) and "punkt_tab" in str(e.value)
    with pytest.raises(JaxprvrError, match="punkt_tab"):
        MESMTokenizer("GloVeNLTK", max_words_l=16, vocab_size=8, count_file=count, pos_tagger="nltk",
                      sentence_split="punkt")


def test_glove_injected_sentence_tokenizer(nltk_env, no_punkt, files):
    # Punkt data missing, a Punkt model given: NLTK's word tokenizer on each of its sentences
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    count = files / "GloVe_tokenized_count.txt"
    tok = MESMTokenizer("GloVeNLTK", max_words_l=16, vocab_size=8, count_file=count, pos_tagger="nltk",
                        sent_tokenizer=PunktSentenceTokenizer())
    assert tok._words.split == "punkt" and not tok._words.official
    q = "person opens door. then walks in."
    got = tok._words.tokenize(q)
    want = [t for s in PunktSentenceTokenizer().tokenize(q) for t in nltk.tokenize.NLTKWordTokenizer().tokenize(s)]
    assert got == want and "door" in got and "door." not in got
    assert tok.tokenize_all([q]).n_sentence_ends == 1


def test_glove_simple_matches_official(nltk_env, files):
    count = files / "GloVe_tokenized_count.txt"
    wtoi, id2label = ref_build_vocab(count), ref_glove_id2label(count, 7)
    tok = MESMTokenizer("GloVeSimple", max_words_l=6, vocab_size=7, count_file=count, pos_tagger="nltk")
    for q in QUERIES:
        assert_same(tok.encode(q), ref_simple(q, 6, wtoi, id2label))


@pytest.mark.parametrize("L,vocab_size", [(16, 5), (3, 100)])
def test_glove_pkl_encode_matches_official(nltk_env, files, L, vocab_size):
    with open(files / "glove.pkl", "rb") as f:
        vocab = pickle.load(f)
    tok = MESMTokenizer("GloVeNLTK", max_words_l=L, vocab_size=vocab_size, load_vocab_pkl=True,
                        glove_pkl=files / "glove.pkl", pos_tagger="nltk")
    assert tok.word_dim == DIM
    dropped = 0
    for q in QUERIES:
        out = tok.encode(q)
        assert_dtypes(out, L)
        assert "words_id" not in out
        assert_same(out, ref_pkl(q, L, vocab, vocab_size))
    res = tok.tokenize_all(QUERIES)
    for q in QUERIES:
        toks = nltk.tokenize.word_tokenize(q)
        dropped += sum(1 for t in toks if t.lower() not in vocab["w2id"])
    assert res.n_dropped_words == dropped > 0
    assert tok.encode("Zebra giraffe!")["n_words"] == 1  # only "giraffe" is in w2id
    with pytest.raises(JaxprvrError, match="zebra umbrella"):
        tok.encode("zebra umbrella")


def test_glove_empty_query_is_an_error(nltk_env, files):
    tok = MESMTokenizer("GloVeNLTK", max_words_l=8, vocab_size=4, count_file=files / "GloVe_tokenized_count.txt",
                        pos_tagger="nltk")
    with pytest.raises(JaxprvrError, match="no token"):
        tok.encode("   ")


def test_tokenize_all_counts_and_rows(nltk_env, files):
    count = files / "GloVe_tokenized_count.txt"
    wtoi, id2label = ref_build_vocab(count), ref_glove_id2label(count, 9)
    tok = MESMTokenizer("GloVeNLTK", max_words_l=8, vocab_size=9, count_file=count, pos_tagger="nltk")
    qs = QUERIES + ["person opens door. then walks in."]
    res = tok.tokenize_all(qs)
    n_tok = [len(nltk.tokenize.word_tokenize(q)) for q in qs]
    assert res.n_truncated == sum(n > 8 for n in n_tok) > 0
    assert res.truncated_rows == [i for i, n in enumerate(n_tok) if n > 8]
    assert res.n_sentence_ends == 1
    unk = 0
    for i, q in enumerate(qs):
        ref = ref_nltk(q, 8, wtoi, id2label)
        assert_same({k: res.arrays[k][i] for k in ("words_id", "words_weight", "words_label", "unknown_mask")}
                    | {"n_words": int(res.arrays["n_words"][i])}, ref)
        unk += int((ref["words_id"] == 1).sum())
    assert res.n_unk_tokens == unk > 0
    assert res.arrays["words_id"].dtype == np.int32 and res.arrays["n_words"].dtype == np.int32
    assert "truncated" in res.summary()
    empty = tok.tokenize_all([])
    assert empty.arrays["words_id"].shape == (0, 8)


# ================================================================================================ POS weights

def test_pos_weight_substring_rule():
    for tag in ("NN", "NNS", "NNP", "VB", "VBZ", "VBG", "JJ", "JJR", "RB", "RBR", "WRB"):
        assert P.pos_weight(tag) == 2, tag
    for tag in ("DT", "IN", "CC", "PRP", "PRP$", "TO", "MD", "WDT", "WP", "CD", "POS", "RP", ".", ",", ""):
        assert P.pos_weight(tag) == 1, tag


def test_rule_tagger():
    tags = dict(P.rule_tags(["The", "when", "How", "person", "opens", "into", "3.5", "12", ".", ",", "'s", "n't",
                             "can", "their", "zebra"]))
    assert tags["The"] == "DT" and tags["when"] == "WRB" and tags["How"] == "WRB" and tags["into"] == "IN"
    assert tags["3.5"] == tags["12"] == "CD" and tags["."] == tags[","] == "." and tags["'s"] == "POS"
    assert tags["n't"] == "RB" and tags["can"] == "MD" and tags["their"] == "PRP$"
    assert tags["person"] == tags["opens"] == tags["zebra"] == "NN"
    t = P.PosTagger("rule")
    assert t.weights(["The", "when", "person", ".", "in"]) == [1, 2, 2, 1, 1]
    assert P.PosTagger("none").weights(["a", "b"]) == [1, 1]


@needs_nltk
def test_missing_tagger_data_is_one_error(monkeypatch):
    def missing(tokens, tagset=None, lang="eng"):
        raise LookupError("Resource averaged_perceptron_tagger_eng not found.")

    monkeypatch.setattr(nltk, "pos_tag", missing)
    with pytest.raises(JaxprvrError) as e:
        P.PosTagger("nltk")
    msg = str(e.value)
    assert "averaged_perceptron_tagger_eng" in msg and "nltk.downloader averaged_perceptron_tagger " in msg
    assert "\n" not in msg and isinstance(e.value.__cause__, LookupError)
    with pytest.raises(JaxprvrError, match="averaged_perceptron_tagger"):
        MESMTokenizer("CLIP", max_words_l=8, vocab_size=4, recfw=False, pos_tagger="nltk")


@needs_nltk
def test_missing_punkt_data_is_one_error(monkeypatch):
    def missing(text, language="english"):
        raise LookupError("Resource punkt_tab not found.")

    monkeypatch.setattr(nltk.tokenize, "sent_tokenize", missing)
    with pytest.raises(JaxprvrError) as e:
        P.WordTokenizer("punkt")
    msg = str(e.value)
    assert "punkt_tab" in msg and "nltk.downloader punkt " in msg and "\n" not in msg


def test_perceptron_pickle_loader(tiny_tagger, tmp_path):
    p = tmp_path / "tagger.pickle"
    p.write_bytes(pickle.dumps((tiny_tagger.model.weights, tiny_tagger.tagdict, tiny_tagger.classes), protocol=2))
    loaded = P.perceptron_tagger_from_pickle(p)
    for q in QUERIES:
        toks = nltk.tokenize.word_tokenize(q, preserve_line=True)
        assert loaded.tag(toks) == tiny_tagger.tag(toks)
    p.write_bytes(pickle.dumps({"weights": {}}))
    with pytest.raises(JaxprvrError, match="triple"):
        P.perceptron_tagger_from_pickle(p)


def test_missing_nltk_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nltk", None)
    with pytest.raises(JaxprvrError, match="pip install nltk"):
        P.PosTagger("nltk")
    assert P.PosTagger("rule").weights(["a", "cup"]) == [1, 2]  # the rule tagger needs no nltk
    with pytest.raises(JaxprvrError, match="pip install nltk"):
        P.WordTokenizer("identity")


def test_bad_tagger_arguments(tiny_tagger):
    with pytest.raises(JaxprvrError):
        P.PosTagger("spacy")
    with pytest.raises(JaxprvrError):
        P.PosTagger("rule", nltk_tagger=tiny_tagger)
    with pytest.raises(JaxprvrError):
        P.PosTagger("nltk", nltk_tagger=object())
    with pytest.raises(JaxprvrError):
        P.WordTokenizer("spacy")


# ------------------------------------------------------------------------------------------------ sentence ends

FLAGGED = ["person opens door. then walks in.", "He sits? Then stands!", "e.g. a cup on the table",
           "door.( he walks", "door.! ok", "a man... then sits", 'he says "hi." then leaves', "one. two",
           "wait!!", "what?!"]  # Punkt splits the last two ("wait!" | "!"), with the same tokens in the end
CLEAN = ["person opens door.", "the man is 3.5 m tall.", 'he says "hi."', "(he walks.)", "a person walks...",
         "what is this?", "he walks!", "no punctuation at all", "p.m", "a.b.c", "door.'", "it ends here.  ",
         "U.S.A", '"Stop."']


def test_internal_sentence_end_detector(nltk_env):
    assert all(P.has_internal_sentence_end(q) for q in FLAGGED)
    assert not any(P.has_internal_sentence_end(q) for q in CLEAN)
    assert P.count_internal_sentence_ends(FLAGGED + CLEAN) == (len(FLAGGED), list(range(len(FLAGGED))))
    ident = P.WordTokenizer("identity")
    punkt = P.WordTokenizer("punkt")  # the real word_tokenize with an untrained Punkt model
    assert punkt.official
    for q in CLEAN:  # not flagged -> the identity split gives NLTK's tokens
        assert ident.tokenize(q) == nltk.tokenize.word_tokenize(q) == punkt.tokenize(q), q
    # the check matters: Punkt splits this one and the tokens differ
    q = FLAGGED[0]
    assert nltk.tokenize.word_tokenize(q, preserve_line=True) != nltk.tokenize.word_tokenize(q)


# ================================================================================================ files

def test_count_files(files, clip_count, tmp_path):
    c = G.read_count_file(clip_count)
    assert c.kind == "CLIP" and c.ids is None and all(isinstance(k, int) for k in c.keys)
    g = G.read_count_file(files / "GloVe_tokenized_count.txt")
    assert g.kind == "GloVe" and len(g.ids) == len(g.keys) == len(g.counts)
    # the vocabulary and MLM labels equal the official readers'
    v = G.GloVeVocab.from_count_file(g)
    assert v.wtoi == ref_build_vocab(files / "GloVe_tokenized_count.txt") and len(v) == len(g) + 2
    for vs in (1, 4, len(g), len(g) + 5):
        ref = ref_glove_id2label(files / "GloVe_tokenized_count.txt", vs)
        m = MLMVocab.from_glove_count(g, vs)
        assert m.label == {k: x for k, x in ref.items() if k != "<unknown>"} and m.unknown == ref["<unknown>"]
        ref = ref_clip_id2label(clip_count, vs)
        m = MLMVocab.from_clip_count(c, vs)
        assert m.label == {k: x for k, x in ref.items() if not isinstance(k, str)}
        assert (m.unknown, m.start, m.end) == (ref["<unknown>"], ref["<start>"], ref["<end>"])
    # a repeated id keeps its last line, as the official dict does
    (tmp_path / "rep.txt").write_text("5 9\n7 8\n5 3\n")
    assert MLMVocab.from_clip_count(G.read_count_file(tmp_path / "rep.txt"), 10).label == \
        {k: x for k, x in ref_clip_id2label(tmp_path / "rep.txt", 10).items() if not isinstance(k, str)}
    # inconsistent ids in a GloVe file are counted (labels use the file's ids, as officially)
    (tmp_path / "bad_ids.txt").write_text("b 2 5\na 3 4\n")
    tok = MESMTokenizer("GloVeSimple", max_words_l=4, vocab_size=2, count_file=tmp_path / "bad_ids.txt",
                        pos_tagger="none")
    assert tok.id_mismatches == 2


@pytest.mark.parametrize("text,match", [("5 9\n7\n", ":2"), ("x 9\n", "BPE id"), ("a 2 x\n", "count"),
                                        ("", "empty"), ("a 2 3 4\n", ":1"), ("5  9\n", ":1")])
def test_count_file_errors(tmp_path, text, match):
    (tmp_path / "c.txt").write_text(text)
    with pytest.raises(JaxprvrError, match=match):
        G.read_count_file(tmp_path / "c.txt")


@needs_nltk
def test_glove_txt_and_embedding(files):
    count = files / "GloVe_tokenized_count.txt"
    vocab = G.GloVeVocab.from_count_file(count)
    wtoi = ref_build_vocab(count)
    unk = G.unk_vector_from_seed(3)
    emb = G.build_glove_embedding(vocab, files / "glove.txt", unk_vector=unk)
    ref = ref_glove_table(files / "glove.txt", wtoi, unk)
    assert emb.matrix.dtype == np.float32 and np.array_equal(emb.matrix, ref)
    assert emb.missing == ("kitchen",)
    k = vocab.wtoi["kitchen"]
    assert np.array_equal(emb.matrix[k], emb.matrix[1]) and np.array_equal(emb.matrix[1], unk)
    assert not emb.matrix[0].any()
    # seeded: the same seed gives the same table, another seed another <UNK>
    a = G.build_glove_embedding(vocab, files / "glove.txt", seed=7)
    b = G.build_glove_embedding(vocab, files / "glove.txt", seed=7)
    c = G.build_glove_embedding(vocab, files / "glove.txt", seed=8)
    assert np.array_equal(a.matrix, b.matrix) and not np.array_equal(a.unk_vector, c.unk_vector)
    assert np.array_equal(a.unk_vector, G.unk_vector_from_seed(7)) and a.unk_vector.std() > 0.5
    # the tokenizer builds the same table
    tok = MESMTokenizer("GloVeNLTK", max_words_l=4, vocab_size=4, count_file=count, pos_tagger="none",
                        glove_txt=files / "glove.txt", sentence_split="identity")
    assert np.array_equal(tok.build_embedding(unk_vector=unk).matrix, ref)


def test_read_glove_txt_keys_with_spaces_and_repeats(files):
    vec, found = G.read_glove_txt(files / "glove.txt", ["new york", "door", "<UNK>", "<PAD>", "nope", "door"])
    assert found.tolist() == [True, True, False, False, False, True]
    ref = {}
    with open(files / "glove.txt") as f:
        for line in f:
            s = line.split()
            ref[" ".join(s[:-DIM])] = np.array(s[-DIM:], dtype=np.float32)
    assert np.array_equal(vec[0], ref["new york"]) and np.array_equal(vec[1], ref["door"])
    assert np.array_equal(vec[5], ref["door"]) and not vec[2:5].any()
    first_door = np.array(open(files / "glove.txt").readlines()[2].split()[-DIM:], dtype=np.float32)
    assert not np.array_equal(first_door, ref["door"])  # the later line won


def test_read_glove_txt_errors(tmp_path):
    (tmp_path / "g.txt").write_text("door 0.1 0.2\n")
    with pytest.raises(JaxprvrError, match="g.txt:1"):
        G.read_glove_txt(tmp_path / "g.txt", ["door"])
    rng = np.random.default_rng(0)
    (tmp_path / "h.txt").write_text(_vec_line("cup", rng).replace(" ", " x ", 1).replace(" x ", " ", 1)
                                    + "door " + "abc " * DIM + "\n")
    with pytest.raises(JaxprvrError, match="non-numeric"):
        G.read_glove_txt(tmp_path / "h.txt", ["door"])
    vec, found = G.read_glove_txt(tmp_path / "h.txt", ["cup"])  # a bad line of an unneeded word is not read
    assert found.tolist() == [True]
    with pytest.raises(JaxprvrError, match="unreadable"):
        G.read_glove_txt(tmp_path / "none.txt", ["cup"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_glove_pkl_restricted_unpickler(files, tmp_path):
    with open(files / "glove.pkl", "rb") as f:
        vocab = pickle.load(f)
    for proto in (2, 4, 5):
        p = tmp_path / f"v{proto}.pkl"
        p.write_bytes(pickle.dumps(vocab, protocol=proto))
        got = G.read_glove_pkl(p)
        assert got["counter"] == vocab["counter"] and isinstance(got["counter"], collections.Counter)
        assert got["w2id"] == vocab["w2id"] and np.array_equal(got["id2vec"], vocab["id2vec"])
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"counter": _Evil(marker), "w2id": {}, "id2vec": []}))
    with pytest.raises(JaxprvrError, match="system"):
        G.read_glove_pkl(p)
    assert not marker.exists()
    p.write_bytes(pickle.dumps(eval))
    with pytest.raises(JaxprvrError, match="builtins.eval"):
        G.read_glove_pkl(p)
    p.write_bytes(pickle.dumps({"w2id": {}}))
    with pytest.raises(JaxprvrError, match="counter"):
        G.read_glove_pkl(p)
    p.write_bytes(pickle.dumps({"counter": collections.Counter(), "w2id": {"a": 3}, "id2vec": np.zeros((2, 4))}))
    with pytest.raises(JaxprvrError, match="row index"):
        G.read_glove_pkl(p)
    p.write_bytes(b"\x80\x04truncated")
    with pytest.raises(JaxprvrError, match="readable pickle"):
        G.read_glove_pkl(p)


@needs_nltk
def test_bad_tokenizer_arguments(files, clip_count):
    count = files / "GloVe_tokenized_count.txt"
    for kw in (dict(kind="BERT"), dict(max_words_l=1), dict(max_words_l=78), dict(vocab_size=0),
               dict(load_vocab_pkl=True), dict(vocab_size=True)):
        args = dict(kind="CLIP", max_words_l=8, vocab_size=4, count_file=clip_count, pos_tagger="none") | kw
        with pytest.raises(JaxprvrError):
            MESMTokenizer(args.pop("kind"), **args)
    with pytest.raises(JaxprvrError, match="GloVe count file"):
        MESMTokenizer("GloVeNLTK", max_words_l=8, vocab_size=4, count_file=clip_count, pos_tagger="none")
    with pytest.raises(JaxprvrError, match="glove.pkl"):
        MESMTokenizer("GloVeNLTK", max_words_l=8, vocab_size=4, load_vocab_pkl=True, pos_tagger="none")
    with pytest.raises(JaxprvrError, match="GloVe vocabulary"):
        MESMTokenizer("CLIP", max_words_l=8, vocab_size=4, count_file=clip_count, pos_tagger="none").build_embedding(
            files / "glove.txt")
    tok = MESMTokenizer.from_ann_path("GloVeNLTK", files, max_words_l=8, vocab_size=4, pos_tagger="none",
                                      sentence_split="identity")
    assert tok.vocab.wtoi == ref_build_vocab(count)
    assert MESMTokenizer.from_ann_path("GloVeNLTK", files, max_words_l=8, vocab_size=4, pos_tagger="none",
                                       load_vocab_pkl=True, sentence_split="identity").pkl is not None


# ================================================================================================ mutants

def test_mutant_wrb_not_counted(nltk_env, files, monkeypatch):
    count = files / "GloVe_tokenized_count.txt"
    wtoi, id2label = ref_build_vocab(count), ref_glove_id2label(count, 8)
    q = "When the man walks in, he takes the red cup quickly."
    tok = MESMTokenizer("GloVeNLTK", max_words_l=16, vocab_size=8, count_file=count, pos_tagger="nltk")
    assert_same(tok.encode(q), ref_nltk(q, 16, wtoi, id2label))
    monkeypatch.setattr(P, "pos_weight", lambda tag: 2 if any(tag.startswith(p) for p in ("NN", "VB", "JJ", "RB"))
                        else 1)
    with pytest.raises(AssertionError):
        assert_same(tok.encode(q), ref_nltk(q, 16, wtoi, id2label))


def test_mutant_unk_not_shared(files):
    count = files / "GloVe_tokenized_count.txt"
    vocab = G.GloVeVocab.from_count_file(count)
    unk = G.unk_vector_from_seed(0)
    emb = G.build_glove_embedding(vocab, files / "glove.txt", unk_vector=unk)
    ref = ref_glove_table(files / "glove.txt", ref_build_vocab(count), unk)
    assert np.array_equal(emb.matrix, ref)
    bad = emb.matrix.copy()
    bad[vocab.wtoi["kitchen"]] = np.random.default_rng(1).standard_normal(DIM)  # its own vector
    assert not np.array_equal(bad, ref)
    bad[vocab.wtoi["kitchen"]] = 0.0  # a zero vector
    assert not np.array_equal(bad, ref)
    bad = emb.matrix.copy()
    bad[2, 0] = np.nan
    assert not np.array_equal(bad, ref)


class _LeakyW2id(dict):
    """A planted bug: every word counts as known (OOV words kept, mapped to row 0)."""

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return dict.get(self, key, 0)


def test_mutant_pkl_keeps_oov_words(nltk_env, files):
    with open(files / "glove.pkl", "rb") as f:
        vocab = pickle.load(f)
    tok = MESMTokenizer("GloVeNLTK", max_words_l=16, vocab_size=5, load_vocab_pkl=True,
                        glove_pkl=files / "glove.pkl", pos_tagger="nltk")
    q = QUERIES[3]
    assert_same(tok.encode(q), ref_pkl(q, 16, vocab, 5))
    tok.pkl = dict(tok.pkl, w2id=_LeakyW2id(tok.pkl["w2id"]))
    with pytest.raises(AssertionError):
        assert_same(tok.encode(q), ref_pkl(q, 16, vocab, 5))


def test_mutant_clip_sot_weight_and_nan(nltk_env, openai, clip_count):
    st, stmod = openai
    tok = MESMTokenizer("CLIP", max_words_l=16, vocab_size=8, count_file=clip_count, pos_tagger="nltk")
    q = QUERIES[1]
    ref = ref_clip(q, 16, ref_clip_id2label(clip_count, 8), st, stmod)
    out = tok.encode(q)
    assert_same(out, ref)
    bad = dict(out, words_weight=out["words_weight"].copy())
    bad["words_weight"][0] = 1.0  # SOT weighted
    with pytest.raises(AssertionError):
        assert_same(bad, ref)
    bad["words_weight"][0] = np.nan
    with pytest.raises(AssertionError):
        assert_same(bad, ref)
