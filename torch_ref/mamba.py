"""The official ``mamba_ssm`` Mamba-1 layer, importable on CPU and on CUDA (scripts/setup.sh installs it).

On a CUDA build, :func:`load` simply imports ``mamba_ssm``. On a CPU-only install (``MAMBA_SKIP_CUDA_BUILD=TRUE
... pip install --no-build-isolation --no-deps mamba_ssm causal_conv1d einops``, as ``scripts/setup.sh`` does)
the package ``__init__`` fails on the missing CUDA extension ``selective_scan_cuda``. :func:`load` then imports
only what Mamba-1 needs:

* it registers an empty ``selective_scan_cuda`` module and the ``mamba_ssm`` package without running its
  ``__init__`` (which would also pull in the Mamba2/Mamba3 Triton kernels), plus a stub
  ``mamba_ssm.ops.triton.layer_norm`` (``_layer_norm_fwd = None``, used only by fused kernels);
* it points ``mamba_simple.selective_scan_fn`` at ``selective_scan_interface.selective_scan_ref``, mamba_ssm's own
  PyTorch reference scan; the depthwise causal conv falls back to ``nn.Conv1d`` when causal_conv1d has no
  extension.

``Mamba(d_model, d_state, d_conv, expand, use_fast_path=False)`` then runs forward and backward on CPU with the
official module, parameters and init.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MambaRef:
    Mamba: Any  # mamba_ssm.modules.mamba_simple.Mamba
    selective_scan_ref: Any  # mamba_ssm.ops.selective_scan_interface.selective_scan_ref
    cuda_kernels: bool  # True when the official CUDA selective scan is in use


_LOADED: MambaRef | None = None


class MambaUnavailable(ImportError):
    pass


def _cuda_extension_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and importlib.util.find_spec("selective_scan_cuda") is not None
    except (ImportError, ValueError):
        return False


def load() -> MambaRef:
    """The official Mamba class and reference scan (cached). Raises :class:`MambaUnavailable` with the
    install command when mamba_ssm is not installed."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        raise MambaUnavailable(
            "mamba_ssm is not installed: MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE "
            "MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps "
            "mamba_ssm causal_conv1d einops (CPU), or build it with CUDA (GPU)")
    if _cuda_extension_present():
        from mamba_ssm.modules.mamba_simple import Mamba
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

        _LOADED = MambaRef(Mamba, selective_scan_ref, cuda_kernels=True)
        return _LOADED
    if "mamba_ssm" not in sys.modules:
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["mamba_ssm"] = pkg
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    if "mamba_ssm.ops.triton.layer_norm" not in sys.modules:
        stub = types.ModuleType("mamba_ssm.ops.triton.layer_norm")
        stub._layer_norm_fwd = None
        stub.RMSNorm = stub.layer_norm_fn = stub.rms_norm_fn = None
        sys.modules["mamba_ssm.ops.triton.layer_norm"] = stub
    iface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
    simple.selective_scan_fn = iface.selective_scan_ref  # the official reference scan, pure PyTorch
    _LOADED = MambaRef(simple.Mamba, iface.selective_scan_ref, cuda_kernels=False)
    return _LOADED


__all__ = ["MambaRef", "MambaUnavailable", "load"]
