"""Reading and writing ``.pt`` files that hold one tensor, without importing torch.

MRNet's query features are one ``torch.save``-d tensor per query, ``(1, 768)`` (DistilBERT, wav2vec2) or
``(1, 1, 768)`` (AST, UniSpeech-SAT) (xian-sh/MRNet ``preprocess/text_encode.py`` L92,
``preprocess/audio_encode.py`` L24-147). Since torch 1.6 ``torch.save`` writes a zip archive::

    <prefix>/data.pkl        pickle: torch._utils._rebuild_tensor_v2(<persistent storage>, offset, size, stride,
                             requires_grad, collections.OrderedDict(), [metadata])
    <prefix>/data/<key>      the raw bytes of storage <key>
    <prefix>/byteorder       "little" | "big" (absent in old files: little)
    <prefix>/version         "3\\n"

:func:`read_pt_tensor` reads such a file with a restricted unpickler: only ``_rebuild_tensor_v2``,
``collections.OrderedDict`` and the float storage types may be named; anything else (a dict, a module, an
arbitrary callable) is refused, so reading a file cannot run code. :func:`write_pt_tensor` writes the same
layout in pure Python (the synthetic generator uses it; ``torch.load`` reads the result).

The legacy (pre-1.6, non-zip) format is not read: re-save the file with torch >= 1.6
(``torch.save(torch.load(f), f)``).
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from jaxprvr.errors import JaxprvrError

# torch storage class name -> numpy dtype (the formats the feature extractors produce).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "DoubleStorage": np.dtype(np.float64),
}
_DTYPE_STORAGES = {v: k for k, v in STORAGE_DTYPES.items()}


class _StorageType:
    """Stands in for ``torch.<X>Storage`` inside the pickle."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """A storage resolved from the archive: its numpy dtype and raw bytes."""

    def __init__(self, dtype: np.dtype, data: bytes, numel: int):
        self.dtype = dtype
        self.data = data
        self.numel = numel


class _TensorSpec:
    """What ``_rebuild_tensor_v2`` was called with."""

    def __init__(self, storage, offset, size, stride, *rest):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _TensorSpec(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._path = path
        self._archive = archive
        self._prefix = prefix
        self._byteorder = byteorder

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise JaxprvrError(self._path, "a .pt file holding one float16/32/64 tensor",
                           f"a pickle that names {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel) (torch/serialization.py, persistent_id).
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise JaxprvrError(self._path, "a persistent id ('storage', <FloatStorage|...>, key, location, numel)",
                               repr(pid)[:120])
        _, storage_type, key, _location, numel = pid
        name = f"{self._prefix}data/{key}"
        try:
            data = self._archive.read(name)
        except KeyError:
            raise JaxprvrError(self._path, f"an archive member {name}", "none") from None
        dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
        if len(data) < int(numel) * dtype.itemsize:
            raise JaxprvrError(self._path, f"{numel} elements of {storage_type.name} in {name}",
                               f"{len(data)} bytes")
        return _Storage(dtype, data, int(numel))


def _prefix_of(archive: zipfile.ZipFile, path: Path) -> str:
    for name in archive.namelist():
        if name.endswith("data.pkl") and name.count("/") == 1:
            return name[: -len("data.pkl")]
    raise JaxprvrError(path, "a torch zip archive with <prefix>/data.pkl", f"members {archive.namelist()[:5]}")


def _unpickle(path: Path, unpickler, expected: str, errors: tuple):
    """``<prefix>/data.pkl`` of the torch-zip archive ``path`` through ``unpickler`` (storages resolved from the
    archive in its byte order); a damaged archive or pickle is one error naming the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _prefix_of(archive, path)
            byteorder = "little"
            if f"{prefix}byteorder" in set(archive.namelist()):
                byteorder = archive.read(f"{prefix}byteorder").decode("ascii").strip()
                if byteorder not in ("little", "big"):
                    raise JaxprvrError(path, "byteorder 'little' or 'big'", repr(byteorder))
            pkl = archive.read(f"{prefix}data.pkl")
            return unpickler(io.BytesIO(pkl), path, archive, prefix, byteorder).load()
    except errors as e:
        raise JaxprvrError(path, expected, f"{type(e).__name__}: {e}") from None


