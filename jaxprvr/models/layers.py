"""Shared building blocks of the PRVR models, with the official PyTorch semantics (sources below).

Every submodule is named exactly as the official torch attribute so that a state_dict key maps to a
Flax path by replacing ``.`` with ``/`` (``query_input_proj.net.1.weight`` -> ``query_input_proj/net_1/kernel``,
transposed). Torch ``nn.Sequential``/``nn.ModuleList`` index ``k`` becomes the suffix ``_k``; a torch
``LayerNorm.weight`` is the Flax ``LayerNorm/scale``.

Official sources (``file:line`` at the commits listed in docs/parity.md, "Official sources"):
  * v1 blocks: ms-sl ``method/model_components.py`` (LinearLayer :106-124, TrainablePositionalEncoding
    :81-96, BertAttention :151-165, BertSelfAttention :191-248, BertSelfOutput :251-262); GMMFormer
    ``src/Models/gmmformer/model_components.py`` (GMMBlock :127-145, Gaussian self-attention :165-245).
  * v2 blocks: GMMFormer_v2 ``src/Models/gmmformerV2/model_components.py`` (DyGMMBlock :126-172,
    FeedForward :175-187, BertAttention :189-212, BertCrossAttention :215-239, BertSelfAttention :242-320).

Conventions: masks are ``(N, L)`` floats (1 = valid); ``train`` switches dropout on (Flax ``'dropout'`` rng).
Init follows the official ``reset_parameters``: Linear/Embedding weights N(0, 0.02), Linear biases 0,
LayerNorm (1, 0) with eps 1e-5.

Compute dtype (``ModelConfig.compute_dtype``, every module's ``dtype`` attribute): Dense/Conv/Embed and the
attention matmuls run in ``dtype`` with float32 parameters (``param_dtype`` is never changed); LayerNorm
statistics are float32 (Flax promotes them), every softmax is taken in float32 (attention logits come out of
their matmul in float32, so the Gaussian modulation and the -10000 / -1e10 / -1e9 masks act on float32 values)
and its probabilities are cast back to ``dtype``. The models cast their float inputs to ``dtype`` on entry and
their outputs (encoder features, scores, aux) back to float32 (:func:`to_float32`). With ``float32`` every
cast is the identity and the computation is the official one. ``float64`` (only with ``jax_enable_x64``;
``python -m parity.check --dtype float64``) runs everything in double precision: float64 parameters as
given, and the statistics, softmaxes, Gaussian masks and outputs that are float32 otherwise are float64
(:func:`stat_dtype`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprvr.errors import JaxprvrError
from jaxprvr.ops.dropout import dropout as hash_dropout
from jaxprvr.ops.gaussian import gaussian_mask

INIT_STD = 0.02  # config.initializer_range in every official repo
LN_EPS = 1e-5  # torch nn.LayerNorm default
ATTN_MASK_FILL = -10000.0  # BertSelfAttention additive key mask
POOL_MASK_FILL = -1e10  # mask_logits of the query/frame attention pooling (model.py)

# Branch widths of the Gaussian attention blocks, in the official code order.
GMM_WIDTHS = (None, 0.5, 1.0, 5.0)  # GMMFormer v1 GMMBlock attn0..attn3
DYGMM_WIDTHS = (None, 0.5, 1.0, 5.0, 10.0, 3.0, 0.1, 8.0)  # GMMFormer v2 DyGMMBlock attn0..attn7
MTM_WIDTHS = DYGMM_WIDTHS + (0.05, 2.0, 15.0)  # MTM DyGMMBlock attn0..attn10

# The collection where every train-mode Dropout call records its key when it is mutable (sow_dropout_key).
DROPOUT_KEYS = "dropout_keys"

Dtype = Any
F32 = jnp.float32
# ModelConfig.compute_dtype -> the activation/matmul dtype. "float64" (parity checks in double precision,
# python -m parity.check --dtype float64) needs jax_enable_x64; every float32 statistic is then float64 too.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def resolve_compute_dtype(cfg) -> Dtype:
    """The jnp dtype named by ``cfg.compute_dtype`` (a ModelConfig); an unknown name is a JaxprvrError."""
    name = getattr(cfg, "compute_dtype", "float32")
    if name not in COMPUTE_DTYPES:
        raise JaxprvrError("model.compute_dtype", f"one of {sorted(COMPUTE_DTYPES)}", repr(name))
    if name == "float64" and not jax.config.jax_enable_x64:
        raise JaxprvrError("model.compute_dtype", "float32 or bfloat16; float64 only with jax_enable_x64 ("
                           "jax.config.update('jax_enable_x64', True) or JAX_ENABLE_X64=1)", "'float64' without x64")
    return COMPUTE_DTYPES[name]


def stat_dtype(dtype) -> Dtype:
    """The dtype of statistics, softmaxes, logits and outputs for a compute ``dtype``: float32, except float64
    for a float64 computation."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else F32


