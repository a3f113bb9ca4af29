"""The OpenAI CLIP key table and conversions (``jaxprvr.models.clip`` <-> OpenAI's ``state_dict``).

OpenAI's keys (``clip/model.py``; BackBone_tvr's ``module_clip.py`` has the same): 302 tensors for ViT-B/32 in the
module's ``state_dict()`` order -- ``positional_embedding``, ``text_projection``, ``logit_scale``, ``visual.*``, the
text ``transformer.resblocks.i.*``, ``token_embedding.weight``, ``ln_final.*``. A block's ``attn.in_proj_weight``
``(3W, W)`` is one fused ``linear`` row (``in_proj/kernel (W, 3W)``), ``visual.conv1.weight`` a ``conv2d`` row
(OIHW <-> HWIO), ``proj`` / ``text_projection`` / the embeddings ``param`` rows (already ``x @ W``: never
transposed). A TorchScript archive's three scalar entries (``input_resolution``, ``context_length``,
``vocab_size``) are not parameters: skipped on the way in, not written on the way out.

``prefix`` puts the table under a parent module: ``"clip."`` for BackBone_tvr's checkpoints (Flax path ``clip/``).
Text-only tables (``visual=False``) serve MESM's ``clip_text_encoder.pth`` (the state dict without ``visual.*``).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np

from jaxprvr.errors import JaxprvrError
from jaxprvr.models.clip import NON_PARAMETER_KEYS, CLIPDims
from parity.convert import _check_keys
from parity.convert import flatten as _flatten
from parity.convert import unflatten as _unflatten
from parity.keys import Entry, check_table, layernorm, linear, to_flax, to_torch


def block_rows(t: str, f: str) -> list[Entry]:
    """One ``ResidualAttentionBlock`` in ``state_dict`` order (``attn``, ``ln_1``, ``mlp``, ``ln_2``)."""
    return ([Entry(f"{t}.attn.in_proj_weight", f"{f}/in_proj/kernel", "linear"),
             Entry(f"{t}.attn.in_proj_bias", f"{f}/in_proj/bias", "bias")]
            + linear(f"{t}.attn.out_proj", f"{f}/out_proj") + layernorm(f"{t}.ln_1", f"{f}/ln_1")
            + linear(f"{t}.mlp.c_fc", f"{f}/c_fc") + linear(f"{t}.mlp.c_proj", f"{f}/c_proj")
            + layernorm(f"{t}.ln_2", f"{f}/ln_2"))


def transformer_rows(t: str, f: str, layers: int) -> list[Entry]:
    rows = []
    for i in range(layers):
        rows += block_rows(f"{t}.resblocks.{i}", f"{f}/resblocks_{i}")
    return rows


def clip_rows(dims: CLIPDims, prefix: str = "", fprefix: str = "", visual: bool = True,
              logit_scale: bool = True) -> list[Entry]:
    """OpenAI's keys (with ``prefix``) -> :class:`jaxprvr.models.clip.CLIP` paths (under ``fprefix``)."""
    p, q = prefix, fprefix
    rows = [Entry(f"{p}positional_embedding", f"{q}text/positional_embedding", "param"),
            Entry(f"{p}text_projection", f"{q}text/text_projection", "param")]
    if logit_scale:
        rows.append(Entry(f"{p}logit_scale", f"{q}logit_scale", "param"))
    if visual:
        v, w = f"{p}visual", f"{q}visual"
        rows += [Entry(f"{v}.class_embedding", f"{w}/class_embedding", "param"),
                 Entry(f"{v}.positional_embedding", f"{w}/positional_embedding", "param"),
                 Entry(f"{v}.proj", f"{w}/proj", "param"),
                 Entry(f"{v}.conv1.weight", f"{w}/conv1/kernel", "conv2d")]
        rows += layernorm(f"{v}.ln_pre", f"{w}/ln_pre")
        rows += transformer_rows(f"{v}.transformer", f"{w}/transformer", dims.vision_layers)
        rows += layernorm(f"{v}.ln_post", f"{w}/ln_post")
    rows += transformer_rows(f"{p}transformer", f"{q}text/transformer", dims.text_layers)
    rows += [Entry(f"{p}token_embedding.weight", f"{q}text/token_embedding/embedding", "embedding")]
    rows += layernorm(f"{p}ln_final", f"{q}text/ln_final")
    return rows


def clip_table(dims: CLIPDims, **kw) -> tuple:
    return check_table(clip_rows(dims, **kw))


