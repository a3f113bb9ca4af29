"""MESM's query tokenizers and MLM vocabulary (lntzm/MESM @ 8501bdea, ``dataset/tokenizer.py``,
``dataset/base.py L34-92``).

:class:`MESMTokenizer` encodes one query the way the official dataset does at construction time
(``self.tokenizer.tokenize(sentence, max_valid_length=max_words_l)``, e.g. ``charades.py L68-69``), as numpy:

``kind="CLIP"`` (``CLIPTokenizer``, ``tokenizer.py L67-214``)
    The query is cleaned and BPE-encoded with OpenAI's tokenizer (:mod:`jaxprvr.text.clip_bpe`); the POS tagger
    runs on the BPE pieces with ``</w>`` removed (L133-144). The first ``max_words_l - 2`` pieces are kept and
    framed by SOT/EOT (L187-190): ``words_id = [SOT, ids..., EOT, 0...]``; the weights are ``[0, w..., 0]``; the MLM
    labels ``[<start>, label(id)..., <end>]`` with ``label(id)`` = the id's line in ``CLIP_tokenized_count.txt``
    (first ``vocab_size`` lines) or ``<unknown>``; ``unknown_mask`` is True on the ids outside those lines
    (never on SOT/EOT) (L191-199). MLM classes: ``vocab_size + 3`` (``<unknown>`` = vocab_size, ``<start>`` + 1,
    ``<end>`` + 2; ``base.py L53-68``). The official ``words_id`` is 77 wide; only its first ``max_words_l``
    columns are ever read (``model.py L113-115``), so ours is ``max_words_l`` wide.
``kind="GloVeNLTK"`` (``NLTKTokenizer``, L320-332)
    ``nltk.pos_tag(word_tokenize(query))`` on the case-preserved tokens, then each token is lowercased and looked
    up in the :class:`~jaxprvr.text.glove.GloVeVocab` (``<UNK>`` = 1 when absent); the first ``max_words_l``
    tokens are kept, no SOT/EOT (L263-265). Labels: the vocabulary id's line among the first ``vocab_size`` lines of
    ``GloVe_tokenized_count.txt`` (the id written in the file, ``base.py L70-83``) or ``<unknown>`` =
    ``vocab_size``; MLM classes ``vocab_size + 1``.
``kind="GloVeNLTK"``, ``load_vocab_pkl=True`` (``NLTKTokenizerWithFeature``, L335-388)
    As above, but tokens whose lowercase form is not in ``glove.pkl``'s ``w2id`` are **dropped** (with their
    weights) before the cut; the output is ``words_vec`` = the float32 vectors ``id2vec[w2id[w]]``
    ``[max_words_l, D]`` instead of ids. Labels: the word's rank in ``counter.most_common(vocab_size)`` or
    ``<unknown>`` (``base.py L85-92``).
``kind="GloVeSimple"`` (``GloVeSimpleTokenizer``, L251-317; no shipped config uses it)
    Lowercase, every ``string.punctuation`` character to a space, whitespace split; the tagger runs on these
    lowercase words; otherwise as GloVeNLTK.

``encode`` returns ``dict(words_id | words_vec, words_weight (float32), words_label (int32), unknown_mask (bool),
n_words (int))``; padding positions are 0 / False. Without an MLM vocabulary (``recfw=False``, the official
``rec_fw`` off) ``words_label`` is all 0 and ``unknown_mask`` all False (officially ``None``).

Errors where the official code fails later: a GloVe query with no token (official: a 0/0 sentence feature, NaN)
or, with ``glove.pkl``, no known word (official: ``np.stack([])`` raises) is a JaxprvrError naming the query.
An empty CLIP query is valid (SOT, EOT), as officially.

POS taggers and the GloVe sentence split: :mod:`jaxprvr.text.pos` (``pos_tagger`` "nltk" | "rule" | "none";
``sentence_split`` "auto" | "punkt" | "identity").
"""

from __future__ import annotations