def to_stat(x):
    """``x`` (a float array) in :func:`stat_dtype` of its own dtype: bfloat16 -> float32, float64 kept."""
    return to_dtype(x, stat_dtype(x.dtype))


BRANCH_IMPLS = ("auto", "batched", "loop")


def resolve_branch_impl(cfg) -> bool:
    """Whether ``cfg.branch_impl`` (a ModelConfig) runs the Gaussian branches batched (see
    :func:`attention_branches`); ``"auto"`` batches them except on CPU. An unknown name is a JaxprvrError."""
    name = getattr(cfg, "branch_impl", "auto")
    if name not in BRANCH_IMPLS:
        raise JaxprvrError("model.branch_impl", f"one of {list(BRANCH_IMPLS)}", repr(name))
    return jax.default_backend() != "cpu" if name == "auto" else name == "batched"


def to_dtype(x, dtype: Dtype):
    """``x`` cast to ``dtype`` if it is a float array of another dtype (ints, bools and matching arrays
    are returned unchanged, so the float32 path has no extra op)."""
    dt = getattr(x, "dtype", None)
    if dt is None or not jnp.issubdtype(dt, jnp.floating) or dt == jnp.dtype(dtype):
        return x
    return x.astype(dtype)


def to_float32(tree):
    """Every float array of ``tree`` as float32 (model outputs: features, scores, aux); float64 arrays (a float64
    computation) stay float64."""
    return jax.tree.map(lambda x: x if getattr(x, "dtype", None) == jnp.float64 else to_dtype(x, F32), tree)


def softmax_f32(x, axis: int = -1, dtype: Optional[Dtype] = None):
    """``softmax`` computed in float32 (float64 for float64 ``x``), returned in ``dtype`` (default: ``x``'s)."""
    out_dtype = x.dtype if dtype is None else dtype
    return to_dtype(jax.nn.softmax(to_stat(x), axis=axis), out_dtype)


def logits_einsum(spec: str, a, b):
    """An attention-logit einsum: operands in the compute dtype, accumulated and returned in float32."""
    if a.dtype == b.dtype and a.dtype in (F32, jnp.float64):
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=F32)