def state_dict_to_params(sd: Mapping, where="state dict", prefix: str = "", visual: bool | None = None,
                         dims: CLIPDims | None = None, dtype=np.float32) -> tuple[CLIPDims, dict, dict]:
    """An OpenAI-format CLIP ``state_dict`` (numpy arrays or tensors; fp16 or fp32) -> ``(dims, params,
    dtypes)``: float32 Flax params of :class:`~jaxprvr.models.clip.CLIP` (``{"visual", "text", "logit_scale"}``)
    and each OpenAI key's stored dtype (so :func:`params_to_state_dict` can write the file back as it was). Keys
    must match the table exactly (the scalar non-parameter entries excepted); a missing or unexpected key, or a
    wrong shape, is one :class:`JaxprvrError` naming them."""
    from parity.convert import to_numpy

    keys = [k for k in sd if k[len(prefix):] not in NON_PARAMETER_KEYS and k.startswith(prefix)]
    visual = any(k.startswith(prefix + "visual.") for k in keys) if visual is None else visual
    has_scale = (prefix + "logit_scale") in sd
    dims = dims or CLIPDims.from_state_dict(sd, prefix, where)
    table = clip_table(dims, prefix=prefix, visual=visual, logit_scale=has_scale)
    _check_keys(where, [e.torch for e in table], keys, "OpenAI CLIP keys" + (f" under {prefix!r}" if prefix else ""))
    flat, dtypes = {}, OrderedDict()
    for e in table:
        a = to_numpy(sd[e.torch])
        dtypes[e.torch] = str(a.dtype)
        if not np.issubdtype(a.dtype, np.floating):
            raise JaxprvrError(where, f"a float tensor at {e.torch}", f"dtype {a.dtype}")
        flat[e.flax] = to_flax(e.kind, a.astype(dtype))
    params = _unflatten(flat)
    _check_shapes(params, dims, where, visual, fprefix="")
    return dims, params, dtypes


def _check_shapes(params, dims, where, visual, fprefix=""):
    """Every converted array has the shape the Flax module creates (catches a transposed or truncated tensor)."""
    import jax

    from jaxprvr.models.clip import CLIP

    model = CLIP(dims)
    r = dims.image_resolution
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 3, r, r), np.float32),
                                               np.zeros((1, 4), np.int32))["params"])
    want = _flatten(shapes)
    got = _flatten(params)
    for path, a in got.items():
        if path not in want:
            continue
        if tuple(np.shape(a)) != tuple(want[path].shape):
            raise JaxprvrError(where, f"{path} of shape {tuple(want[path].shape)}", f"{tuple(np.shape(a))}")
    if visual and set(want) - set(got):
        raise JaxprvrError(where, "every CLIP parameter", f"missing {sorted(set(want) - set(got))[:4]}")


def params_to_state_dict(dims: CLIPDims, params: Mapping, dtypes: Mapping | None = None, prefix: str = "",
                         where="params") -> "OrderedDict[str, np.ndarray]":
    """Flax CLIP params -> OpenAI's keys, in ``state_dict`` order, each in ``dtypes[key]`` (default: the array's own
    dtype):
    the inverse of :func:`state_dict_to_params` (bit-exact when the values came from there)."""
    flat = _flatten(params)
    visual = any(k.startswith("visual/") for k in flat)
    table = clip_table(dims, prefix=prefix, visual=visual, logit_scale="logit_scale" in flat)
    out = OrderedDict()
    for e in table:
        if e.flax not in flat:
            raise JaxprvrError(where, f"the Flax parameter {e.flax}", "none")
        a = to_torch(e.kind, np.asarray(flat[e.flax]))
        out[e.torch] = a.astype(dtypes[e.torch]) if dtypes and e.torch in dtypes else a
    return out


def load_clip_weights(path, where=None) -> tuple[CLIPDims, dict, dict]:
    """An OpenAI-format CLIP file -> ``(dims, float32 params, stored dtypes)``: a TorchScript archive as OpenAI
    ships it (``ViT-B-32.pt``) or a ``torch.save``-d state dict, read without torch
    (:func:`jaxprvr.data.torch_pt.read_state_dict`); or a ``clip2jax`` directory."""
    from jaxprvr.data.torch_pt import read_state_dict

    path = Path(path)
    if path.is_dir():
        return load_clip_dir(path)
    sd = read_state_dict(path)
    return state_dict_to_params(sd, where or str(path))


CLIP_DIR_FILES = ("clip.json", "params.npz")


def save_clip_dir(out, dims: CLIPDims, params: Mapping, dtypes: Mapping, source: str = "") -> Path:
    """``clip2jax``'s output: ``OUT/params.npz`` (float32, Flax paths) + ``OUT/clip.json`` (dims, the source's
    per-key dtypes, the source path), written to a temporary name and renamed (a crash leaves no half file)."""
    import dataclasses
    import json
    import os

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v, np.float32) for k, v in _flatten(params).items()}
    tmp = out / "params.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **flat)
    os.replace(tmp, out / "params.npz")
    meta = {"format": "jaxprvr-clip/1", "dims": dataclasses.asdict(dims), "dtypes": dict(dtypes), "source": source}
    (out / "clip.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(out / "clip.json.tmp", out / "clip.json")
    return out


def load_clip_dir(path) -> tuple[CLIPDims, dict, dict]:
    import json

    path = Path(path)
    for name in CLIP_DIR_FILES:
        if not (path / name).is_file():
            raise JaxprvrError(path, f"a clip2jax directory with {', '.join(CLIP_DIR_FILES)}", f"no {name}")
    meta = json.loads((path / "clip.json").read_text())
    if meta.get("format") != "jaxprvr-clip/1":
        raise JaxprvrError(path / "clip.json", "format 'jaxprvr-clip/1'", repr(meta.get("format")))
    dims = CLIPDims(**meta["dims"]).validate(str(path / "clip.json"))
    with np.load(path / "params.npz") as z:
        params = _unflatten({k: np.asarray(z[k]) for k in z.files})
    return dims, params, meta.get("dtypes", {})


__all__ = ["clip_rows", "clip_table", "block_rows", "transformer_rows", "state_dict_to_params",
           "params_to_state_dict", "load_clip_weights", "save_clip_dir", "load_clip_dir"]