import collections
import os
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxprvr.errors import JaxprvrError
from jaxprvr.text import glove as _glove
from jaxprvr.text.pos import PosTagger, WordTokenizer, has_internal_sentence_end

KINDS = ("CLIP", "GloVeNLTK", "GloVeSimple")
CLIP_COUNT_FILE = "CLIP_tokenized_count.txt"
GLOVE_COUNT_FILE = "GloVe_tokenized_count.txt"
GLOVE_PKL_FILE = "glove.pkl"

_WHERE = "MESMTokenizer"


# ------------------------------------------------------------------------------------------------ MLM vocabulary

@dataclass(frozen=True)
class MLMVocab:
    """The official ``id2label``: ``label[key]`` for the first ``vocab_size`` keys of the count file (CLIP: BPE ids;
    GloVe: vocabulary ids as written in the file; glove.pkl: words of ``counter.most_common(vocab_size)``), plus
    ``unknown`` = vocab_size and, for CLIP, ``start`` = vocab_size + 1, ``end`` = vocab_size + 2."""

    kind: str
    vocab_size: int
    label: dict
    unknown: int
    start: int | None = None
    end: int | None = None

    @property
    def num_classes(self) -> int:
        """vocab_size + 3 (CLIP) or + 1 (GloVe)."""
        return self.vocab_size + (3 if self.kind == "CLIP" else 1)

    @staticmethod
    def _first_lines(keys, vocab_size) -> dict:
        # base.py L56-64 / L73-81: label = line number; stop once vocab_size lines are read (a repeated key keeps
        # its last line, as the official dict assignment does)
        label, count = {}, 0
        for key in keys:
            label[key] = count
            count += 1
            if count == vocab_size:
                break
        return label

    @classmethod
    def from_clip_count(cls, count: _glove.CountFile, vocab_size: int) -> "MLMVocab":
        if count.kind != "CLIP":
            raise JaxprvrError(count.path, "a CLIP count file ('<BPE id> <count>')", "a GloVe count file")
        return cls("CLIP", vocab_size, cls._first_lines(count.keys, vocab_size), vocab_size, vocab_size + 1,
                   vocab_size + 2)

    @classmethod
    def from_glove_count(cls, count: _glove.CountFile, vocab_size: int) -> "MLMVocab":
        if count.kind != "GloVe":
            raise JaxprvrError(count.path, "a GloVe count file ('<word> <id> <count>')", "a CLIP count file")
        return cls("GloVe", vocab_size, cls._first_lines(count.ids, vocab_size), vocab_size)

    @classmethod
    def from_pkl_counter(cls, counter: collections.Counter, vocab_size: int) -> "MLMVocab":
        words = [w for w, _ in counter.most_common(vocab_size)]
        return cls("GloVe", vocab_size, {w: i for i, w in enumerate(words)}, vocab_size)

    def labels(self, keys: Sequence) -> tuple[list[int], list[bool]]:
        """``(labels, unknown)`` of the keys (no SOT/EOT)."""
        lab = [self.label.get(k, self.unknown) for k in keys]
        unk = [k not in self.label for k in keys]
        return lab, unk


# ------------------------------------------------------------------------------------------------ corpus result

@dataclass
class TokenizedQueries:
    """:meth:`MESMTokenizer.tokenize_all`: stacked arrays (rows = queries, same keys as ``encode``; ``n_words`` is
    int32 ``[N]``) and corpus counts.

    ``n_truncated``: queries that lost tokens to ``max_words_l``; ``n_sentence_ends``: queries with an internal
    sentence end (:func:`~jaxprvr.text.pos.has_internal_sentence_end`); ``n_unk_tokens``: kept GloVe tokens mapped
    to ``<UNK>`` (id 1); ``n_dropped_words``: tokens dropped as not in ``glove.pkl``; ``n_mlm_unknown``: kept
    tokens outside the MLM vocabulary.
    """

    arrays: dict
    n_queries: int
    n_truncated: int = 0
    n_sentence_ends: int = 0
    n_unk_tokens: int = 0
    n_dropped_words: int = 0
    n_mlm_unknown: int = 0
    truncated_rows: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.n_queries} queries: {self.n_truncated} truncated, {self.n_sentence_ends} with an internal "
                f"sentence end, {self.n_unk_tokens} <UNK> tokens, {self.n_dropped_words} words dropped (not in "
                f"glove.pkl), {self.n_mlm_unknown} tokens outside the MLM vocabulary")


