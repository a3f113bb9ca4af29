"""BackBone_tvr (``clip_wti``): the key table and checkpoint conversion.

BackBone_tvr saves ``torch.save(model.state_dict())`` (``main_retrieval.py`` L205-212): 359 keys for ViT-B/32 with
4 seqTransf blocks, in ``named_parameters`` order -- ``clip.`` + OpenAI's 302 (:mod:`parity.clip`),
``text_weight_fc.{0,2}``, ``video_weight_fc.{0,2}``, ``frame_position_embeddings.weight``,
``transformerClip.resblocks.{i}`` (CLIP-style blocks whose LayerNorms are ``until_module.LayerNorm``: same key
names). The CLIP tensors are float32 from a CPU run and float16 from a CUDA run (``convert_weights``); both are
read, cast to float32, and their dtypes kept for the way back.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np

from jaxprvr.errors import JaxprvrError
from jaxprvr.models.clip_wti import clip_dims, with_clip_dims
from parity.clip import _flatten, _unflatten, clip_rows, transformer_rows
from parity.keys import Entry, check_table, linear, to_flax, to_torch


def key_rows(model_cfg) -> list[Entry]:
    dims = clip_dims(model_cfg)
    rows = clip_rows(dims, prefix="clip.", fprefix="clip/")
    for head in ("text_weight_fc", "video_weight_fc"):
        rows += linear(f"{head}.0", f"{head}/fc_0") + linear(f"{head}.2", f"{head}/fc_2")
    if model_cfg.agg_module == "seqTransf":
        rows.append(Entry("frame_position_embeddings.weight", "frame_position_embeddings/embedding", "embedding"))
        rows += transformer_rows("transformerClip", "transformerClip", model_cfg.num_hidden_layers)
    return rows


def make_table(model_cfg) -> tuple:
    return check_table(key_rows(model_cfg))


def torch_to_params(model_cfg, state_dict: Mapping, where="state_dict", dtype=np.float32):
    """A BackBone_tvr ``state_dict`` -> ``(model_cfg with the weights' CLIP sizes, params in ``dtype`` (float32;
    float64 for the float64 parity runs), the stored dtypes)``; keys must match exactly (``module.`` prefixes of a
    DDP save stripped)."""
    from jaxprvr.models.clip import CLIPDims
    from parity.convert import to_numpy

    sd = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in state_dict.items())
    dims = CLIPDims.from_state_dict(sd, "clip.", where)
    cfg = with_clip_dims(model_cfg, dims)
    table = make_table(cfg)
    expected = [e.torch for e in table]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in set(expected) and k[5:] not in ("input_resolution", "context_length",
                                                                            "vocab_size")]
    if missing or unexpected:
        raise JaxprvrError(where, f"the {len(expected)} BackBone_tvr keys (agg_module {cfg.agg_module}, "
                           f"{cfg.num_hidden_layers} seqTransf blocks)",
                           f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                           f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    flat, dtypes = {}, OrderedDict()
    for e in table:
        a = to_numpy(sd[e.torch])
        dtypes[e.torch] = str(a.dtype)
        flat[e.flax] = to_flax(e.kind, a.astype(dtype))
    params = _unflatten(flat)
    _check_shapes(cfg, params, where)
    return cfg, params, dtypes


def _check_shapes(cfg, params, where):
    import jax

    from jaxprvr.models.clip_wti import ClipWTI

    r, t = cfg.image_resolution, 2
    shapes = jax.eval_shape(lambda: ClipWTI(cfg).init(
        jax.random.key(0), np.zeros((1, 4), np.int32), np.ones((1, 4), np.int32),
        np.zeros((1, t, 3, r, r), np.float32), np.ones((1, t), np.int32), method="forward")["params"])
    want, got = _flatten(shapes), _flatten(params)
    for path in sorted(set(want) | set(got)):
        if path not in got or path not in want:
            raise JaxprvrError(where, "the parameters ClipWTI creates", f"{'missing' if path not in got else 'extra'} "
                               f"{path}")
        if tuple(np.shape(got[path])) != tuple(want[path].shape):
            raise JaxprvrError(where, f"{path} of shape {tuple(want[path].shape)}", f"{tuple(np.shape(got[path]))}")


def params_to_torch(model_cfg, params: Mapping, dtypes: Mapping | None = None,
                    where="params") -> "OrderedDict[str, np.ndarray]":
    """Flax params -> the BackBone_tvr ``state_dict`` (official order), each key in ``dtypes[key]`` (default: the
    array's own dtype): the inverse of :func:`torch_to_params`, bit-exact."""
    flat = _flatten(params)
    out = OrderedDict()
    for e in make_table(model_cfg):
        if e.flax not in flat:
            raise JaxprvrError(where, f"the Flax parameter {e.flax}", "none")
        a = to_torch(e.kind, np.asarray(flat[e.flax]))
        out[e.torch] = a.astype(dtypes[e.torch]) if dtypes and e.torch in dtypes else a
    return out


__all__ = ["key_rows", "make_table", "torch_to_params", "params_to_torch"]