def dense(features: int, use_bias: bool = True, name: Optional[str] = None, dtype: Dtype = F32) -> nn.Dense:
    """A torch ``nn.Linear`` with the official re-init (weight N(0, 0.02), bias 0), computed in ``dtype``."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=nn.initializers.normal(stddev=INIT_STD),
                    bias_init=nn.initializers.zeros, name=name, dtype=dtype, param_dtype=F32)


def layer_norm(name: Optional[str] = None, dtype: Dtype = F32) -> nn.LayerNorm:
    """A torch ``nn.LayerNorm`` (eps 1e-5, two-pass variance, scale 1 / bias 0); statistics in float32,
    output in ``dtype``."""
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name, dtype=dtype, param_dtype=F32)


def mask_logits(target, mask):
    """``target * mask + (1 - mask) * -1e10`` (model.py ``mask_logits``)."""
    return target * mask + (1.0 - mask) * POOL_MASK_FILL


def attention_pool(logits, mask, x):
    """Masked attention pooling (``get_modularized_queries``/``get_modularized_frames``).

    Args:
      logits: ``(N, L, 1)`` output of a ``Linear(D, 1, bias=False)``.
      mask: ``(N, L)``, 1 = valid.
      x: ``(N, L, D)``.
    Returns ``(N, D)``: ``sum_L softmax_L(mask_logits(logits, mask)) * x``. The official ``.squeeze()``
    (which breaks a batch of one) is replaced by indexing the single module axis. The masking and the softmax
    are float32; the weighted sum is in ``x``'s dtype.
    """
    logits = to_stat(logits)
    att = jax.nn.softmax(mask_logits(logits, mask[..., None].astype(logits.dtype)), axis=1)
    return jnp.einsum("blm,bld->bmd", to_dtype(att, x.dtype), x)[:, 0]


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """``torch.nn.functional.normalize``: ``x / max(||x||, eps)``, with a gradient that stays finite at 0."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def max_scores(query, context):
    """``max_t <q_i, c_{v,t}>`` and its argmax: ``(Q, D) x (V, T, D) -> (Q, V), (Q, V)`` int32.

    Official ``get_clip_scale_scores``/``get_unnormalized_clip_scale_scores``: normalise the inputs
    first to get the cosine version. The maximum is read at the (first) argmax, so under ties the whole
    gradient goes to one row as with ``torch.max(dim)``; ``jnp.max`` would split it evenly. Ties are real in
    MTM: the padded frame rows after the Mamba stack are identical (docs/quirks.md).
    """
    s = jnp.einsum("qd,vtd->qvt", query, context)
    i = jnp.argmax(s, axis=-1)
    return jnp.take_along_axis(s, i[..., None], axis=-1)[..., 0], i.astype(jnp.int32)


def clip_frame_scores(query, clips, frames) -> dict:
    """Training scores of the clip and frame branches (``get_clip_scale_scores`` and the unnormalised
    ``get_unnormalized_clip_scale_scores``): ``clip``/``clip_raw``/``frame``/``frame_raw``, each ``(Q, B)``."""
    qn = l2_normalize(query)
    return {"clip": max_scores(qn, l2_normalize(clips))[0], "clip_raw": max_scores(query, clips)[0],
            "frame": max_scores(qn, l2_normalize(frames))[0], "frame_raw": max_scores(query, frames)[0]}


class QueryBranch:
    """The query branch every PRVR model shares (MS-SL/GMMFormer ``encode_query``): ``query_input_proj``
    (LinearLayer) -> ``query_pos_embed`` -> ``query_encoder`` -> attention pooling with
    ``modular_vector_mapping``. Mixed into a model whose ``setup`` defines those four submodules.

    Also gives every model its ``compute_dtype`` (from ``cfg.compute_dtype``, validated)."""

    @property
    def compute_dtype(self) -> Dtype:
        return resolve_compute_dtype(self.cfg)

    def branch_weights(self) -> dict[str, float]:
        """Test-time weights of the fused score ``sum_k w_k * scores[k]`` (needs no parameters)."""
        return {"clip": self.cfg.clip_scale_w, "frame": self.cfg.frame_scale_w}

    def _setup_inputs(self, clip_rows: int) -> None:
        """Called from ``setup``: the positional encodings of queries (``max_desc_l`` rows), clips (``clip_rows``)
        and frames (``max_ctx_l``), and ``query_input_proj``, as every model defines them."""
        c, dt = self.cfg, self.compute_dtype  # compute_dtype validates cfg.compute_dtype
        self.query_pos_embed = TrainablePositionalEncoding(c.max_desc_l, c.hidden_size, c.input_drop, dtype=dt)
        self.clip_pos_embed = TrainablePositionalEncoding(clip_rows, c.hidden_size, c.input_drop, dtype=dt)
        self.frame_pos_embed = TrainablePositionalEncoding(c.max_ctx_l, c.hidden_size, c.input_drop, dtype=dt)
        self.query_input_proj = LinearLayer(c.hidden_size, layer_norm=True, dropout=c.input_drop, relu=True, dtype=dt)

    def _encode_query(self, query_feats, query_mask, train):
        """``q`` float32 ``(Q, D)`` and the stages (in the compute dtype)."""
        query_feats = to_dtype(query_feats, self.compute_dtype)
        emb = self.query_pos_embed(self.query_input_proj(query_feats, train=train), train=train)
        tokens = self.query_encoder(emb, query_mask, train=train)
        q = attention_pool(self.modular_vector_mapping(tokens), query_mask, tokens)
        return to_stat(q), {"query_embed": emb, "query_tokens": tokens}

    def encode_query(self, query_feats, query_mask, *, train: bool = False):
        """``(Q, Lq, Dq), (Q, Lq) -> (Q, D)`` float32."""
        return self._encode_query(query_feats, query_mask, train)[0]


