"""MESM's key table: the official ``state_dict`` (lntzm/MESM @ 8501bdea, ``model_*.ckpt["model"]``) <-> the params of
:class:`jaxprvr.models.mesm.MESM`, both ways, bit-exact.

273 keys for the shared-MLP enhancer (Charades C+SF, Charades VGG+GloVe, Charades-CG/CD, QVHighlights), 289 for
TACoS's ``T2VEncoder_TwoMLP`` (+8 per enhancer layer: ``linear{1,2}_1``, ``norm{1,2}_1``), vmr.md B7. The order is
the official ``state_dict()`` order: ``MESM``'s own parameters first (``global_rep_token``, ``global_rep_pos``,
``masked_token``, ``unknown_token``), then its children in registration order (``model.py`` L29-98, builders
``runner.py`` L253-298): ``enhance_encoder``, ``t2v_encoder``, ``transformer``, ``txt_position_embed``,
``span_embed``, ``class_embed``, ``query_embed``, ``input_txt_proj``, ``input_vid_proj``, ``saliency_proj{1,2}``,
``output_txt_proj``, ``ss_reconstructor``. ``text_encoder.*`` keys (the frozen CLIP / GloVe tower, stripped from the
official checkpoints, ``train.py`` L186) are not part of the table and are ignored on the way in.

Kinds (:mod:`parity.keys`, decided by the layer, never by the shape): ``linear`` (a Linear weight, and
``nn.MultiheadAttention``'s fused ``in_proj_weight`` (3d, d) -> ``in_proj/kernel`` (d, 3d), one convention with
:mod:`parity.clip`), ``bias``, ``layernorm``, ``embedding`` (``query_embed``, ``txt_position_embed``), ``param``
(``global_rep_*``, the learned tokens, the PReLU ``activation.weight`` (1,)).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from typing import Mapping

import numpy as np

from jaxprvr.errors import JaxprvrError
from parity.keys import Entry, check_table, layernorm, linear, to_flax, to_torch

IGNORED_PREFIXES = ("text_encoder.",)  # the frozen text tower (parity.clip converts CLIP's weights)


def _param(t: str, f: str) -> list[Entry]:
    return [Entry(t, f, "param")]


def mha(t: str, f: str) -> list[Entry]:
    """``nn.MultiheadAttention``: fused ``in_proj_weight``/``in_proj_bias``, ``out_proj``."""
    return ([Entry(f"{t}.in_proj_weight", f"{f}/in_proj/kernel", "linear"),
             Entry(f"{t}.in_proj_bias", f"{f}/in_proj/bias", "bias")]
            + linear(f"{t}.out_proj", f"{f}/out_proj"))


def t2v_layer(t: str, f: str, two_mlp: bool = False) -> list[Entry]:
    """``T2V_TransformerEncoderLayer`` (transformer.py L487-503) / ``_TwoMLP`` (L563-571); also the encoder's
    ``TransformerEncoderLayer`` (L617-632: the same registration order)."""
    rows = (mha(f"{t}.self_attn", f"{f}/self_attn") + linear(f"{t}.linear1", f"{f}/linear1")
            + linear(f"{t}.linear2", f"{f}/linear2") + layernorm(f"{t}.norm1", f"{f}/norm1")
            + layernorm(f"{t}.norm2", f"{f}/norm2") + _param(f"{t}.activation.weight", f"{f}/activation/weight"))
    if two_mlp:
        rows += (linear(f"{t}.linear1_1", f"{f}/linear1_1") + linear(f"{t}.linear2_1", f"{f}/linear2_1")
                 + layernorm(f"{t}.norm1_1", f"{f}/norm1_1") + layernorm(f"{t}.norm2_1", f"{f}/norm2_1"))
    return rows


def decoder_layer(t: str, f: str, first: bool) -> list[Entry]:
    """``TransformerDecoderLayer`` (transformer.py L678-718); ``ca_qpos_proj`` only in layer 0 (L329-331)."""
    rows = []
    for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj"):
        rows += linear(f"{t}.{name}", f"{f}/{name}")
    rows += linear(f"{t}.self_attn.out_proj", f"{f}/self_attn/out_proj") + layernorm(f"{t}.norm1", f"{f}/norm1")
    for name in ("ca_qcontent_proj",) + (("ca_qpos_proj",) if first else ()) + (
            "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj"):
        rows += linear(f"{t}.{name}", f"{f}/{name}")
    rows += linear(f"{t}.cross_attn.out_proj", f"{f}/cross_attn/out_proj")
    rows += linear(f"{t}.linear1", f"{f}/linear1") + linear(f"{t}.linear2", f"{f}/linear2")
    rows += layernorm(f"{t}.norm2", f"{f}/norm2") + layernorm(f"{t}.norm3", f"{f}/norm3")
    return rows + _param(f"{t}.activation.weight", f"{f}/activation/weight")


def mlp(t: str, f: str, n: int) -> list[Entry]:
    rows = []
    for j in range(n):
        rows += linear(f"{t}.layers.{j}", f"{f}/layers_{j}")
    return rows


def linear_layer(t: str, f: str) -> list[Entry]:
    """The official ``LinearLayer`` (model.py L412-434): ``LayerNorm`` then ``net.1``."""
    return layernorm(f"{t}.LayerNorm", f"{f}/LayerNorm") + linear(f"{t}.net.1", f"{f}/net_1")


def key_rows(cfg) -> list[Entry]:
    """Every official key of ``cfg``'s (a :class:`~jaxprvr.config.MESMConfig`) model, official order."""
    rows = _param("global_rep_token", "global_rep_token") + _param("global_rep_pos", "global_rep_pos")
    if cfg.rec_fw:
        rows += _param("masked_token", "masked_token") + _param("unknown_token", "unknown_token")
    for i in range(cfg.num_recfw_layers):  # built whether or not rec_fw (runner.py L268)
        rows += t2v_layer(f"enhance_encoder.t2v_encoder.layers.{i}", f"enhance_encoder/t2v_encoder/layers_{i}",
                          not cfg.share_MLP)
    for i in range(cfg.t2v_layers):
        rows += t2v_layer(f"t2v_encoder.t2v_encoder.layers.{i}", f"t2v_encoder/t2v_encoder/layers_{i}")
    for i in range(cfg.enc_layers):
        rows += t2v_layer(f"transformer.encoder.layers.{i}", f"transformer/encoder/layers_{i}")
    for i in range(cfg.dec_layers):
        rows += decoder_layer(f"transformer.decoder.layers.{i}", f"transformer/decoder/layers_{i}", i == 0)
    rows += layernorm("transformer.decoder.norm", "transformer/decoder/norm")
    for head, n in (("query_scale", 2), ("ref_point_head", 2), ("bbox_embed", 3), ("ref_anchor_head", 2)):
        rows += mlp(f"transformer.decoder.{head}", f"transformer/decoder/{head}", n)
    rows += [Entry("txt_position_embed.position_embeddings.weight",
                   "txt_position_embed/position_embeddings/embedding", "embedding")]
    rows += layernorm("txt_position_embed.LayerNorm", "txt_position_embed/LayerNorm")
    rows += mlp("span_embed", "span_embed", 3) + linear("class_embed", "class_embed")
    rows += [Entry("query_embed.weight", "query_embed/embedding", "embedding")]
    for proj in ("input_txt_proj", "input_vid_proj"):
        for j in range(cfg.n_input_proj):
            rows += linear_layer(f"{proj}.{j}", f"{proj}_{j}")
    rows += linear("saliency_proj1", "saliency_proj1") + linear("saliency_proj2", "saliency_proj2")
    if cfg.rec_fw:
        rows += linear_layer("output_txt_proj.0", "output_txt_proj_0") + linear("output_txt_proj.1",
                                                                              "output_txt_proj_1")
    if cfg.rec_ss:
        rows += _param("ss_reconstructor.masked_sent_token", "ss_reconstructor/masked_sent_token")
        for i in range(cfg.num_recss_layers):
            rows += t2v_layer(f"ss_reconstructor.recon_trans.layers.{i}", f"ss_reconstructor/recon_trans/layers_{i}")
        for j in range(2):
            rows += linear_layer(f"ss_reconstructor.output_sent_proj.{j}", f"ss_reconstructor/output_sent_proj_{j}")
    return rows