def read_pt_tensor(path: str | os.PathLike) -> np.ndarray:
    """The one tensor of a torch-zip ``.pt`` file as a numpy array of its dtype (float16/32/64), any shape.

    Honours the storage offset, size and stride (a saved view of a larger storage, contiguous or not) and the
    archive's byte order; the result is a fresh native-endian array equal to ``torch.load(path).numpy()``.
    """
    path = Path(path)
    if not path.is_file():
        raise JaxprvrError(path, "a query feature file (.pt)", "no such file")
    if not zipfile.is_zipfile(path):
        raise JaxprvrError(path, "a torch-zip .pt file (torch.save of torch >= 1.6)",
                           "the legacy non-zip format",
                           hint="re-save it with torch >= 1.6: torch.save(torch.load(f), f)")
    spec = _unpickle(path, _RestrictedUnpickler, "a readable torch-zip .pt file",
                     (zipfile.BadZipFile, pickle.UnpicklingError, EOFError))
    if not isinstance(spec, _TensorSpec) or not isinstance(spec.storage, _Storage):
        raise JaxprvrError(path, "a .pt file holding one tensor", f"a pickled {type(spec).__name__}")
    return _view(spec, path)


def _view(spec: _TensorSpec, path: Path) -> np.ndarray:
    storage = spec.storage
    size = tuple(int(s) for s in spec.size)
    stride = tuple(int(s) for s in spec.stride)
    offset = int(spec.offset)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise JaxprvrError(path, "a tensor with non-negative size, stride and offset",
                           f"size {size}, stride {stride}, offset {offset}")
    flat = np.frombuffer(storage.data, dtype=storage.dtype, count=storage.numel)
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype.newbyteorder("="))
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= storage.numel:
        raise JaxprvrError(path, f"a view inside its storage of {storage.numel} elements",
                           f"size {size}, stride {stride}, offset {offset} (reaching element {last})")
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                           strides=tuple(st * flat.itemsize for st in stride), writeable=False)
    return np.array(view, dtype=storage.dtype.newbyteorder("="), order="C")  # a copy; keeps 0-d as 0-d