class Dropout(nn.Module):
    """``torch.nn.Dropout`` (inverted: kept values scaled by ``1 / (1 - rate)``) with masks from
    :mod:`jaxprvr.ops.dropout`'s counter hash, keyed by the Flax ``'dropout'`` rng: the interface of
    ``flax.linen.Dropout`` (``rate``; ``deterministic`` at call time), several times cheaper on CPU.

    Each train-mode call with ``rate > 0`` draws one key (``make_rng``: distinct per module path and per call)
    and, when :data:`DROPOUT_KEYS` is mutable, records it (:func:`sow_dropout_key`), so that the torch twin can
    draw the same masks (:func:`torch_ref.dropout.shared_dropout`)."""

    rate: float
    rng_collection: str = "dropout"

    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x  # no mask and no key drawn (the torch twin's HashDropout skips these calls too)
        key = self.make_rng(self.rng_collection)
        sow_dropout_key(self, key)
        return hash_dropout(key, x, self.rate)


def sow_dropout_key(module: nn.Module, key) -> None:
    """Records ``key`` (its raw uint32 data) in the :data:`DROPOUT_KEYS` collection, one entry per call, when
    that collection is mutable (``model.apply(..., mutable=[DROPOUT_KEYS])``): how :mod:`torch_ref.dropout`
    learns every mask a forward drew. Otherwise nothing is traced, so the training step is unchanged."""
    if module.is_mutable_collection(DROPOUT_KEYS):
        data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        module.sow(DROPOUT_KEYS, "key", data)


def torch_uniform(fan_in: int):
    """torch's default Linear/Conv init: kaiming_uniform(a=sqrt(5)) for the weight and the bias bound, both
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=F32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_dense(features: int, fan_in: int, name: Optional[str], dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    """``nn.Linear(fan_in, features)`` with torch's default init, computed in ``dtype`` (float32 parameters)."""
    init = torch_uniform(fan_in)
    return nn.Dense(features, use_bias=use_bias, kernel_init=init, bias_init=init, name=name, dtype=dtype,
                    param_dtype=F32)


class TorchLinearLayer(nn.Module):
    """The moment-retrieval codes' ``LinearLayer`` (MRNet ret_model.py L110-132, MESM model.py L412-434):
    ``LayerNorm(in) -> Dropout -> Linear [-> ReLU]``, torch keys ``LayerNorm.*``, ``net.1.*``, torch's default init
    (unlike :class:`LinearLayer`, whose PRVR models re-initialise N(0, 0.02))."""

    out_features: int
    in_features: int
    dropout: float
    relu: bool
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = layer_norm(name="LayerNorm", dtype=self.dtype)(x)
        x = Dropout(self.dropout, name="net_0")(x, deterministic=not train)
        x = torch_dense(self.out_features, self.in_features, "net_1", self.dtype)(x)
        return jax.nn.relu(x) if self.relu else x


