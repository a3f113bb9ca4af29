"""MESM's GloVe side: the ``*_tokenized_count.txt`` vocabulary files, the GloVe vocabulary, GloVe text files and
CPL's ``glove.pkl`` (lntzm/MESM @ 8501bdea).

Count files (``data/tokenized_count.py L76-128``): one line per token, most frequent first (train + test queries),
fields separated by one space:

* ``CLIP_tokenized_count.txt``: ``<BPE id> <count>`` (ids of the tokens between SOT and EOT).
* ``GloVe_tokenized_count.txt``: ``<word> <vocabulary id> <count>``; the words come from a lowercase,
  punctuation-to-space, whitespace split (``tokenized_count.py L9-18``), the ids from the ``Vocabulary`` built on
  the same word set.

Vocabulary (``dataset/tokenizer.py Vocabulary`` L217-248, built by ``runner.py build_vocab`` L25-34 from the
**first field of every line** of ``GloVe_tokenized_count.txt``): ``<PAD>`` = 0, ``<UNK>`` = 1, then the words in
``sorted`` (code point) order from 2.

GloVe text files (``model/text_encoder.py GloVe`` L397-429): each line is ``str.split()``; the key is
``" ".join(fields[:-300])`` (a key can contain spaces), the vector the last 300 fields as float32; a later line
overwrites an earlier key. ``<PAD>`` is then set to zeros and ``<UNK>`` to ``torch.randn(300)``.

Embedding (``GloveTextEncoder`` L432-445): row ``wtoi[w]`` = the GloVe vector of ``w``, or the ``<UNK>`` vector when
``w`` is not in the file -- so out-of-vocabulary ids (1) *and* vocabulary words missing from GloVe share one vector.

**Deviation (documented):** the official ``<UNK>`` vector is a fresh ``torch.randn`` at every model build and is
never saved (the text encoder's keys are dropped from checkpoints), so official GloVe evaluation is
nondeterministic whenever a query word maps to it. Here it is drawn from a seeded numpy generator (or passed in)
and returned, so the caller saves it with the model.

Streaming: :func:`read_glove_txt` reads line by line and parses the vector only for the words asked for; a line is
split in full only when its first field is the first token of a wanted word (exact: the key's first token is the
line's first field).

``glove.pkl`` (CPL's, ``runner.py build_vocab_from_pkl`` L37-41): a dict with ``counter``
(``collections.Counter`` of words), ``w2id`` (word -> row) and ``id2vec`` (rows of 300-d vectors). It is read with a
restricted unpickler: numpy arrays / dtypes / scalars, ``collections.Counter`` / ``OrderedDict`` /
``defaultdict`` and plain builtin containers and scalars; any other global is refused with a JaxprvrError.
"""

from __future__ import annotations

import collections
import importlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from jaxprvr.errors import JaxprvrError

GLOVE_DIM = 300
PAD = "<PAD>"
UNK = "<UNK>"
PAD_ID = 0
UNK_ID = 1


# ----------------------------------------------------------------------------------------------- count files

@dataclass(frozen=True)
class CountFile:
    """A ``{CLIP,GloVe}_tokenized_count.txt`` file, in file order.

    ``kind`` "CLIP": ``keys`` are BPE ids, ``ids`` is None. ``kind`` "GloVe": ``keys`` are words, ``ids`` the
    vocabulary ids written in the file. ``counts``: the token counts.
    """

    path: str
    kind: str
    keys: tuple
    ids: tuple | None
    counts: tuple

    def __len__(self) -> int:
        return len(self.keys)