def _pickle_tensor(storage_name: str, numel: int, shape: tuple, stride: tuple) -> bytes:
    """The ``data.pkl`` of one contiguous tensor at offset 0, opcode for opcode as torch writes it."""
    out = io.BytesIO()

    def op(b: bytes):
        out.write(b)

    def global_(module: str, name: str):
        op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def unicode(s: str):
        data = s.encode("utf-8")
        op(b"X" + len(data).to_bytes(4, "little") + data)

    def int_(v: int):
        if 0 <= v < 256:
            op(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            op(b"M" + v.to_bytes(2, "little"))
        else:
            op(b"J" + int(v).to_bytes(4, "little", signed=True))

    def tuple_(values):
        op(b"(")
        for v in values:
            int_(v)
        op(b"t")

    op(b"\x80\x02")  # PROTO 2
    global_("torch._utils", "_rebuild_tensor_v2")
    op(b"(")  # MARK: the arguments
    op(b"(")  # MARK: the persistent id
    unicode("storage")
    global_("torch", storage_name)
    unicode("0")
    unicode("cpu")
    int_(numel)
    op(b"t")  # TUPLE
    op(b"Q")  # BINPERSID
    int_(0)  # storage offset
    tuple_(shape)
    tuple_(stride)
    op(b"\x89")  # NEWFALSE: requires_grad
    global_("collections", "OrderedDict")
    op(b")R")  # EMPTY_TUPLE, REDUCE: OrderedDict()
    op(b"t")  # TUPLE of the arguments
    op(b"R")  # REDUCE: the call
    op(b".")  # STOP
    return out.getvalue()


def write_pt_tensor(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes ``array`` (float16/32/64, any shape) as a torch-zip ``.pt`` that ``torch.load`` reads back equal.

    The archive holds ``<stem>/data.pkl``, ``<stem>/byteorder`` ("little"), ``<stem>/data/0`` (the C-order
    little-endian bytes) and ``<stem>/version`` ("3"), stored uncompressed, as ``torch.save`` does.
    """
    path = Path(path)
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("=")
    if dtype not in _DTYPE_STORAGES:
        raise JaxprvrError("write_pt_tensor", "a float16/float32/float64 array", str(array.dtype))
    shape = tuple(int(s) for s in array.shape)
    stride = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
    prefix = path.stem or "archive"
    pkl = _pickle_tensor(_DTYPE_STORAGES[dtype], int(array.size), shape, stride)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", pkl)
        archive.writestr(f"{prefix}/byteorder", "little")
        archive.writestr(f"{prefix}/data/0", array.astype(dtype.newbyteorder("<")).tobytes(order="C"))
        archive.writestr(f"{prefix}/version", "3\n")


# ---------------------------------------------------------------------------------------------- state dicts
# More storage types for whole checkpoints (int64 num_batches_tracked, bool masks, bfloat16 weights).
STATE_STORAGE_DTYPES = {**STORAGE_DTYPES, "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
                        "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
                        "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_)}
# TorchScript's list builders (torch/jit/_pickle.py): plain lists in, plain lists out.
_JIT_LIST_BUILDERS = ("build_intlist", "build_floatlist", "build_boollist", "build_tensorlist",
                      "build_doublelist")


class _ModuleBag:
    """A ``__torch__.*`` object of a TorchScript archive, read as a bag of attributes (no code is loaded)."""

    qualname = ""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"a {self.qualname} whose state is a {type(state).__name__}, not a dict")
        self.attrs = state


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


class _StateUnpickler(_RestrictedUnpickler):
    """The restricted unpickler of :func:`read_state_dict`: tensors (``_rebuild_tensor_v2``, ``_rebuild_parameter``,
    the storages of ``STATE_STORAGE_DTYPES``), ``OrderedDict``, TorchScript's list builders and ``__torch__.*``
    module objects as attribute bags. Anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in STATE_STORAGE_DTYPES:
            return _StateStorageType(name)
        if module == "torch.jit._pickle" and name in _JIT_LIST_BUILDERS:
            return list
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, _tag: value
        if module.startswith("__torch__"):
            return type(name, (_ModuleBag,), {"qualname": f"{module}.{name}"})
        raise JaxprvrError(self._path, "a torch checkpoint of tensors (a state dict or a TorchScript module)",
                           f"a pickle that names {module}.{name}")


class _StateStorageType(_StorageType):
    def __init__(self, name: str):
        self.name = name
        self.dtype = STATE_STORAGE_DTYPES[name]


def _collect(obj, prefix: str, out: "OrderedDict", path: Path, skipped: list) -> None:
    """Every tensor of a (nested) mapping or TorchScript module object, by dotted name, in pickle order."""
    items = obj.attrs.items() if isinstance(obj, _ModuleBag) else obj.items()
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, _TensorSpec):
            out[name] = _view(v, path)
        elif isinstance(v, (_ModuleBag, dict)):
            _collect(v, name + ".", out, path, skipped)
        else:
            skipped.append(name)  # a flag (training), a size, None (an absent bias): not a tensor


def read_state_dict(path: str | os.PathLike) -> "OrderedDict[str, np.ndarray]":
    """All tensors of a torch-zip checkpoint as numpy arrays by ``state_dict`` name, without importing torch and
    without running code from the file: a ``torch.save``-d state dict (a mapping of tensors, nested mappings
    flattened with dots) or a TorchScript archive (``torch.jit.save``; OpenAI's CLIP ``.pt`` files), whose module
    objects are read as attribute bags (the tensors under their attribute paths = ``state_dict()`` names;
    non-tensor attributes skipped). A pickle naming anything else fails with one error naming the file and the
    global; :func:`read_state_dict_any` falls back to torch for such files when torch is installed."""
    path = Path(path)
    if not path.is_file():
        raise JaxprvrError(path, "a torch checkpoint file", "no such file")
    if not zipfile.is_zipfile(path):
        raise JaxprvrError(path, "a torch-zip checkpoint (torch.save / torch.jit.save of torch >= 1.6)",
                           "not a zip archive (the legacy format, or not a torch file)")
    root = _unpickle(path, _StateUnpickler, "a readable torch-zip checkpoint",
                     (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, AttributeError, TypeError))
    if isinstance(root, _TensorSpec):
        raise JaxprvrError(path, "a checkpoint of named tensors", "a single tensor (use read_pt_tensor)")
    if not isinstance(root, (dict, _ModuleBag)):
        raise JaxprvrError(path, "a state dict or a TorchScript module", f"a pickled {type(root).__name__}")
    out: OrderedDict = OrderedDict()
    _collect(root, "", out, path, [])
    if not out:
        raise JaxprvrError(path, "a checkpoint with at least one tensor", "none")
    return out


def read_state_dict_any(path: str | os.PathLike) -> "OrderedDict[str, np.ndarray]":
    """:func:`read_state_dict`, falling back -- only when the restricted reader refuses the pickle and torch is
    installed -- to ``torch.jit.load(...).state_dict()`` and then ``torch.load(weights_only=True)`` (the official
    loaders' order, ``modeling.py`` L41-46)."""
    try:
        return read_state_dict(path)
    except JaxprvrError as first:
        if "a pickle that names" not in str(first):
            raise
        try:
            import torch
        except ImportError:
            raise first from None
        try:
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception:  # noqa: BLE001 - not TorchScript: the plain loader decides
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise JaxprvrError(path, "a checkpoint torch can load (TorchScript or weights_only)",
                                   f"{type(e).__name__}: {str(e)[:200]}") from None
        def as_array(v):  # bfloat16 kept (ml_dtypes), everything else as torch holds it
            v = v.detach().cpu()
            if v.dtype == torch.bfloat16:
                import ml_dtypes

                return v.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
            return v.numpy().copy()

        return OrderedDict((k, as_array(v)) for k, v in sd.items() if hasattr(v, "shape"))


__all__ = ["read_pt_tensor", "write_pt_tensor", "read_state_dict", "read_state_dict_any", "STORAGE_DTYPES",
           "STATE_STORAGE_DTYPES"]