class LinearLayer(nn.Module):
    """``LayerNorm(in) -> Dropout -> Linear -> ReLU`` (torch keys ``LayerNorm.*``, ``net.1.*``)."""

    out_hsz: int
    layer_norm: bool = True
    dropout: float = 0.1
    relu: bool = True
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if self.layer_norm:
            x = layer_norm(name="LayerNorm", dtype=self.dtype)(x)
        x = Dropout(self.dropout, name="net_0")(x, deterministic=not train)
        x = dense(self.out_hsz, name="net_1", dtype=self.dtype)(x)
        if self.relu:
            x = jax.nn.relu(x)
        return x


class TrainablePositionalEncoding(nn.Module):
    """``Dropout(LayerNorm(x + E[:L]))`` (torch keys ``position_embeddings.weight``, ``LayerNorm.*``)."""

    max_position_embeddings: int
    hidden_size: int
    dropout: float = 0.1
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        seq_len = x.shape[1]
        if seq_len > self.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} > max_position_embeddings {self.max_position_embeddings}")
        emb = nn.Embed(self.max_position_embeddings, self.hidden_size,
                       embedding_init=nn.initializers.normal(stddev=INIT_STD), name="position_embeddings",
                       dtype=self.dtype, param_dtype=F32)
        x = layer_norm(name="LayerNorm", dtype=self.dtype)(x + emb(jnp.arange(seq_len))[None])
        return Dropout(self.dropout)(x, deterministic=not train)


class BertSelfAttention(nn.Module):
    """Multi-head attention with the official masks (torch keys ``query``, ``key``, ``value``).

    ``scores = QK^T / sqrt(d_head)``; with a width ``wid`` the scores are multiplied by the Gaussian
    mask (:func:`jaxprvr.ops.gaussian.gaussian_mask` on the key length) *before* the additive
    ``(1 - mask) * -10000`` key mask; softmax; dropout on the probabilities; heads concatenated.
    Under a bf16 ``dtype`` the logits leave their matmul in float32 and everything up to the softmax is
    float32; the probabilities are cast to ``dtype`` for the value matmul.
    """

    hidden_size: int
    num_attention_heads: int
    attention_probs_dropout_prob: float = 0.1
    wid: Optional[float] = None
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, query_states, key_states, value_states, attention_mask=None, *, gmm_length=None,
                 gaussian=None, train: bool = False):
        """``gmm_length``: Gaussian grid length (default: the key length); may be a traced int.
        ``gaussian``: a precomputed ``(Lk, Lk)`` multiplicative mask, used instead of the one of ``wid``
        (how :func:`attention_branches` gives each batched branch its own width)."""
        n_heads = self.num_attention_heads
        if self.hidden_size % n_heads != 0:
            raise ValueError(f"hidden size {self.hidden_size} is not a multiple of {n_heads} heads")
        d_head = self.hidden_size // n_heads

        def heads(x, name):
            y = dense(self.hidden_size, name=name, dtype=self.dtype)(x)
            return y.reshape(y.shape[:-1] + (n_heads, d_head))  # (N, L, nh, dh)

        q = heads(query_states, "query")
        k = heads(key_states, "key")
        v = heads(value_states, "value")
        scores = logits_einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(d_head)
        if self.wid is not None or gaussian is not None:
            key_len = key_states.shape[1]
            if query_states.shape[1] != key_len:
                raise ValueError("the Gaussian mask is defined for self-attention (Lq == Lk)")
            g = gaussian if gaussian is not None else \
                gaussian_mask(key_len if gmm_length is None else gmm_length, self.wid, key_len, dtype=scores.dtype)
            scores = scores * g[None, None]  # multiplicative, before the padding mask (model_components.py:224-231)
        if attention_mask is not None:
            m = attention_mask.astype(scores.dtype)
            scores = scores + (1.0 - m[:, None, None, :]) * ATTN_MASK_FILL
        probs = softmax_f32(scores, axis=-1, dtype=v.dtype)
        probs = Dropout(self.attention_probs_dropout_prob)(probs, deterministic=not train)
        ctx = jnp.einsum("nhqk,nkhd->nqhd", probs, v)
        return ctx.reshape(ctx.shape[:2] + (self.hidden_size,))