def _int_field(text: str, path, lineno: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise JaxprvrError(f"{path}:{lineno}", f"an integer {what}", repr(text)) from None


def read_count_file(path: str | os.PathLike, kind: str | None = None) -> CountFile:
    """Read a tokenized-count file (``kind`` "CLIP" = 2 fields, "GloVe" = 3 fields; None: from the first line).

    Fields are split on single spaces, as the official readers do (``base.py L60, L77``, ``runner.py L31``).
    Every line must have the kind's field count and integer id/count fields.
    """
    path = Path(path)
    if kind not in (None, "CLIP", "GloVe"):
        raise JaxprvrError("read_count_file.kind", "'CLIP', 'GloVe' or None", repr(kind))
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise JaxprvrError(path, "a tokenized-count file (CLIP_tokenized_count.txt / GloVe_tokenized_count.txt)",
                           f"an unreadable file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise JaxprvrError(path, "a UTF-8 text file", f"undecodable bytes at offset {e.start}") from None
    if not lines:
        raise JaxprvrError(path, "at least one '<token> [<id>] <count>' line", "an empty file")
    keys, ids, counts = [], [], []
    for lineno, line in enumerate(lines, 1):
        fields = line.rstrip("\n").split(" ")
        if kind is None:
            kind = "CLIP" if len(fields) == 2 else "GloVe" if len(fields) == 3 else None
            if kind is None:
                raise JaxprvrError(f"{path}:{lineno}", "'<BPE id> <count>' (CLIP) or '<word> <id> <count>' (GloVe)",
                                   repr(line.rstrip("\n")))
        want = 2 if kind == "CLIP" else 3
        if len(fields) != want or not fields[0]:
            form = "'<BPE id> <count>'" if kind == "CLIP" else "'<word> <id> <count>'"
            raise JaxprvrError(f"{path}:{lineno}", f"{form} ({kind} count file, single spaces)",
                               repr(line.rstrip("\n")))
        if kind == "CLIP":
            keys.append(_int_field(fields[0], path, lineno, "BPE id"))
        else:
            keys.append(fields[0])
            ids.append(_int_field(fields[1], path, lineno, "vocabulary id"))
        counts.append(_int_field(fields[-1], path, lineno, "count"))
    return CountFile(str(path), kind, tuple(keys), tuple(ids) if kind == "GloVe" else None, tuple(counts))


# ------------------------------------------------------------------------------------------------ vocabulary

class GloVeVocab:
    """The official ``Vocabulary``: ``<PAD>`` = 0, ``<UNK>`` = 1, then the distinct words in ``sorted`` order."""

    def __init__(self, words: Iterable[str]):
        distinct = set()
        for w in words:
            if not isinstance(w, str):
                raise JaxprvrError("GloVeVocab.words", "strings", type(w).__name__)
            distinct.add(w)
        for special in (PAD, UNK):
            if special in distinct:  # cannot come from the official count file (punctuation is split off)
                raise JaxprvrError("GloVeVocab.words", f"no word spelled {special}", f"{special}")
        self.itow: tuple[str, ...] = (PAD, UNK, *sorted(distinct))
        self.wtoi: dict[str, int] = {w: i for i, w in enumerate(self.itow)}

    @classmethod
    def from_count_file(cls, count: CountFile | str | os.PathLike) -> "GloVeVocab":
        """``runner.py build_vocab``: the word set of every line of ``GloVe_tokenized_count.txt``."""
        if not isinstance(count, CountFile):
            count = read_count_file(count, "GloVe")
        if count.kind != "GloVe":
            raise JaxprvrError(count.path, "a GloVe count file ('<word> <id> <count>')", "a CLIP count file")
        return cls(count.keys)

    def __len__(self) -> int:
        return len(self.itow)

    def id(self, word: str) -> int:
        """``wtoi.get(word, 1)`` (``tokenizer.py L327``)."""
        return self.wtoi.get(word, UNK_ID)

    def id_mismatches(self, count: CountFile) -> int:
        """How many count-file lines carry a vocabulary id different from this vocabulary's (0 for a file written
        by ``tokenized_count.py``; the MLM labels use the file's ids, as officially)."""
        return sum(1 for w, i in zip(count.keys, count.ids) if self.wtoi.get(w) != i)


# ------------------------------------------------------------------------------------------------ GloVe text

def read_glove_txt(path: str | os.PathLike, words: Sequence[str], dim: int = GLOVE_DIM):
    """Stream a GloVe text file and return ``(vectors, found)`` for ``words``.

    ``vectors``: float32 ``[len(words), dim]`` (zeros where not found); ``found``: bool ``[len(words)]``. Keys are
    ``" ".join(line.split()[:-dim])`` and a later line overwrites an earlier one, as ``text_encoder.py L421-428``.
    ``<PAD>`` and ``<UNK>`` are never taken from the file (the official code overwrites them after reading). A
    candidate line (its first field starts a wanted word) with fewer than ``dim + 1`` fields or a non-numeric
    value raises a JaxprvrError.
    """
    path = Path(path)
    words = list(words)
    want: dict[str, list[int]] = {}
    for i, w in enumerate(words):
        if w in (PAD, UNK):
            continue
        want.setdefault(w, []).append(i)
    heads = {w.split()[0] for w in want if w.split()}
    vectors = np.zeros((len(words), dim), np.float32)
    found = np.zeros(len(words), bool)
    try:
        f = open(path, "r", encoding="utf-8")
    except OSError as e:
        raise JaxprvrError(path, "a GloVe text file (e.g. glove.6B.300d.txt)",
                           f"an unreadable file ({e.strerror})") from None
    with f:
        lineno = 0
        try:
            for line in f:
                lineno += 1
                head = line.split(None, 1)
                if not head or head[0] not in heads:
                    continue
                split = line.split()
                if len(split) < dim + 1:
                    raise JaxprvrError(f"{path}:{lineno}", f"'<word> <{dim} numbers>'", f"{len(split)} fields")
                key = " ".join(split[:-dim])
                rows = want.get(key)
                if rows is None:
                    continue
                try:
                    vec = np.array(split[-dim:], dtype=np.float32)
                except ValueError:
                    raise JaxprvrError(f"{path}:{lineno}", f"{dim} numbers after the word {key!r}",
                                       "a non-numeric field") from None
                vectors[rows] = vec
                found[rows] = True
        except UnicodeDecodeError as e:
            raise JaxprvrError(f"{path}:{lineno + 1}", "UTF-8 text", f"undecodable bytes ({e.reason})") from None
    return vectors, found


@dataclass(frozen=True)
class GloVeEmbedding:
    """The frozen embedding table of ``GloveTextEncoder`` and what went into it.

    ``matrix``: float32 ``[len(vocab), dim]``; ``unk_vector``: float32 ``[dim]`` (row 1, shared by every vocabulary
    word missing from GloVe -- save it with the model); ``missing``: those words, in vocabulary order.
    """

    matrix: np.ndarray
    unk_vector: np.ndarray
    missing: tuple[str, ...]


def unk_vector_from_seed(seed: int, dim: int = GLOVE_DIM) -> np.ndarray:
    """The seeded stand-in for the official ``torch.randn(300)`` ``<UNK>`` vector: N(0, 1) float32."""
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def glove_embedding(vocab: GloVeVocab, vectors: np.ndarray, found: np.ndarray,
                    unk_vector: np.ndarray) -> GloVeEmbedding:
    """``GloveTextEncoder``'s table from per-vocabulary-word ``(vectors, found)`` (in ``vocab.itow`` order):
    row 0 (``<PAD>``) zeros, row 1 (``<UNK>``) and every not-found word ``unk_vector``, others their vector."""
    n = len(vocab)
    vectors = np.asarray(vectors, np.float32)
    found = np.asarray(found, bool)
    unk_vector = np.asarray(unk_vector, np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != n or found.shape != (n,):
        raise JaxprvrError("glove_embedding", f"vectors [{n}, dim] and found [{n}]",
                           f"{vectors.shape} and {found.shape}")
    if unk_vector.shape != (vectors.shape[1],) or not np.all(np.isfinite(unk_vector)):
        raise JaxprvrError("glove_embedding.unk_vector", f"a finite vector of shape ({vectors.shape[1]},)",
                           f"shape {unk_vector.shape}")
    matrix = np.where(found[:, None], vectors, unk_vector[None, :]).astype(np.float32)
    matrix[PAD_ID] = 0.0
    matrix[UNK_ID] = unk_vector
    missing = tuple(w for i, w in enumerate(vocab.itow) if i >= 2 and not found[i])
    return GloVeEmbedding(matrix, unk_vector.copy(), missing)


def build_glove_embedding(vocab: GloVeVocab, glove_path: str | os.PathLike, *, seed: int = 0,
                          unk_vector: np.ndarray | None = None, dim: int = GLOVE_DIM) -> GloVeEmbedding:
    """Read ``glove_path`` for the vocabulary and build the table; ``<UNK>`` = ``unk_vector`` if given (e.g. the
    one saved with a model), else :func:`unk_vector_from_seed` ``(seed)``."""
    vectors, found = read_glove_txt(glove_path, vocab.itow, dim)
    unk = unk_vector_from_seed(seed, dim) if unk_vector is None else unk_vector
    return glove_embedding(vocab, vectors, found, unk)


# ------------------------------------------------------------------------------------------------ glove.pkl

_SAFE_BUILTINS = frozenset({"set", "frozenset", "dict", "list", "tuple", "int", "float", "complex", "str", "bytes",
                            "bytearray", "bool", "slice", "range"})
_SAFE_GLOBALS = {
    ("collections", "Counter"): ("collections", "Counter"),
    ("collections", "OrderedDict"): ("collections", "OrderedDict"),
    ("collections", "defaultdict"): ("collections", "defaultdict"),
    ("_codecs", "encode"): ("_codecs", "encode"),  # bytes in protocol-2 pickles
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    for _name in ("_reconstruct", "scalar"):
        _SAFE_GLOBALS[(_mod, _name)] = ("multiarray", _name)
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _SAFE_GLOBALS[(_mod, "_frombuffer")] = ("numeric", "_frombuffer")


def _numpy_core(sub: str):
    for name in (f"numpy._core.{sub}", f"numpy.core.{sub}"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(sub)


class _RestrictedUnpickler(pickle.Unpickler):
    where = "glove.pkl"

    def find_class(self, module, name):
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(importlib.import_module("builtins"), name)
        if name.startswith("Float") and name.endswith("DType") and module == "numpy.dtypes":
            return getattr(importlib.import_module("numpy.dtypes"), name)
        target = _SAFE_GLOBALS.get((module, name))
        if target is None:
            raise JaxprvrError(self.where, "a pickle of numpy arrays, collections.Counter and builtin containers "
                               "(CPL's glove.pkl: counter, w2id, id2vec)",
                               f"a reference to {module}.{name}, which is refused (unpickling it could run code)")
        mod, attr = target
        if mod in ("multiarray", "numeric"):
            return getattr(_numpy_core(mod), attr)
        return getattr(importlib.import_module(mod), attr)


def restricted_load(data: bytes, where: str = "pickle", encoding: str = "ASCII"):
    """Unpickle ``data`` allowing only numpy arrays/dtypes/scalars, collections containers and builtin types
    (``encoding``: how Python 2 ``str`` objects are decoded, as ``pickle.Unpickler``'s)."""
    up = _RestrictedUnpickler(io.BytesIO(data), encoding=encoding)
    up.where = str(where)
    try:
        return up.load()
    except JaxprvrError:
        raise
    except Exception as e:  # truncated or corrupt data
        raise JaxprvrError(where, "a readable pickle", f"{type(e).__name__}: {e}") from None


def read_glove_pkl(path: str | os.PathLike) -> dict:
    """CPL's ``glove.pkl`` as a dict ``{"counter": Counter, "w2id": {word: row}, "id2vec": rows}``, read with the
    restricted unpickler and checked: every ``w2id`` row indexes ``id2vec`` and gives a 1-D numeric vector, all of
    one width."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JaxprvrError(path, "CPL's glove.pkl", f"an unreadable file ({e.strerror})") from None
    obj = restricted_load(data, str(path))
    if not isinstance(obj, dict) or not {"counter", "w2id", "id2vec"} <= set(obj):
        found = f"a dict with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else type(obj).__name__
        raise JaxprvrError(path, "a dict with keys 'counter', 'w2id', 'id2vec'", found)
    counter, w2id, id2vec = obj["counter"], obj["w2id"], obj["id2vec"]
    if not isinstance(counter, collections.Counter):
        raise JaxprvrError(f"{path}['counter']", "a collections.Counter", type(counter).__name__)
    if not isinstance(w2id, dict):
        raise JaxprvrError(f"{path}['w2id']", "a dict word -> row", type(w2id).__name__)
    width = None
    for w, i in w2id.items():
        try:
            vec = np.asarray(id2vec[i])
        except (IndexError, KeyError, TypeError):
            raise JaxprvrError(f"{path}['w2id'][{w!r}]", "a row index of id2vec", repr(i)) from None
        if vec.ndim != 1 or not np.issubdtype(vec.dtype, np.number):
            raise JaxprvrError(f"{path}['id2vec'][{i!r}]", "a 1-D numeric vector", f"{vec.dtype} {vec.shape}")
        if width is None:
            width = vec.shape[0]
        elif vec.shape[0] != width:
            raise JaxprvrError(f"{path}['id2vec'][{i!r}]", f"{width} values (as the other rows)", f"{vec.shape[0]}")
    return obj


__all__ = ["GLOVE_DIM", "PAD", "UNK", "PAD_ID", "UNK_ID", "CountFile", "read_count_file", "GloVeVocab",
           "read_glove_txt", "GloVeEmbedding", "unk_vector_from_seed", "glove_embedding", "build_glove_embedding",
           "restricted_load", "read_glove_pkl"]