# ------------------------------------------------------------------------------------------------ tokenizer

def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
            or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise JaxprvrError(f"{_WHERE}.{name}", f"an integer {rng}", repr(value))
    return int(value)


class MESMTokenizer:
    """MESM's query encoder for ``kind`` in :data:`KINDS` (module docstring).

    Files: ``count_file`` (``CLIP_tokenized_count.txt`` for CLIP -- needed only with ``recfw``;
    ``GloVe_tokenized_count.txt`` for GloVe -- always, it defines the vocabulary), ``glove_pkl`` (CPL's
    ``glove.pkl``, with ``load_vocab_pkl``), ``glove_txt`` (``glove.6B.300d.txt`` etc., optional, for
    :meth:`build_embedding`), ``bpe_path`` (None: the vendored CLIP vocabulary). ``max_words_l`` and
    ``vocab_size`` are the official config fields. ``pos_tagger`` / ``nltk_tagger``: :class:`~jaxprvr.text.pos.
    PosTagger`; ``sentence_split`` / ``sent_tokenizer``: :class:`~jaxprvr.text.pos.WordTokenizer` (GloVeNLTK).
    """

    def __init__(self, kind: str = "CLIP", *, max_words_l: int, vocab_size: int,
                 count_file: str | os.PathLike | None = None, load_vocab_pkl: bool = False,
                 glove_pkl: str | os.PathLike | None = None, glove_txt: str | os.PathLike | None = None,
                 bpe_path: str | os.PathLike | None = None, pos_tagger: str = "nltk", nltk_tagger=None,
                 sentence_split: str = "auto", sent_tokenizer=None, recfw: bool = True):
        if kind not in KINDS:
            raise JaxprvrError(f"{_WHERE}.kind", f"one of {KINDS}", repr(kind))
        self.kind = kind
        self.load_vocab_pkl = bool(load_vocab_pkl)
        if self.load_vocab_pkl and kind != "GloVeNLTK":
            raise JaxprvrError(f"{_WHERE}.load_vocab_pkl", "True only with kind='GloVeNLTK'", f"kind={kind!r}")
        if kind == "CLIP":
            self.max_words_l = _check_int("max_words_l", max_words_l, 2, 77)  # SOT + EOT; CLIP's 77 positions
        else:
            self.max_words_l = _check_int("max_words_l", max_words_l, 1)
        self.vocab_size = _check_int("vocab_size", vocab_size, 1)
        self.recfw = bool(recfw)
        self.tagger = PosTagger(pos_tagger, nltk_tagger)
        self.glove_txt = None if glove_txt is None else Path(glove_txt)
        self.vocab: _glove.GloVeVocab | None = None
        self.pkl: dict | None = None
        self.mlm: MLMVocab | None = None
        self.count: _glove.CountFile | None = None
        self.id_mismatches = 0
        self.word_dim: int | None = _glove.GLOVE_DIM if kind != "CLIP" else None  # glove.pkl: its vectors' width
        self._words: WordTokenizer | None = None
        self._clip = None

        if kind == "CLIP":
            from jaxprvr.text import clip_bpe

            self._clip = clip_bpe.load_tokenizer() if bpe_path is None else clip_bpe.ClipTokenizer(bpe_path)
            self.sot_id, self.eot_id = clip_bpe.SOT_ID, clip_bpe.EOT_ID
            if self.recfw:
                if count_file is None:
                    raise JaxprvrError(f"{_WHERE}.count_file", f"the path of {CLIP_COUNT_FILE} (recfw=True)", "None")
                self.count = _glove.read_count_file(count_file, "CLIP")
                self.mlm = MLMVocab.from_clip_count(self.count, self.vocab_size)
        elif self.load_vocab_pkl:
            if glove_pkl is None:
                raise JaxprvrError(f"{_WHERE}.glove_pkl", f"the path of {GLOVE_PKL_FILE} (load_vocab_pkl=True)",
                                   "None")
            self.pkl = _glove.read_glove_pkl(glove_pkl)
            first = next(iter(self.pkl["w2id"].values()), None)
            self.word_dim = 0 if first is None else int(np.asarray(self.pkl["id2vec"][first]).shape[0])
            if self.recfw:
                self.mlm = MLMVocab.from_pkl_counter(self.pkl["counter"], self.vocab_size)
        else:
            if count_file is None:
                raise JaxprvrError(f"{_WHERE}.count_file", f"the path of {GLOVE_COUNT_FILE} (the vocabulary)",
                                   "None")
            self.count = _glove.read_count_file(count_file, "GloVe")
            self.vocab = _glove.GloVeVocab.from_count_file(self.count)
            self.id_mismatches = self.vocab.id_mismatches(self.count)
            if self.recfw:
                self.mlm = MLMVocab.from_glove_count(self.count, self.vocab_size)
        if kind == "GloVeNLTK":
            self._words = WordTokenizer(sentence_split, sent_tokenizer)
        elif sent_tokenizer is not None:
            raise JaxprvrError(f"{_WHERE}.sent_tokenizer", "a sentence tokenizer only with kind='GloVeNLTK'",
                               f"kind={kind!r}")

    @classmethod
    def from_ann_path(cls, kind: str, ann_path: str | os.PathLike, *, max_words_l: int, vocab_size: int,
                      load_vocab_pkl: bool = False, recfw: bool = True, **kwargs) -> "MESMTokenizer":
        """The official file locations under ``ann_path``: ``CLIP_tokenized_count.txt`` /
        ``GloVe_tokenized_count.txt`` (``base.py L55, L72``) and ``glove.pkl`` (``runner.py L38``)."""
        ann = Path(ann_path)
        if kind == "CLIP":
            files = {"count_file": ann / CLIP_COUNT_FILE if recfw else None}
        elif load_vocab_pkl:
            files = {"glove_pkl": ann / GLOVE_PKL_FILE}
        else:
            files = {"count_file": ann / GLOVE_COUNT_FILE}
        return cls(kind, max_words_l=max_words_l, vocab_size=vocab_size, load_vocab_pkl=load_vocab_pkl,
                   recfw=recfw, **files, **kwargs)

    # -- facts ---------------------------------------------------------------------------------------------------
    @property
    def num_mlm_classes(self) -> int:
        """The MLM head's classes: vocab_size + 3 (CLIP) or + 1 (GloVe)."""
        return self.vocab_size + (3 if self.kind == "CLIP" else 1)

    @property
    def official_text(self) -> bool:
        """True when the token sequence is NLTK's own (GloVeNLTK with Punkt) or needs no NLTK data."""
        return self._words is None or self._words.official

    # -- tokens --------------------------------------------------------------------------------------------------
    def _simple_words(self, text: str) -> list[str]:
        # GloVeSimpleTokenizer.split_words (tokenizer.py L305-317)
        table = str.maketrans(string.punctuation, " " * len(string.punctuation))
        return str(text).lower().translate(table).strip().split()

    def _encode_tokens(self, sentence: str):
        """Per-query: (keys, weights, extra) before the cut, as the official ``encode`` methods."""
        if self.kind == "CLIP":
            ids, pieces = [], []
            for sym in self._clip.tokenize(sentence):
                pieces.append(sym.replace("</w>", ""))
                ids.append(self._clip.encoder[sym])
            return ids, self.tagger.weights(pieces), 0
        if self.kind == "GloVeSimple":
            words = self._simple_words(sentence)
            return [self.vocab.id(w) for w in words], self.tagger.weights(words), 0
        tokens = self._words.tokenize(sentence, where=f"{_WHERE}.encode")
        weights = self.tagger.weights(tokens)
        if self.pkl is None:
            return [self.vocab.id(t.lower()) for t in tokens], weights, 0
        w2id = self.pkl["w2id"]
        kept, kept_w = [], []
        for tok, w in zip(tokens, weights):
            low = tok.lower()
            if low in w2id:
                kept.append(low)
                kept_w.append(w)
        return kept, kept_w, len(tokens) - len(kept)

    def encode_info(self, sentence: str) -> tuple[dict, dict]:
        """``(encode(sentence), info)`` with ``info`` = ``truncated`` (bool), ``n_tokens`` (before the cut),
        ``n_unk`` (kept <UNK> ids), ``n_dropped`` (words not in glove.pkl), ``n_mlm_unknown``."""
        if not isinstance(sentence, str):
            raise JaxprvrError(f"{_WHERE}.encode", "a query string", type(sentence).__name__)
        keys, weights, n_dropped = self._encode_tokens(sentence)
        L = self.max_words_l
        n_tokens = len(keys)
        keep = L - 2 if self.kind == "CLIP" else L
        keys, weights = keys[:keep], weights[:keep]
        if self.mlm is not None:
            labels, unknown = self.mlm.labels(keys)
        else:
            labels, unknown = [0] * len(keys), [False] * len(keys)
        if self.kind == "CLIP":
            keys = [self.sot_id] + keys + [self.eot_id]
            weights = [0] + weights + [0]
            if self.mlm is not None:
                labels = [self.mlm.start] + labels + [self.mlm.end]
            else:
                labels = [0] + labels + [0]
            unknown = [False] + unknown + [False]
        elif not keys:
            what = "no word of glove.pkl's w2id" if self.pkl is not None else "no token"
            raise JaxprvrError(f"{_WHERE}: query {sentence!r}", "at least one word",
                               f"{what} (the official code fails on it)")
        n = len(keys)
        out = {}
        if self.pkl is not None:
            vec = np.zeros((L, self.word_dim), np.float32)
            id2vec, w2id = self.pkl["id2vec"], self.pkl["w2id"]
            for j, w in enumerate(keys):
                vec[j] = np.asarray(id2vec[w2id[w]]).astype(np.float32)
            out["words_vec"] = vec
        else:
            ids = np.zeros(L, np.int32)
            ids[:n] = keys
            out["words_id"] = ids
        weight = np.zeros(L, np.float32)
        weight[:n] = weights
        label = np.zeros(L, np.int32)
        label[:n] = labels
        unk = np.zeros(L, bool)
        unk[:n] = unknown
        out.update(words_weight=weight, words_label=label, unknown_mask=unk, n_words=n)
        n_unk = 0 if self.vocab is None else sum(1 for k in keys if k == _glove.UNK_ID)
        info = dict(truncated=n_tokens > keep, n_tokens=n_tokens, n_unk=n_unk, n_dropped=n_dropped,
                    n_mlm_unknown=int(sum(unknown)) if self.mlm is not None else 0)
        return out, info

    def encode(self, sentence: str) -> dict:
        """One query as the official tokenizer's row: ``words_id`` int32 ``[max_words_l]`` (or ``words_vec`` float32
        ``[max_words_l, D]`` with glove.pkl), ``words_weight`` float32, ``words_label`` int32, ``unknown_mask``
        bool (all ``[max_words_l]``), ``n_words`` (valid positions; CLIP counts SOT and EOT)."""
        return self.encode_info(sentence)[0]

    def tokenize_all(self, sentences: Sequence[str], progress: bool = False) -> TokenizedQueries:
        """Encode every query; counts truncations, internal sentence ends, <UNK>, dropped and MLM-unknown words.

        With the identity sentence split (GloVeNLTK without Punkt) any query with an internal sentence end is an
        error, reported once for the corpus with the count and the first examples.
        """
        if isinstance(sentences, str):
            raise JaxprvrError(f"{_WHERE}.tokenize_all", "a sequence of query strings", "a single string")
        sentences = list(sentences)
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise JaxprvrError(f"{_WHERE}.tokenize_all[{i}]", "a query string", type(s).__name__)
        ends = [i for i, s in enumerate(sentences) if has_internal_sentence_end(s)]
        if ends and self._words is not None and self._words.split == "identity":
            examples = "; ".join(repr(sentences[i]) for i in ends[:3])
            raise JaxprvrError(f"{_WHERE}.tokenize_all",
                               "no query with an internal sentence end (identity sentence split: NLTK's Punkt "
                               "model is not installed)",
                               f"{len(ends)} of {len(sentences)} queries, e.g. {examples}",
                               "python -m nltk.downloader punkt_tab (nltk >= 3.9) or punkt (nltk 3.8)")
        rows, infos = [], []
        it = sentences
        if progress:
            from tqdm import tqdm

            it = tqdm(sentences, desc="tokenizing queries", leave=False, dynamic_ncols=True, file=sys.stderr)
        for s in it:
            out, info = self.encode_info(s)
            rows.append(out)
            infos.append(info)
        L = self.max_words_l
        arrays = {}
        keys = (["words_vec"] if self.pkl is not None else ["words_id"]) + ["words_weight", "words_label",
                                                                             "unknown_mask"]
        for k in keys:
            if rows:
                arrays[k] = np.stack([r[k] for r in rows])
            else:
                shape = (0, L, self.word_dim) if k == "words_vec" else (0, L)
                dtype = {"words_vec": np.float32, "words_id": np.int32, "words_weight": np.float32,
                         "words_label": np.int32, "unknown_mask": bool}[k]
                arrays[k] = np.zeros(shape, dtype)
        arrays["n_words"] = np.array([r["n_words"] for r in rows], np.int32)
        return TokenizedQueries(
            arrays=arrays, n_queries=len(sentences),
            n_truncated=sum(i["truncated"] for i in infos), n_sentence_ends=len(ends),
            n_unk_tokens=sum(i["n_unk"] for i in infos), n_dropped_words=sum(i["n_dropped"] for i in infos),
            n_mlm_unknown=sum(i["n_mlm_unknown"] for i in infos),
            truncated_rows=[j for j, i in enumerate(infos) if i["truncated"]])

    # -- GloVe table ---------------------------------------------------------------------------------------------
    def build_embedding(self, glove_txt: str | os.PathLike | None = None, *, seed: int = 0,
                        unk_vector: np.ndarray | None = None) -> _glove.GloVeEmbedding:
        """The GloVe text encoder's frozen table for this vocabulary (GloVe kinds without glove.pkl): see
        :func:`jaxprvr.text.glove.build_glove_embedding` (seeded or given ``<UNK>``; save ``unk_vector``)."""
        if self.vocab is None:
            raise JaxprvrError(f"{_WHERE}.build_embedding", "a GloVe vocabulary tokenizer (kind GloVeNLTK or "
                               "GloVeSimple without glove.pkl)", f"kind={self.kind!r}, load_vocab_pkl="
                               f"{self.load_vocab_pkl}")
        path = glove_txt if glove_txt is not None else self.glove_txt
        if path is None:
            raise JaxprvrError(f"{_WHERE}.build_embedding", "the path of a GloVe text file", "None")
        return _glove.build_glove_embedding(self.vocab, path, seed=seed, unk_vector=unk_vector)


__all__ = ["KINDS", "MLMVocab", "MESMTokenizer", "TokenizedQueries", "CLIP_COUNT_FILE", "GLOVE_COUNT_FILE",
           "GLOVE_PKL_FILE"]