class BertSelfOutput(nn.Module):
    """``LayerNorm(x + Dropout(Dense(h)))`` (torch keys ``dense``, ``LayerNorm``)."""

    hidden_size: int
    hidden_dropout_prob: float = 0.1
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, hidden_states, input_tensor, *, train: bool = False):
        h = dense(self.hidden_size, name="dense", dtype=self.dtype)(hidden_states)
        h = Dropout(self.hidden_dropout_prob)(h, deterministic=not train)
        return layer_norm(name="LayerNorm", dtype=self.dtype)(h + input_tensor)


class BertAttention(nn.Module):
    """v1 flavour (MS-SL, GMMFormer): self-attention + output dense + residual + LN, no FFN.

    Torch keys ``self.{query,key,value}``, ``output.dense``, ``output.LayerNorm``.
    """

    hidden_size: int
    num_attention_heads: int
    drop: float = 0.1
    wid: Optional[float] = None
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x, attention_mask=None, *, gmm_length=None, gaussian=None, train: bool = False):
        s = BertSelfAttention(self.hidden_size, self.num_attention_heads, self.drop, self.wid, name="self",
                              dtype=self.dtype)(x, x, x, attention_mask, gmm_length=gmm_length, gaussian=gaussian,
                                                train=train)
        return BertSelfOutput(self.hidden_size, self.drop, name="output", dtype=self.dtype)(s, x, train=train)


class FeedForward(nn.Module):
    """``layer2(Dropout(ReLU(layer1(x))))`` (torch keys ``layer1``, ``layer2``)."""

    d_model: int
    d_ff: int
    dropout: float = 0.1
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = jax.nn.relu(dense(self.d_ff, name="layer1", dtype=self.dtype)(x))
        x = Dropout(self.dropout)(x, deterministic=not train)
        return dense(self.d_model, name="layer2", dtype=self.dtype)(x)


class BertAttentionV2(nn.Module):
    """v2 flavour (GMMFormer v2, MTM): ``h = norm1(x + Drop(SelfAttn(x)))``, ``norm2(h + Drop(FFN_4D(h)))``.

    No output projection after the heads. Torch keys ``self.*``, ``output.layer{1,2}``, ``norm1``, ``norm2``.
    """

    hidden_size: int
    num_attention_heads: int
    drop: float = 0.1
    wid: Optional[float] = None
    ffn_mult: int = 4
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x, attention_mask=None, *, gmm_length=None, gaussian=None, train: bool = False):
        s = BertSelfAttention(self.hidden_size, self.num_attention_heads, self.drop, self.wid, name="self",
                              dtype=self.dtype)(x, x, x, attention_mask, gmm_length=gmm_length, gaussian=gaussian,
                                                train=train)
        s = Dropout(self.drop)(s, deterministic=not train)  # dropout1
        h = layer_norm(name="norm1", dtype=self.dtype)(x + s)
        t = FeedForward(self.hidden_size, self.ffn_mult * self.hidden_size, self.drop, name="output",
                        dtype=self.dtype)(h, train=train)
        t = Dropout(self.drop)(t, deterministic=not train)  # dropout2
        return layer_norm(name="norm2", dtype=self.dtype)(h + t)


