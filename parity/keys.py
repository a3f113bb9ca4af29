"""Rows of the torch <-> Flax key tables and the transforms they name.

A table is a tuple of :class:`Entry` in the official ``state_dict()`` order. Each entry names the torch key,
the Flax parameter path (``/``-separated) and the *kind* of tensor, which alone decides the transform:

==================  ======================================  ==========================================
kind                torch layout                            Flax layout
==================  ======================================  ==========================================
``linear``          ``nn.Linear.weight (out, in)``          ``Dense.kernel (in, out)``: transpose
``conv1d``          ``nn.Conv1d.weight (out, in/g, k)``     ``Conv.kernel (k, in/g, out)``: axes 2,1,0
``bias``            ``(n,)``                                 ``(n,)``: none
``layernorm``       ``LayerNorm.weight (n,)``               ``LayerNorm.scale (n,)``: none
``embedding``       ``Embedding.weight (rows, d)``          ``Embed.embedding (rows, d)``: none
``param``           a raw ``nn.Parameter``                  the same array: none
``conv2d``          ``nn.Conv2d.weight (out, in/g, kh, kw)`` ``Conv.kernel (kh, kw, in/g, out)``: axes
                                                            2,3,1,0 (back: 3,2,0,1)
``bn_param``        ``BatchNorm.weight`` / ``.bias (n,)``   ``scale`` / ``bias (n,)``: none
``bn_mean``         ``BatchNorm.running_mean (n,)``         ``batch_stats .../mean``: none
``bn_var``          ``BatchNorm.running_var (n,)``          ``batch_stats .../var``: none
``bn_count``        ``num_batches_tracked ()`` int64        ``batch_stats .../num_batches_tracked`` int32
``buffer``          a constant buffer (``xpos.scale``)      no Flax entry: recomputed on the way back
==================  ======================================  ==========================================

Transposes are decided by the kind written in the table, never by shape (most Linears are square).
The builders below expand the official module patterns; each model's table lives in its own module
(``parity/ms_sl.py``, ``parity/gmmformer.py``, ``parity/gmmformer_v2.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

KINDS = {"linear": 2, "conv1d": 3, "bias": 1, "layernorm": 1, "embedding": 2, "param": None, "conv2d": 4,
         "bn_param": 1, "bn_mean": 1, "bn_var": 1, "bn_count": 0, "buffer": None}


class Entry(NamedTuple):
    torch: str  # official state_dict key
    flax: str  # Flax params path, "/"-separated
    kind: str  # one of KINDS
    alias: bool = False  # a second official key for the same tensor (MTM's ``attns.K`` = ``attnK``)


def to_flax(kind: str, a: np.ndarray) -> np.ndarray:
    """torch layout -> Flax layout (a new contiguous array; values untouched)."""
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv1d":
        return np.ascontiguousarray(a.transpose(2, 1, 0))
    if kind == "conv2d":
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    if kind == "bn_count":
        return np.asarray(a, np.int32).copy()
    return np.array(a, copy=True)


def to_torch(kind: str, a: np.ndarray) -> np.ndarray:
    """Flax layout -> torch layout (the inverse of :func:`to_flax`; a 2-D transpose and reversing three axes are
    their own inverses, ``conv2d`` is not)."""
    if kind == "conv2d":
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if kind == "bn_count":
        return np.asarray(a, np.int64).copy()
    return to_flax(kind, a)


# ------------------------------------------------------------------------------------------ row builders
# ``t`` is a torch module prefix (dotted), ``f`` the Flax module path ("/"-separated).

def linear(t: str, f: str, bias: bool = True) -> list[Entry]:
    rows = [Entry(f"{t}.weight", f"{f}/kernel", "linear")]
    if bias:
        rows.append(Entry(f"{t}.bias", f"{f}/bias", "bias"))
    return rows


def layernorm(t: str, f: str) -> list[Entry]:
    return [Entry(f"{t}.weight", f"{f}/scale", "layernorm"), Entry(f"{t}.bias", f"{f}/bias", "bias")]


def linear_layer(branch: str) -> list[Entry]:
    """``LinearLayer``: ``LayerNorm`` -> dropout -> ``net.1`` Linear (-> ReLU)."""
    t = f"{branch}_input_proj"
    return layernorm(f"{t}.LayerNorm", f"{t}/LayerNorm") + linear(f"{t}.net.1", f"{t}/net_1")


def pos_embed(branch: str) -> list[Entry]:
    """``TrainablePositionalEncoding``: ``position_embeddings`` + ``LayerNorm``."""
    t = f"{branch}_pos_embed"
    return ([Entry(f"{t}.position_embeddings.weight", f"{t}/position_embeddings/embedding", "embedding")]
            + layernorm(f"{t}.LayerNorm", f"{t}/LayerNorm"))


def self_attention(t: str, f: str) -> list[Entry]:
    """``BertSelfAttention``: ``query``, ``key``, ``value`` Linears."""
    rows = []
    for qkv in ("query", "key", "value"):
        rows += linear(f"{t}.self.{qkv}", f"{f}/self/{qkv}")
    return rows


def bert_attention_v1(t: str, f: str | None = None) -> list[Entry]:
    """MS-SL / GMMFormer ``BertAttention``: self-attention + ``output.dense`` + ``output.LayerNorm``."""
    f = f or t.replace(".", "/")
    return (self_attention(t, f) + linear(f"{t}.output.dense", f"{f}/output/dense")
            + layernorm(f"{t}.output.LayerNorm", f"{f}/output/LayerNorm"))


def bert_attention_v2(t: str, f: str | None = None) -> list[Entry]:
    """GMMFormer v2 ``BertAttention``: self-attention + FFN ``output.layer1/2`` + ``norm1``, ``norm2``."""
    f = f or t.replace(".", "/")
    return (self_attention(t, f) + linear(f"{t}.output.layer1", f"{f}/output/layer1")
            + linear(f"{t}.output.layer2", f"{f}/output/layer2")
            + layernorm(f"{t}.norm1", f"{f}/norm1") + layernorm(f"{t}.norm2", f"{f}/norm2"))


def gmm_block(t: str, n_branches: int) -> list[Entry]:
    """GMMFormer v1 ``GMMBlock``: ``attn0..attn{n-1}`` v1 attentions."""
    rows = []
    for k in range(n_branches):
        rows += bert_attention_v1(f"{t}.attn{k}")
    return rows


def dygmm_block(t: str, n_branches: int) -> list[Entry]:
    """GMMFormer v2 ``DyGMMBlock``: ``attn0..`` v2 attentions, cross-attention ``ca``, ``layer1``, ``layer2``."""
    rows = []
    for k in range(n_branches):
        rows += bert_attention_v2(f"{t}.attn{k}")
    rows += bert_attention_v2(f"{t}.ca")
    rows += linear(f"{t}.layer1", f"{t}/layer1") + linear(f"{t}.layer2", f"{t}/layer2")
    return rows


def mamba_layer(t: str, f: str | None = None) -> list[Entry]:
    """``mamba_ssm`` Mamba-1 (``jaxprvr.models.mamba.Mamba``), in its ``state_dict`` order: the raw parameters
    ``A_log``, ``D`` first, then ``in_proj``, ``conv1d`` (depthwise), ``x_proj``, ``dt_proj``, ``out_proj``.
    ``t == ""`` is a bare layer."""
    f = t.replace(".", "/") if f is None else f
    tp, fp = (f"{t}.", f"{f}/") if t else ("", "")
    return ([Entry(f"{tp}A_log", f"{fp}A_log", "param"), Entry(f"{tp}D", f"{fp}D", "param")]
            + linear(f"{tp}in_proj", f"{fp}in_proj", bias=False)
            + [Entry(f"{tp}conv1d.weight", f"{fp}conv1d/kernel", "conv1d"),
               Entry(f"{tp}conv1d.bias", f"{fp}conv1d/bias", "bias")]
            + linear(f"{tp}x_proj", f"{fp}x_proj", bias=False) + linear(f"{tp}dt_proj", f"{fp}dt_proj")
            + linear(f"{tp}out_proj", f"{fp}out_proj", bias=False))


def mtm_dygmm_block(t: str, n_branches: int = 11) -> list[Entry]:
    """MTM ``DyGMMBlock``: ``attn0..attn10``, the same modules again as ``attns.0..10`` (alias rows), ``ca``,
    ``layer1``, ``fixed_layer2_projection``."""
    rows = []
    for k in range(n_branches):
        rows += bert_attention_v2(f"{t}.attn{k}")
    for k in range(n_branches):
        rows += [Entry(e.torch.replace(f"{t}.attn{k}.", f"{t}.attns.{k}.", 1), e.flax, e.kind, True)
                 for e in bert_attention_v2(f"{t}.attn{k}")]
    rows += bert_attention_v2(f"{t}.ca")
    rows += linear(f"{t}.layer1", f"{t}/layer1") + linear(f"{t}.fixed_layer2_projection",
                                                          f"{t}/fixed_layer2_projection")
    return rows


def tcn(t: str, f: str | None = None) -> list[Entry]:
    """MTM ``TCN``: ``alpha``, ``conv1``, ``conv2`` (Conv1d k=3), ``layer_norm``."""
    f = t.replace(".", "/") if f is None else f
    return ([Entry(f"{t}.alpha", f"{f}/alpha", "param")]
            + [Entry(f"{t}.conv1.weight", f"{f}/conv1/kernel", "conv1d"),
               Entry(f"{t}.conv1.bias", f"{f}/conv1/bias", "bias"),
               Entry(f"{t}.conv2.weight", f"{f}/conv2/kernel", "conv1d"), Entry(f"{t}.conv2.bias", f"{f}/conv2/bias", "bias")]
            + layernorm(f"{t}.layer_norm", f"{f}/layer_norm"))


def mamba_stack(t: str, num_layers: int) -> list[Entry]:
    """MTM ``clip_mamba`` / ``frame_mamba``: ``[Mamba, LayerNorm] * num_layers`` in one ModuleList."""
    rows = []
    for i in range(num_layers):
        rows += mamba_layer(f"{t}.{2 * i}", f"{t}_{2 * i}") + layernorm(f"{t}.{2 * i + 1}", f"{t}_{2 * i + 1}")
    return rows


def check_table(table) -> tuple:
    """A table must name every torch key and Flax path once and use known kinds."""
    t_keys = [e.torch for e in table]
    f_keys = [e.flax for e in table if not e.alias]
    if len(set(t_keys)) != len(t_keys) or len(set(f_keys)) != len(f_keys):
        raise AssertionError("duplicate key in a conversion table")
    if not {e.flax for e in table if e.alias} <= set(f_keys):
        raise AssertionError("an alias row points to no canonical Flax path")
    bad = [e for e in table if e.kind not in KINDS]
    if bad:
        raise AssertionError(f"unknown kinds in a conversion table: {bad}")
    return tuple(table)