@functools.lru_cache(maxsize=16)
def make_table(cfg) -> tuple:
    return check_table(key_rows(cfg))


@functools.lru_cache(maxsize=16)
def flax_shapes(cfg) -> dict:
    """``{flax path: shape}`` of the params :class:`~jaxprvr.models.mesm.MESM` creates for ``cfg`` (traced, not
    run: ``jax.eval_shape`` of its init on a one-row dummy batch)."""
    import jax

    from jaxprvr.models.mesm import MESM, video_in_dim
    from parity.convert import flatten

    lw, lv = 3, 2
    batch = {"video_feat": np.zeros((1, lv, video_in_dim(cfg)), np.float32), "video_mask": np.ones((1, lv), bool),
             "words_feat": np.zeros((1, lw, cfg.t_feat_dim), np.float32), "words_mask": np.ones((1, lw), bool),
             "unknown_mask": np.zeros((1, lw), bool), "clip_mask": np.ones((1, lv), bool),
             "row_group": np.zeros((1,), np.int32), "num_rows": np.int32(1)}
    model = MESM(dataclasses.replace(cfg, compute_dtype="float32"))  # the shapes do not depend on it
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
    return {k: tuple(v.shape) for k, v in flatten(shapes).items()}


def torch_to_params(state_dict: Mapping, cfg, *, dtype=np.float32, where: str = "state_dict",
                    check_shapes: bool = True) -> dict:
    """An official MESM ``state_dict`` (tensors or arrays; a ``module.`` prefix stripped, ``text_encoder.*``
    ignored) -> nested Flax params (numpy, ``dtype``; ``dtype=None`` keeps each tensor's own). Keys must match the
    table of ``cfg`` exactly: missing or unexpected ones are one :class:`JaxprvrError` naming them; with
    ``check_shapes`` every array must have the shape the Flax model creates."""
    from parity.convert import to_numpy, unflatten

    sd = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in state_dict.items())
    table = make_table(cfg)
    expected = [e.torch for e in table]
    given = [k for k in sd if not k.startswith(IGNORED_PREFIXES)]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in given if k not in set(expected)]
    if missing or unexpected:
        raise JaxprvrError(where, f"the {len(expected)} MESM keys (share_MLP={cfg.share_MLP}, rec_fw={cfg.rec_fw}, "
                           f"rec_ss={cfg.rec_ss}, layers {cfg.num_recfw_layers}/{cfg.t2v_layers}/{cfg.enc_layers}/"
                           f"{cfg.dec_layers}/{cfg.num_recss_layers})",
                           f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''} ({len(missing)}), unexpected "
                           f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} ({len(unexpected)})")
    flat = {}
    for e in table:
        a = to_numpy(sd[e.torch])
        if not np.issubdtype(a.dtype, np.floating):
            raise JaxprvrError(where, f"a float tensor at {e.torch}", f"dtype {a.dtype}")
        flat[e.flax] = to_flax(e.kind, a if dtype is None else a.astype(dtype))
    if check_shapes:
        want = flax_shapes(cfg)
        for path, a in flat.items():
            if path not in want:
                raise JaxprvrError(where, "parameters the Flax MESM creates", f"an extra {path}")
            if tuple(a.shape) != want[path]:
                raise JaxprvrError(where, f"{path} of shape {want[path]} (from its torch key)", str(tuple(a.shape)))
        extra = sorted(set(want) - set(flat))
        if extra:
            raise JaxprvrError(where, "every Flax MESM parameter from the table", f"none for {extra[:6]}")
    return unflatten(flat)


def params_to_torch(params: Mapping, cfg, *, dtypes: Mapping | None = None,
                    where: str = "params") -> "OrderedDict[str, np.ndarray]":
    """Flax params -> the official ``state_dict`` (numpy arrays, official key order), each in ``dtypes[key]``
    (default: its own dtype): the inverse of :func:`torch_to_params`, bit-exact. A Flax parameter the table does
    not know, or one it needs and does not find, is a :class:`JaxprvrError` naming it."""
    from parity.convert import flatten

    flat = flatten(params)
    table = make_table(cfg)
    known = {e.flax for e in table}
    missing = [e.flax for e in table if e.flax not in flat]
    extra = [p for p in flat if p not in known]
    if missing or extra:
        raise JaxprvrError(where, f"the {len(table)} Flax parameters of the MESM table",
                           f"missing {missing[:6]} ({len(missing)}), unexpected {extra[:6]} ({len(extra)})")
    out = OrderedDict()
    for e in table:
        a = to_torch(e.kind, np.asarray(flat[e.flax]))
        out[e.torch] = a.astype(dtypes[e.torch]) if dtypes and e.torch in dtypes else a
    return out
