"""jaxprvr.text.clip_bpe against OpenAI's CLIP tokenizer and BackBone_tvr's caption layout.

tests/data/clip_bpe_golden.json holds ids made once by OpenAI's own simple_tokenizer.py (openai/CLIP
@ d05afc4) and BPE symbols by BackBone_tvr's tokenization_clip.py (@ 5bb74ad), with ftfy 5.8; its
"note" says how. Cases marked "ids_differ_under_ftfy" need ftfy 5.8 exactly.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxprvr.errors import JaxprvrError
from jaxprvr.text import clip_bpe
from jaxprvr.text.clip_bpe import EOT, EOT_ID, SOT, SOT_ID, VOCAB_SIZE, ClipTokenizer, clip_sequences

GOLDEN = json.loads((Path(__file__).parent / "data" / "clip_bpe_golden.json").read_text())
CASES = GOLDEN["cases"]
KNOWN = "a person is connecting something to system"
KNOWN_IDS = [49406, 320, 2533, 533, 41429, 2006, 531, 2422, 49407]


@pytest.fixture(scope="module")
def tok():
    return clip_bpe.load_tokenizer()


def _ftfy_version():
    return importlib.metadata.version("ftfy")  # ftfy.__version__ is stale in some releases (5.9 says 5.8)


def test_vocabulary_layout(tok):
    assert tok.vocab_size == VOCAB_SIZE == 49408
    assert len(tok.ranks) == 49152 - 256 - 2 == 48894
    assert (tok.encoder[SOT], tok.encoder[EOT]) == (SOT_ID, EOT_ID) == (49406, 49407)
    assert tok.encoder["!"] == 0 and tok.encoder["a</w>"] == 320 and tok.encoder["i</w>"] == 328
    assert sorted(tok.decoder) == list(range(VOCAB_SIZE))
    assert sorted(map(ord, tok.char_to_byte)) == sorted(map(ord, clip_bpe.byte_symbols()))
    assert len(set(clip_bpe.byte_symbols())) == 256


def test_known_answer(tok):
    assert [SOT_ID] + tok.encode(KNOWN) + [EOT_ID] == KNOWN_IDS
    ids, mask, n = clip_sequences([KNOWN], 32)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (1, 32)
    assert ids[0].tolist() == KNOWN_IDS + [0] * 23 and mask[0].tolist() == [1] * 9 + [0] * 23 and n == 0


@pytest.mark.parametrize("case", CASES, ids=[f"golden{i}" for i in range(len(CASES))])
def test_matches_openai(tok, case):
    version_note = ""
    if "ids_differ_under_ftfy" in case:
        version_note = (f" (ftfy-sensitive case: the golden ids are ftfy {GOLDEN['ftfy']}'s, "
                        f"installed ftfy is {_ftfy_version()}; pin ftfy=={GOLDEN['ftfy']})")
    assert tok.encode(case["text"]) == case["ids"], repr(case["text"]) + version_note
    assert tok.tokenize(case["text"]) == case["tokens"], repr(case["text"]) + version_note
    assert tok.convert_tokens_to_ids(case["tokens"]) == case["ids"]


def test_golden_set_covers_the_awkward_inputs():
    texts = [c["text"] for c in CASES]
    assert len(CASES) >= 40
    assert any("&amp;amp;" in t for t in texts) and any("Ã©" in t for t in texts)
    assert any(any(0x4E00 <= ord(ch) <= 0x9FFF for ch in t) for t in texts)  # CJK
    assert any(any(ord(ch) >= 0x1F300 for ch in t) for t in texts)  # emoji
    assert any(len(c["ids"]) > 30 for c in CASES)  # cut at max_words=32
    assert "" in texts and any("  " in t or "\t" in t for t in texts)
    assert sum("ids_differ_under_ftfy" in c for c in CASES) >= 3


# -- BackBone_tvr's RetrievalDataset._get_text, transcribed (dataloader_retrieval.py @ 5bb74ad) ---------
def _official_get_text(tokenize, convert_tokens_to_ids, caption_text, max_words):
    words = tokenize(caption_text)
    words = [SOT] + words
    total_length_with_CLS = max_words - 1
    truncated = False
    if len(words) > total_length_with_CLS:
        words = words[:total_length_with_CLS]
        truncated = True
    words = words + [EOT]
    input_ids = convert_tokens_to_ids(words)
    input_mask = [1] * len(input_ids)
    while len(input_ids) < max_words:
        input_ids.append(0)
        input_mask.append(0)
    assert len(input_ids) == max_words
    assert len(input_mask) == max_words
    return np.array(input_ids), np.array(input_mask), truncated


BOUNDARY = ["", "a", "a " * 29, "a " * 30, "a " * 31, "a " * 32, "hello world " * 40]


@pytest.mark.parametrize("max_words", [1, 2, 3, 8, 32, 77])
def test_get_text_layout_against_the_official_loop(tok, max_words):
    captions = [c["text"] for c in CASES] + BOUNDARY
    ids, mask, n = clip_sequences(captions, max_words, tokenizer=tok)
    assert ids.shape == mask.shape == (len(captions), max_words)
    expect_n = 0
    for row, text in enumerate(captions):
        e_ids, e_mask, cut = _official_get_text(tok.tokenize, tok.convert_tokens_to_ids, text, max_words)
        assert ids[row].tolist() == e_ids.tolist(), (max_words, text)
        assert mask[row].tolist() == e_mask.tolist(), (max_words, text)
        expect_n += cut
    assert n == expect_n


def test_get_text_layout_from_the_official_tokens():
    # the official BPE symbols (golden "tokens") through the transcribed loop, ids from the golden pairs
    table = {SOT: SOT_ID, EOT: EOT_ID}
    for c in CASES:
        table.update(zip(c["tokens"], c["ids"]))
    golden_tokens = {c["text"]: c["tokens"] for c in CASES}
    captions = list(golden_tokens)
    ids, mask, n = clip_sequences(captions, 32)
    expect_n = 0
    for row, text in enumerate(captions):
        e_ids, e_mask, cut = _official_get_text(lambda t: list(golden_tokens[t]), lambda ws: [table[w] for w in ws],
                                                text, 32)
        assert ids[row].tolist() == e_ids.tolist() and mask[row].tolist() == e_mask.tolist(), text
        expect_n += cut
    assert n == expect_n == sum(len(c["ids"]) > 30 for c in CASES) >= 2


def test_truncation_boundary_and_empty(tok):
    ids, mask, n = clip_sequences(["a " * 30, "a " * 31, ""], 32, tokenizer=tok)
    a = tok.encoder["a</w>"]
    assert ids[0].tolist() == [SOT_ID] + [a] * 30 + [EOT_ID] and mask[0].sum() == 32  # fits exactly
    assert ids[1].tolist() == [SOT_ID] + [a] * 30 + [EOT_ID] and mask[1].sum() == 32  # one token cut
    assert ids[2].tolist() == [SOT_ID, EOT_ID] + [0] * 30 and mask[2].tolist() == [1, 1] + [0] * 30
    assert n == 1
    empty_ids, empty_mask, n0 = clip_sequences([], 32, tokenizer=tok)
    assert empty_ids.shape == empty_mask.shape == (0, 32) and n0 == 0


def test_bad_arguments(tok):
    with pytest.raises(JaxprvrError, match="max_words"):
        clip_sequences(["x"], 0, tokenizer=tok)
    with pytest.raises(JaxprvrError, match="single string"):
        clip_sequences("a caption", 32, tokenizer=tok)
    with pytest.raises(JaxprvrError, match=r"captions\[1\]"):
        clip_sequences(["ok", None], 32, tokenizer=tok)
    with pytest.raises(JaxprvrError, match="unknown symbol"):
        tok.convert_tokens_to_ids(["not-a-symbol"])


# -- decode -------------------------------------------------------------------------------------------
def test_decode_round_trip_on_normalised_text(tok):
    assert tok.decode(tok.encode(KNOWN)) == KNOWN + " "
    checked = 0
    for c in CASES:
        # normalised: cleaned, one space between pre-tokens (decode writes a space after every word end)
        pieces = tok._pattern.findall(tok.clean(c["text"]))
        norm = " ".join(pieces)
        if not norm or tok.clean(norm) != norm:  # cleaning not idempotent on this text: not normalised
            continue
        expect = "".join(p if p in (SOT, EOT) else p + " " for p in pieces)  # the specials carry no </w>
        assert tok.decode(tok.encode(norm)) == expect, repr(c["text"])
        checked += 1
    assert checked >= 40
    assert tok.decode([SOT_ID, EOT_ID]) == SOT + EOT
    assert tok.decode([tok.encoder[clip_bpe.byte_symbols()[0xC3]]]) == "\ufffd"  # a lone UTF-8 lead byte


# -- the vendored vocabulary and the dependencies ---------------------------------------------------
def test_vendored_vocab_file():
    raw = clip_bpe.VOCAB_FILE.read_bytes()
    assert len(raw) == 1356917
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    assert lines[0].startswith("\"bpe_simple_vocab_16e6.txt#version") and len(lines) > 1 + 48894
    assert (clip_bpe.VOCAB_FILE.parent / "LICENSE-CLIP-BPE").read_text().count("Copyright (c) 2021 OpenAI") == 1


def test_corrupted_vocab_is_refused(tmp_path):
    bad = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    shutil.copyfile(clip_bpe.VOCAB_FILE, bad)
    data = bytearray(bad.read_bytes())
    data[1000] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(JaxprvrError) as err:
        ClipTokenizer(bad)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and f"sha256 {clip_bpe.VOCAB_SHA256}" in msg and "found sha256" in msg
    with pytest.raises(JaxprvrError, match="unreadable"):
        ClipTokenizer(tmp_path / "missing.txt.gz")


@pytest.mark.parametrize("missing", ["ftfy", "regex"])
def test_missing_dependency_is_one_clear_error(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    with pytest.raises(JaxprvrError, match=f"'{missing}' package"):
        ClipTokenizer()


# -- live cross-check against OpenAI's simple_tokenizer.py from the clip-anytorch wheel (scripts/setup.sh) -----
def _openai_tokenizer():
    from tests.openai_clip import openai_clip_module

    return openai_clip_module("simple_tokenizer").SimpleTokenizer()


def test_random_strings_match_openai_live(tok):
    import random

    ref = _openai_tokenizer()
    rng = random.Random(0)
    words = [w.replace("</w>", "") for w in list(tok.encoder)[512:SOT_ID:97]]
    pool = ("abcxyzABCXYZ0189 .,;:!?'\"-&#<>|()/\\\t\n\x0b\x0c\r\x1c\x1f\x85\xa0\u1680\u180e\u2000\u2028\u200b\u3000"
            "\ufeff\x00\x1béÃ©â€œ™Ã ¡Âµİıßñ中文日本한😀👍🏽❤️\u0301\ufb01\uff21Ⅻ½²①٣")
    extras = ["&amp;", "&amp;amp;", "&lt;", "&quot;", "&#39;", "&nbsp;", SOT, EOT, "'s", "'LL", "n't"]
    for _ in range(1500):
        parts = []
        for _ in range(rng.randint(0, 10)):
            r = rng.random()
            parts.append(rng.choice(words) if r < 0.5 else rng.choice(extras) if r < 0.6
                         else "".join(rng.choice(pool) for _ in range(rng.randint(1, 5))))
        text = rng.choice(["", " ", "  "]).join(parts)
        ids = ref.encode(text)
        assert tok.encode(text) == ids, repr(text)
        assert tok.decode(ids) == ref.decode(ids), repr(text)