class BertCrossAttention(nn.Module):
    """v2 cross-attention: as :class:`BertAttentionV2` with Q from ``query`` and a 1xD FFN."""

    hidden_size: int
    num_attention_heads: int
    drop: float = 0.1
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, query, x, attention_mask=None, *, train: bool = False):
        query, x = to_dtype(query, self.dtype), to_dtype(x, self.dtype)
        s = BertSelfAttention(self.hidden_size, self.num_attention_heads, self.drop, name="self", dtype=self.dtype)(
            query, x, x, attention_mask, train=train)
        s = Dropout(self.drop)(s, deterministic=not train)
        q = layer_norm(name="norm1", dtype=self.dtype)(query + s)
        t = FeedForward(self.hidden_size, self.hidden_size, self.drop, name="output", dtype=self.dtype)(q, train=train)
        t = Dropout(self.drop)(t, deterministic=not train)
        return layer_norm(name="norm2", dtype=self.dtype)(q + t)


def attention_branches(parent: nn.Module, branch, widths: Sequence[Optional[float]], x, attention_mask=None, *,
                       gmm_length=None, train: bool = False, batched: bool = True):
    """K Gaussian self-attention branches of one block: ``(K, N, L, D)``, branch-major.

    ``branch(wid, **kw)`` builds one branch (``BertAttention`` or ``BertAttentionV2`` with the block's sizes).
    The parameters are where the official layout has them, one subtree per branch, ``attn0..attn{K-1}``
    under ``parent``, whichever way the branches run:

    - ``batched=False``: K separate modules, called one after the other (K sets of small ops).
    - ``batched=True``: at init the branches are created as K separate modules (so names and init are
      theirs); every later call stacks their parameters along a new leading axis and maps one branch over
      (parameters, Gaussian mask, dropout key) with ``jax.vmap``. Every projection, softmax and FFN
      becomes one op over all K branches (the GMMFormer v2 step: 7,354 XLA ops instead of 10,573). The branch
      without a width gets an all-ones mask; multiplying by 1 is exact, so it computes what plain attention
      does. Each branch draws its own dropout masks.
    """
    names = [f"attn{k}" for k in range(len(widths))]
    if not batched or parent.is_initializing():
        return jnp.stack([branch(w, name=name)(x, attention_mask, gmm_length=gmm_length, train=train)
                          for name, w in zip(names, widths)])
    params = parent.variables["params"]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params[n] for n in names])
    key_len = x.shape[1]
    length = key_len if gmm_length is None else gmm_length
    gaussians = jnp.stack([gaussian_mask(length, w, key_len, dtype=stat_dtype(x.dtype)) for w in widths])  # (K, L, L)
    keys = jax.random.split(parent.make_rng("dropout"), len(widths)) if train else None
    one = branch(None, parent=None)
    capture = train and parent.is_mutable_collection(DROPOUT_KEYS)

    def run(p, g, key):
        kw = dict(gaussian=g, train=train, rngs=None if key is None else {"dropout": key})
        if capture:
            return one.apply({"params": p}, x, attention_mask, mutable=[DROPOUT_KEYS], **kw)
        return one.apply({"params": p}, x, attention_mask, **kw)

    if not capture:
        return jax.vmap(run)(stacked, gaussians, keys)
    out, sown = jax.vmap(run)(stacked, gaussians, keys)
    _sow_branch_keys(parent, names, sown.get(DROPOUT_KEYS, {}))
    return out


def _sow_branch_keys(parent: nn.Module, names: Sequence[str], sown) -> None:
    """The dropout keys the vmapped branches recorded (leading axis: branch) re-recorded in ``parent``'s
    :data:`DROPOUT_KEYS`, branch ``k``'s tree under its module name ``attn<k>``: the paths then read as in the
    loop form, e.g. ``clip_encoder/attn3/self/Dropout_0`` (the keys themselves differ from the loop's)."""
    if not sown:
        return
    for k, name in enumerate(names):
        parent.sow(DROPOUT_KEYS, name, jax.tree.map(lambda a: a[k], sown))


