"""OpenAI CLIP's byte-level BPE tokenizer and BackBone_tvr's caption layout.

Behaviour matches openai/CLIP ``clip/simple_tokenizer.py`` (commit d05afc4) and the BackBone_tvr
copy of it (``tvr/models/tokenization_clip.py``, which adds ``tokenize``/``convert_tokens_to_ids``);
the code here is jaxprvr's own.

* Cleaning: ``ftfy.fix_text``, ``html.unescape`` twice, ``strip``, every run of ``\\s`` (the ``regex``
  module's definition) to one space, ``strip``, ``lower``.
* Pre-tokenising: the CLIP pattern below (``regex`` module, IGNORECASE).
* Each piece is UTF-8 encoded, its bytes spelled with the reversible byte -> printable character
  table, and merged by the BPE ranks of the vocabulary file; the last symbol carries ``</w>``.
* Ids: 256 byte symbols, their 256 ``</w>`` forms, one id per merge (48,894), then
  ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407: 49,408 in all.

The ftfy release matters for mojibake: ftfy 5.8 (the release of CLIP's publication, and the one
BackBone_tvr's README pins) and later releases disagree on inputs such as ``"voilÃ  le travail"``.
The golden test pins 5.8.

:func:`clip_sequences` lays captions out as BackBone_tvr's ``RetrievalDataset._get_text`` does:
``[SOT] + tokens`` cut to ``max_words - 1`` entries (SOT included), then ``EOT``, then 0-padding to
``max_words``; the mask is 1 on SOT..EOT and 0 on the padding. It reports how many captions lost
tokens to the cut.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from jaxprvr.errors import JaxprvrError

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # the official slice lines[1 : 49152-256-2+1]
VOCAB_SIZE = 2 * 256 + N_MERGES + 2  # 49408
SOT_ID = VOCAB_SIZE - 2  # 49406
EOT_ID = VOCAB_SIZE - 1  # 49407

PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
           r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")

_WHERE = "jaxprvr.text.clip_bpe"


def _deps():
    """``(ftfy, regex)``, imported on first use; a JaxprvrError naming the missing package."""
    try:
        import ftfy
    except ImportError:
        raise JaxprvrError(_WHERE, "the 'ftfy' package (pip install ftfy==5.8)", "it is not installed") from None
    try:
        import regex
    except ImportError:
        raise JaxprvrError(_WHERE, "the 'regex' package (pip install regex)", "it is not installed") from None
    return ftfy, regex


_PRINTABLE = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # '!'..'~', '¡'..'¬', '®'..'ÿ'


@functools.lru_cache(maxsize=None)
def byte_symbols() -> tuple[str, ...]:
    """The printable character standing for each byte value 0..255 (index = byte).

    The 188 bytes that are printable Latin-1 characters stand for themselves; the other 68 take
    U+0100, U+0101, ... in increasing byte order.
    """
    table, spare = [], 0x100
    printable = set(_PRINTABLE)
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(spare))
            spare += 1
    return tuple(table)


def byte_symbol_order() -> list[str]:
    """The byte symbols in vocabulary order (ids 0..255): the printable bytes first, then the rest."""
    table = byte_symbols()
    printable = set(_PRINTABLE)
    return [table[b] for b in _PRINTABLE] + [table[b] for b in range(256) if b not in printable]


def _read_vocab(path: str | os.PathLike) -> list[tuple[str, str]]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise JaxprvrError(path, "the CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz)", f"an unreadable file ({e.strerror})") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != VOCAB_SHA256:
        raise JaxprvrError(path, f"sha256 {VOCAB_SHA256} (OpenAI's bpe_simple_vocab_16e6.txt.gz)",
                           f"sha256 {digest} ({len(raw)} bytes)")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # line 0 is the "#version" header; the official tokenizer keeps the next N_MERGES lines
    return [tuple(line.split()) for line in lines[1:1 + N_MERGES]]


class ClipTokenizer:
    """CLIP's BPE tokenizer: ``encode``/``decode`` ids, ``tokenize`` to BPE symbols, ``convert_tokens_to_ids``.

    BPE results are cached per pre-token, like the official tokenizer.
    """

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        self._ftfy, self._regex = _deps()
        merges = _read_vocab(VOCAB_FILE if vocab_path is None else vocab_path)
        self.byte_to_char = byte_symbols()
        self.char_to_byte = {c: b for b, c in enumerate(self.byte_to_char)}
        first = byte_symbol_order()
        symbols = first + [c + "</w>" for c in first]
        symbols += ["".join(m) for m in merges]
        symbols += [SOT, EOT]
        if len(symbols) != VOCAB_SIZE:
            raise JaxprvrError(_WHERE, f"{VOCAB_SIZE} symbols", f"{len(symbols)}")
        # dict building keeps the last id / rank of a repeated key, as the official dict(zip(...)) does
        self.encoder = {s: i for i, s in enumerate(symbols)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {m: r for r, m in enumerate(merges)}
        self._cache: dict[str, str] = {SOT: SOT, EOT: EOT}
        self._pattern = self._regex.compile(PATTERN, self._regex.IGNORECASE)
        self._spaces = self._regex.compile(r"\s+")

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    # -- text -> pieces --------------------------------------------------------------------------
    def clean(self, text: str) -> str:
        """The official basic_clean + whitespace_clean + lower."""
        text = self._ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return self._spaces.sub(" ", text).strip().lower()

    def pieces(self, text: str) -> list[str]:
        """The pre-tokens of ``text`` (after cleaning), each spelled in byte symbols."""
        table = self.byte_to_char
        return ["".join(table[b] for b in p.encode("utf-8")) for p in self._pattern.findall(self.clean(text))]

    def bpe(self, piece: str) -> str:
        """Space-separated BPE symbols of one byte-spelled pre-token (the last one ends in ``</w>``)."""
        hit = self._cache.get(piece)
        if hit is not None:
            return hit
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        if len(word) == 1:
            return word[0]  # the official returns single symbols without caching them
        ranks, none = self.ranks, len(self.ranks)
        while len(word) > 1:
            best, pair = none, None
            for a, b in zip(word, word[1:]):
                r = ranks.get((a, b), none)
                if r < best:
                    best, pair = r, (a, b)
            if pair is None:
                break
            a, b = pair
            merged, i, n = [], 0, len(word)
            while i < n:  # merge every occurrence, left to right, without overlap
                if i + 1 < n and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        self._cache[piece] = out
        return out

    # -- public API ------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """BPE symbol strings of ``text`` (BackBone_tvr's ``tokenize``)."""
        out: list[str] = []
        for p in self.pieces(text):
            out.extend(self.bpe(p).split(" "))
        return out

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        try:
            return [self.encoder[t] for t in tokens]
        except KeyError as e:
            raise JaxprvrError(_WHERE, "BPE symbols of the CLIP vocabulary", f"unknown symbol {e.args[0]!r}") from None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without SOT/EOT (the official ``encode``)."""
        return self.convert_tokens_to_ids(self.tokenize(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: each ``</w>`` becomes a space; invalid UTF-8 becomes U+FFFD."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        data = bytes(self.char_to_byte[c] for c in chars)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache(maxsize=4)
def load_tokenizer(vocab_path: str | None = None) -> ClipTokenizer:
    """A shared :class:`ClipTokenizer` (the vendored vocabulary unless ``vocab_path`` is given)."""
    return ClipTokenizer(vocab_path)


def clip_sequences(captions: Sequence[str], max_words: int = 32, tokenizer: ClipTokenizer | None = None):
    """BackBone_tvr's ``_get_text`` for each caption: ``(ids, mask, n_truncated)``.

    ``ids`` and ``mask`` are int32 ``[N, max_words]``: ``[SOT] + tokens`` cut to ``max_words - 1``
    entries (SOT counts), then EOT, then 0 to the end; the mask is 1 up to and including EOT.
    ``n_truncated`` is the number of captions the cut shortened (the official
    ``len(words) > max_words - 1`` branch): for ``max_words >= 2``, those with more than
    ``max_words - 2`` BPE tokens.
    """
    if isinstance(captions, str):
        raise JaxprvrError("clip_sequences.captions", "a sequence of caption strings", "a single string")
    if isinstance(max_words, bool) or not isinstance(max_words, (int, np.integer)) or max_words < 1:
        raise JaxprvrError("clip_sequences.max_words", "an integer >= 1", repr(max_words))
    max_words = int(max_words)
    tok = load_tokenizer() if tokenizer is None else tokenizer
    keep = max_words - 1  # entries kept before EOT, SOT included
    ids = np.zeros((len(captions), max_words), np.int32)
    lengths = np.empty(len(captions), np.int64)
    n_truncated = 0
    for row, text in enumerate(captions):
        if not isinstance(text, str):
            raise JaxprvrError(f"clip_sequences.captions[{row}]", "a string", type(text).__name__)
        seq = [SOT_ID] + tok.encode(text)
        if len(seq) > keep:
            n_truncated += 1
            seq = seq[:keep]
        seq.append(EOT_ID)
        ids[row, :len(seq)] = seq
        lengths[row] = len(seq)
    mask = (np.arange(max_words)[None, :] < lengths[:, None]).astype(np.int32)
    return ids, mask, n_truncated