class GMMBlock(nn.Module):
    """GMMFormer v1: independent v1 branches ``attn<k>`` (widths ``widths``), unweighted mean.

    The official ``torch.mean(oo, -1).squeeze()`` (model_components.py:143) is kept without the squeeze,
    which would break a batch of one. The branches run through :func:`attention_branches`.
    """

    hidden_size: int
    num_attention_heads: int
    drop: float = 0.1
    widths: Sequence[Optional[float]] = GMM_WIDTHS
    dtype: Dtype = F32
    batched: bool = True  # attention_branches(batched=...); ModelConfig.branch_impl

    @nn.compact
    def __call__(self, x, attention_mask=None, *, gmm_length=None, train: bool = False):
        def branch(w, **kw):
            return BertAttention(self.hidden_size, self.num_attention_heads, self.drop, w, dtype=self.dtype, **kw)

        outs = attention_branches(self, branch, self.widths, x, attention_mask, gmm_length=gmm_length, train=train,
                                  batched=self.batched)
        return jnp.mean(outs, axis=0)


class DyGMMBlock(nn.Module):
    """GMMFormer v2 DyGMMBlock (the temporal consolidation module), model_components.py:126-172.

    K v2 branches ``attn0..attn{K-1}`` (``widths``, code order); one shared cross-attention ``ca`` whose
    single query is the model-level ``weight_token`` reads each branch output (with the key mask); then
    ``layer2(Dropout(ReLU(layer1(C))))`` gives ``(N, K, frame_len)`` logits, a softmax over the K
    branches at temperature ``sft_factor`` gives per-position weights, and the output is the weighted sum
    of the branch outputs. The K branches run through :func:`attention_branches`; the K cross-attention
    calls are batched (branch folded into the batch axis).
    ``L`` must equal ``frame_len``.
    """

    hidden_size: int
    num_attention_heads: int
    frame_len: int
    sft_factor: float
    drop: float = 0.1
    widths: Sequence[Optional[float]] = DYGMM_WIDTHS
    layer2_name: str = "layer2"  # MTM calls it fixed_layer2_projection
    slice_logits: bool = False  # MTM: L may be < frame_len (= map_size); the logits are sliced to L
    dtype: Dtype = F32
    batched: bool = True  # attention_branches(batched=...); ModelConfig.branch_impl

    @nn.compact
    def __call__(self, x, attention_mask, weight_token, *, train: bool = False):
        n, seq_len, d = x.shape
        if seq_len != self.frame_len and not (self.slice_logits and seq_len < self.frame_len):
            raise ValueError(f"DyGMMBlock expects L == frame_len == {self.frame_len}, got {seq_len}")
        def branch(w, **kw):
            return BertAttentionV2(self.hidden_size, self.num_attention_heads, self.drop, w, dtype=self.dtype, **kw)

        oo = attention_branches(self, branch, self.widths, x, attention_mask, train=train,
                                batched=self.batched)  # (K, N, L, D)
        n_br = oo.shape[0]
        keys = oo.reshape(n_br * n, seq_len, d)  # branch-major, like the loop :160-162
        token = jnp.broadcast_to(weight_token.astype(x.dtype).reshape(1, 1, d), (n_br * n, 1, d))
        mask = None if attention_mask is None else jnp.tile(attention_mask, (n_br, 1))
        c = BertCrossAttention(self.hidden_size, self.num_attention_heads, self.drop, name="ca", dtype=self.dtype)(
            token, keys, mask, train=train)  # (K*N, 1, D)
        c = jnp.moveaxis(c.reshape(n_br, n, d), 0, 1)  # (N, K, D) = torch.cat(weight, dim=1)
        w = jax.nn.relu(dense(self.hidden_size, name="layer1", dtype=self.dtype)(c))
        w = Dropout(self.drop)(w, deterministic=not train)
        w = dense(self.frame_len, name=self.layer2_name, dtype=self.dtype)(w)[..., :seq_len]  # (N, K, L)
        w = jax.nn.softmax(to_stat(jnp.swapaxes(w, 1, 2)) / self.sft_factor, axis=-1)  # (N, L, K), float32 (or 64)
        return jnp.sum(oo * to_dtype(jnp.moveaxis(w, -1, 0), oo.dtype)[..., None], axis=0)
