"""MESM (lntzm/MESM @ 8501bdea, AAAI'24), the DETR-style moment retrieval model, batched over static padded rows.

Official: ``model/model.py`` (``MESM`` L16-394, ``LinearLayer`` L412-434, ``SegSenRecon`` L437-503, ``MLP`` L397-409),
``model/transformer.py`` (``T2VEncoder`` L62-116, ``Transformer`` L119-205, ``TransformerDecoder`` L280-420, the T2V
layers L485-612, ``TransformerEncoderLayer`` L615-673, ``TransformerDecoderLayer`` L676-797), ``model/attention.py``
(the decoder's ``MultiheadAttention`` L61-393), ``model/position_encoding.py`` (``PositionEmbeddingSine`` L35-72,
``TrainablePositionalEncoding`` L10-32), builders ``runner.py`` L190-298. Study: vmr.md PART B (B2, B7, B9).

Input: the STATIC batch of the MESM batch contract (R rows = queries, the rows of one item contiguous, ``row_group``
-1 on padding rows, ``num_rows`` = B the real row count). ``words_feat`` (R, Lw, Dt) are the raw word features (the
CLIP ``last_hidden_state`` or the GloVe vectors computed by the task; the frozen text tower is not part of this
module). Forward of one row b (``MESM.forward`` L154-359):

1. Text (:func:`text_features`): CLIP/GloVe (``CLIP_encode_text`` L115-134, ``GloVe_encode_text`` L136-143): padding
   words zeroed, sentence = masked mean of the raw words, then words and sentence L2-normalised (eps 1e-5);
   ``load_vocab_pkl`` (``post_process_text`` L145-152): words normalised first, ``words_mask = sum != 0``, the
   sentence is the mean of the normalised words, normalised again.
2. ``input_vid_proj`` / ``input_txt_proj`` (L53-62): ``n_input_proj`` LinearLayers ``LN -> Dropout(input_dropout)
   -> Linear [-> ReLU]`` (ReLU on all but the last). Video positions: :func:`sine_position_embedding` over the mask;
   text positions zero (``use_txt_pos`` false; true: ``txt_position_embed`` of the projected words, L169-172).
3. FW-MESM enhancer (``enhance_encoder``, ``num_recfw_layers`` :class:`T2VLayer` s, L175-182): video queries attend
   the projected words.
4. SS-MESM (L184-222, :class:`SegSenRecon`): the sentences of the row's group (rows with equal ``row_group``, in row
   order, compacted to slots 0..n_g-1 and zero padded: ``split_expand_and_pad``), ``input_txt_proj`` and
   ``input_vid_proj`` applied a second time (L201-202), the own slot replaced by ``masked_sent_token``;
   ``num_recss_layers`` T2V layers, slots = queries, the projected raw video (QVH: ``ss_video_feat``, the group's
   windows) = keys, no positions (L474-483); the own slot's output L2-normalised -> ``recon_feat``;
   ``output_sent_proj(recon_feat)`` -> ``projed_recon_feat``. ``expanded_words = [recon ; projected words]``.
5. Aligner (``t2v_encoder``, ``t2v_layers`` T2V layers, L230-234): enhanced video attends the expanded words.
6. ``transformer`` (:class:`Transformer`, transformer.py L174-205): ``[global_rep_token ; X]`` (+ ``[global_rep_pos
   ; video positions]``), the global token KEY-MASKED (L185-186: no token attends to it), ``enc_layers`` post-norm
   encoder layers, then the DAB-DETR decoder (:class:`Decoder`). Heads (L246-253): ``class_embed`` (index 0 =
   foreground), ``pred_spans = sigmoid(span_embed(hs) + inverse_sigmoid(reference))``; saliency
   ``<saliency_proj1(memory), saliency_proj2(memory_global)> / sqrt(d)`` (L301).
7. Negative branch (L260-302): the text of row ``neg_index[b]`` (recon token stripped for the enhancer), steps 3, 5
   and the encoder again -> ``neg_saliency_scores`` (the decoder's outputs are discarded officially; not run here).
8. MLM pass (train only, L307-332): unknown words <- ``input_txt_proj(unknown_token)``, the ``mlm_mask`` positions
   <- ``input_txt_proj(masked_token)`` (each projection its own dropout, L362-364, L387-389); the enhancer with the
   roles swapped (words = queries, the projected frames inside ``clip_mask`` compacted to the left with their sine
   positions = keys; TwoMLP: the second FFN/norms); ``output_txt_proj`` -> logits over ``vocab_size + 3`` (CLIP) /
   ``+ 1`` (GloVe).

T2V layer (transformer.py L508-540, TwoMLP L573-612): torch ``nn.MultiheadAttention`` (fused in-projection, one
``(d, 3d)`` kernel as in :mod:`jaxprvr.models.clip`; dropout on the probabilities), key padding mask + the extra
``attn_mask = qpad AND kpad`` built with ``repeat(nhead, 1, 1)`` and read batch-major: row b, head h gets the mask of
row ``(b * nhead + h) mod B`` (``t2v_mask="head_major"``, official; ``"per_row"`` its own, which equals the key
padding mask alone); ``x = vid + drop1(attn)``, ``x = x + drop2(linear2(drop(PReLU(linear1(norm1(x))))))``,
``x = norm2(x)`` (the FFN input is normalised, the residual is not). :func:`t2v_attention_mask`.

Decoder (transformer.py L333-420, L723-797; attention.py L276-393): 10 zero queries, anchors ``sigmoid(query_embed)``;
per layer the sine embedding of (c, w) (:func:`sine_embed_for_position`), ``query_pos = ref_point_head(sine)``,
``sine * query_scale(output)`` (identity at layer 0), ``* sigmoid(ref_anchor_head(output)) / w``; self-attention over
separate content/position projections (heads d/nh, scale (d/nh)^-1/2); cross-attention with per-head concatenated
``[content ; sine]`` queries and ``[content ; pos]`` keys (heads 2d/nh, scale (2d/nh)^-1/2, value heads d/nh),
``ca_qpos_proj`` only in layer 0; post-norm residuals; ``bbox_embed`` refinement: the refined reference joins the
heads' list BEFORE ``detach`` (only the next layer's input is stopped), the last layer's refinement is unused; the
final LayerNorm on every intermediate output.

Call: ``model.apply(variables, batch, train=..., neg_index=..., mlm_mask=..., with_neg=..., rngs={"dropout": k})``
-> ``(outputs, aux)``. ``outputs`` (official names, ``MESM.forward`` L334-357): ``pred_logits (R, nq, 2)``,
``pred_spans (R, nq, 2)``, ``saliency_scores (R, Lv)``, ``neg_saliency_scores (R, Lv)`` (only when the negative
branch runs: ``with_neg``, default ``train``; the official eval runs it too and discards it; ``with_neg=True`` for a
comparison with the twin), ``aux_outputs`` (a list over the decoder layers but the last) when
``aux_loss``; with ``rec_ss``: ``projed_video_feat, recon_feat, projed_recon_feat, expanded_words_feat,
expanded_words_mask, enhanced_video_feat, projed_words_feat``; with ``rec_fw`` and ``train``: ``words_mask``,
``recfw_words_logit``. ``aux``: the named intermediates (:data:`AUX_NAMES`). ``neg_index`` (R,) int32
(:func:`sample_outclass_neg`) and ``mlm_mask`` (R, Lw) bool (:func:`sample_mlm_mask`) are inputs (keyword or batch
keys of the same names); a forward that needs one and lacks it is a JaxprvrError.

Padding rows and positions beyond the real ones change nothing for the real rows (the head-major modulo uses
``num_rows``; rows interact only through it, the SS-MESM groups and ``neg_index``); masked logits are filled with the
dtype's lowest finite value instead of ``-inf``, so a fully masked row (a padding row; officially a crash or NaN)
is finite and meaningless, and so are its gradients. The SS-MESM slot capacity ``S`` is ``max_group_rows``, else
``cfg.ss_slots``, else R; any S at least the largest item's row count gives the same numbers (the slots past it are
padding for every row); a smaller one would drop sentences, which the task's batches rule out.

Deviations from the official code (all outside what the official code computes without crashing): the sine
positions (video and the decoder's) are computed in the statistics dtype (the official ``cumsum(dtype=float32)`` and
float32 ``dim_t`` make them float32 even in a float64 run; a float32 run is the official computation); a row
without a valid key (padding) gets a uniform attention instead of NaN; a row without words gets a zero sentence.

Dtypes: ``cfg.compute_dtype`` float32 (official), bfloat16 (Dense matmuls in bf16; LayerNorm statistics, softmax,
positions, masks in float32) or float64 (with jax_enable_x64: everything float64). Outputs float32 (float64 for a
float64 computation).

Init (B9 "Initialisation"): ``xavier_uniform`` on every >1-dim parameter of the enhancer, the aligner and
``transformer`` (decoder MLPs included: it overwrites ``bbox_embed``'s zero last weight; that bias stays 0); torch
defaults elsewhere (Linear U(+-1/sqrt(fan_in)) weight and bias, LayerNorm 1/0, MHA ``in_proj`` xavier + bias 0,
``out_proj`` bias 0, the decoder MHAs' ``out_proj`` bias 0); ``query_embed`` N(0, 1); ``global_rep_{token,pos}``
N(0, 1); ``masked_token``, ``unknown_token``, ``masked_sent_token`` zeros; PReLU 0.25; ``txt_position_embed``
Embedding N(0, 1).

Parameter table (torch key -> Flax path; a numeric path segment joins the previous one with ``_``; the full table, 273
keys, TwoMLP 289, is :func:`parity.mesm_keys.key_rows`):

====================================================================  ===============================================
torch key                                                             Flax ``params`` path (kind)
====================================================================  ===============================================
``global_rep_{token,pos}``, ``masked_token``, ``unknown_token``       same name (param)
``{enhance,t2v}_encoder.t2v_encoder.layers.{i}.self_attn.in_proj_     ``{enhance,t2v}_encoder/t2v_encoder/layers_{i}/
weight`` (3d, d) / ``in_proj_bias``                                   self_attn/in_proj/kernel`` (d, 3d) / ``bias``
``... .self_attn.out_proj``, ``linear1``, ``linear2``                 ``.../self_attn/out_proj``, ... (linear)
``... .norm1``, ``norm2`` (TwoMLP: ``linear{1,2}_1, norm{1,2}_1``)    ``.../norm1`` ... (layernorm)
``... .activation.weight`` (1,)                                       ``.../activation/weight`` (param)
``transformer.encoder.layers.{i}.*``                                  ``transformer/encoder/layers_{i}/*`` (as above)
``transformer.decoder.layers.{i}.{sa,ca}_*_proj``, ``linear{1,2}``     ``transformer/decoder/layers_{i}/...`` (linear)
``transformer.decoder.layers.{i}.{self,cross}_attn.out_proj``         ``.../{self,cross}_attn/out_proj`` (linear)
``transformer.decoder.layers.{i}.norm{1,2,3}``, ``activation``       ``.../norm{1,2,3}``, ``activation/weight``
``transformer.decoder.{norm, query_scale, ref_point_head,             ``transformer/decoder/{norm, query_scale/
bbox_embed, ref_anchor_head}.layers.{j}``                              layers_j, ...}``
``txt_position_embed.position_embeddings.weight``, ``.LayerNorm``     ``txt_position_embed/position_embeddings/
                                                                      embedding``, ``.../LayerNorm``
``span_embed.layers.{j}``, ``class_embed``, ``saliency_proj{1,2}``    ``span_embed/layers_{j}``, ... (linear)
``query_embed.weight`` (nq, 2)                                        ``query_embed/embedding`` (embedding)
``input_{txt,vid}_proj.{j}.{LayerNorm, net.1}``                       ``input_{txt,vid}_proj_{j}/{LayerNorm, net_1}``
``output_txt_proj.0.{LayerNorm, net.1}``, ``output_txt_proj.1``       ``output_txt_proj_0/...``, ``output_txt_proj_1``
``ss_reconstructor.masked_sent_token``                                ``ss_reconstructor/masked_sent_token`` (param)
``ss_reconstructor.recon_trans.layers.{i}.*``                         ``ss_reconstructor/recon_trans/layers_{i}/*``
``ss_reconstructor.output_sent_proj.{j}.*``                           ``ss_reconstructor/output_sent_proj_{j}/*``
====================================================================  ===============================================

Dropout modules (``layers.Dropout``): ``input_*_proj_j/net_0`` (one key per application), the T2V/encoder layers'
``dropout1``, ``dropout``, ``dropout2`` (TwoMLP MLM pass ``dropout_1``, ``dropout2_1``) and ``self_attn/dropout``
(attention probabilities), the decoder layers' ``dropout1..3``, ``dropout``, ``{self,cross}_attn/dropout``,
``txt_position_embed/dropout``, ``ss_reconstructor/output_sent_proj_j/net_0``, ``output_txt_proj_0/net_0``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprvr.config import MESMConfig
from jaxprvr.errors import JaxprvrError
from jaxprvr.models.layers import (F32, Dropout, l2_normalize, layer_norm, resolve_compute_dtype, stat_dtype,
                                   to_dtype, to_float32, to_stat, torch_uniform)
from jaxprvr.models.layers import TorchLinearLayer as LinearLayer

Dtype = Any

T2V_MASKS = ("head_major", "per_row")
TOKENIZERS = ("CLIP", "GloVeNLTK")
TXT_NORM_EPS = 1e-5  # F.normalize(..., eps=1e-5), model.py L131-132, L141-142, L147, L151
RECON_NORM_EPS = 1e-12  # F.normalize default, model.py L486
POS_EPS = 1e-6  # PositionEmbeddingSine, position_encoding.py L63
POS_TEMPERATURE = 10000.0
INV_SIGMOID_EPS = 1e-3  # transformer.py L36, utils/data_utils.py L139
PRELU_INIT = 0.25
AUX_NAMES = (  # the names of torch_ref.mesm's ``aux`` (and the same meaning), lists per layer where it has lists
    "words_feat", "words_mask", "sentence_feat", "projed_video_feat", "projed_words_feat", "vid_position",
    "txt_position", "enhance_layers", "enhanced_video_feat", "ss_batched_vid", "ss_batched_vid_mask",
    "ss_batched_sent", "ss_batched_sent_mask", "ss_projed_vid", "ss_projed_sent", "ss_masked_sent", "ss_sent_loc",
    "ss_recon_tokens", "recon_feat", "projed_recon_feat", "expanded_words_feat", "expanded_words_mask",
    "expanded_txt_position", "aligner_layers", "encoded_video_feat", "encoder_memory", "dec_reference_in",
    "dec_query_sine_embed", "dec_query_pos", "dec_output", "dec_new_reference", "hs", "references", "memory",
    "memory_global", "outputs_class", "outputs_coord", "neg_index", "neg_enhanced_video_feat",
    "neg_encoded_video_feat", "neg_memory", "neg_memory_global", "unknown_token_proj", "masked_token_proj",
    "unknowned_words_feat", "merged_clip_feat", "merged_clip_mask", "merged_clip_position", "masked_words",
    "masked_words_feat", "recfw_out")


# ---------------------------------------------------------------------------------------------- init / helpers


def dense(features: int, fan_in: int, name: Optional[str], dtype: Dtype, init: str = "torch",
          bias: str = "torch") -> nn.Dense:
    """``nn.Linear(fan_in, features)``; ``init`` "torch" (default) or "xavier" (the weight re-initialised by
    ``_reset_parameters``); ``bias`` "torch" (U(+-1/sqrt(fan_in))) or "zeros"."""
    k_init = nn.initializers.xavier_uniform() if init == "xavier" else torch_uniform(fan_in)
    b_init = nn.initializers.zeros if bias == "zeros" else torch_uniform(fan_in)
    return nn.Dense(features, kernel_init=k_init, bias_init=b_init, name=name, dtype=dtype, param_dtype=F32)


def validate_config(cfg: MESMConfig) -> None:
    """JaxprvrErrors for settings this port does not have (named by their config key)."""
    if cfg.t2v_mask not in T2V_MASKS:
        raise JaxprvrError("model.t2v_mask", f"one of {list(T2V_MASKS)}", repr(cfg.t2v_mask))
    if cfg.tokenizer_type not in TOKENIZERS:
        raise JaxprvrError("model.tokenizer_type", f"one of {list(TOKENIZERS)}", repr(cfg.tokenizer_type))
    if cfg.hidden_dim % cfg.nheads or cfg.hidden_dim % 2:
        raise JaxprvrError("model.hidden_dim", f"an even multiple of model.nheads={cfg.nheads}", str(cfg.hidden_dim))
    if not 1 <= cfg.n_input_proj <= 3:
        raise JaxprvrError("model.n_input_proj", "1, 2 or 3 (model.py L51-62)", str(cfg.n_input_proj))
    if cfg.load_vocab_pkl and cfg.tokenizer_type != "GloVeNLTK":
        raise JaxprvrError("model.load_vocab_pkl", "false unless tokenizer_type is GloVeNLTK (runner.py L258-263)",
                           f"true with {cfg.tokenizer_type}")
    if cfg.dec_layers < 1 or cfg.num_queries < 1:
        raise JaxprvrError("model.dec_layers", "at least one decoder layer and one query",
                           f"dec_layers={cfg.dec_layers}, num_queries={cfg.num_queries}")


def video_in_dim(cfg: MESMConfig) -> int:
    """The model's video input width: ``v_feat_dim + 2`` with TEF (utils/config.py L242-243)."""
    return cfg.v_feat_dim + (2 if cfg.use_tef else 0)


def num_classes(cfg: MESMConfig) -> int:
    """MLM classes: ``vocab_size + 3`` for CLIP, ``+ 1`` for GloVe (model.py L74-79)."""
    return cfg.vocab_size + (3 if cfg.tokenizer_type == "CLIP" else 1)


def inverse_sigmoid(x, eps: float = INV_SIGMOID_EPS):
    """``log(clamp(x, eps) / clamp(1 - x, eps))`` after ``clamp(x, 0, 1)`` (transformer.py L36-40); the clamps pass the
    gradient on their boundary, as torch's do."""

    def clamp_min(a, lo):
        return jnp.where(a < lo, lo, a)

    x = jnp.where(x > 1, 1.0, clamp_min(x, 0.0)).astype(x.dtype)
    return jnp.log(clamp_min(x, eps) / clamp_min(1 - x, eps))


def sine_position_embedding(mask, d: int, dtype=F32):
    """``PositionEmbeddingSine(d, normalize=True)`` (position_encoding.py L51-72) of a ``(B, L)`` valid mask:
    ``x = cumsum(mask) / (cumsum[:, -1] + 1e-6) * 2 pi``, ``dim_t = 10000 ** (2 (i // 2) / d)``, ``p = x / dim_t``,
    interleaved ``[sin p_0, cos p_1, sin p_2, cos p_3, ...]`` -> ``(B, L, d)`` in ``dtype``. The last column of the
    cumsum is the valid count (the mask is a prefix), so extra padding changes nothing."""
    x = jnp.cumsum(mask.astype(dtype), axis=1)
    x = x / (x[:, -1:] + POS_EPS) * (2 * math.pi)
    i = jnp.arange(d)
    dim_t = jnp.asarray(POS_TEMPERATURE, dtype) ** (2 * (i // 2) / d).astype(dtype)
    p = x[..., None] / dim_t
    return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(*p.shape[:-1], d)


def sine_embed_for_position(pos, d: int):
    """``gen_sineembed_for_position(pos, d)`` (transformer.py L43-59): ``(..., 2)`` (center, width) -> ``(..., d)``:
    for each coordinate ``v * 2 pi / dim_t`` with ``dim_t = 10000 ** (2 (i // 2) / (d / 2))`` (d/2 entries),
    interleaved sin/cos; ``[center embedding ; width embedding]``."""
    each = d // 2
    i = jnp.arange(each)
    dim_t = jnp.asarray(POS_TEMPERATURE, pos.dtype) ** (2 * (i // 2) / each).astype(pos.dtype)

    def embed(v):
        p = (v * (2 * math.pi))[..., None] / dim_t
        return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(*p.shape[:-1], each)

    return jnp.concatenate([embed(pos[..., 0]), embed(pos[..., 1])], axis=-1)


def t2v_attention_mask(q_pad, k_pad, nhead: int, num_rows, mode: str = "head_major"):
    """The T2V layers' masks, True = masked, ``(B, nhead, Lq, Lk)``: the key padding mask ``k_pad[b]`` OR the extra
    ``attn_mask`` (transformer.py L528-533): ``q_pad[r, i] AND k_pad[r, j]`` of row ``r = (b * nhead + h) mod
    num_rows`` (``"head_major"``: the ``repeat(nhead, 1, 1)`` mask read batch-major by ``nn.MultiheadAttention``;
    ``num_rows`` = B, the real rows) or ``r = b`` (``"per_row"``: then the extra mask adds nothing)."""
    q_pad, k_pad = jnp.asarray(q_pad, bool), jnp.asarray(k_pad, bool)
    b = q_pad.shape[0]
    rows = jnp.arange(b)[:, None]
    if mode == "head_major":
        n = jnp.maximum(jnp.asarray(num_rows, jnp.int32), 1)
        src = (rows * nhead + jnp.arange(nhead)[None, :]) % n
    elif mode == "per_row":
        src = jnp.broadcast_to(rows, (b, nhead))
    else:
        raise JaxprvrError("model.t2v_mask", f"one of {list(T2V_MASKS)}", repr(mode))
    extra = q_pad[src][..., :, None] & k_pad[src][..., None, :]
    return extra | k_pad[:, None, None, :]


def text_features(words_feat, words_mask, load_vocab_pkl: bool = False):
    """The text post-processing (model.py L115-152) in ``words_feat``'s dtype (float32 statistics under bf16):
    ``(words (R, Lw, Dt), words_mask (R, Lw) bool, sentence (R, Dt))``.

    CLIP / GloVe (``load_vocab_pkl`` false): padding words zeroed, ``sentence = sum(words) / count``, then both
    L2-normalised with eps 1e-5. ``load_vocab_pkl`` (``post_process_text``): words normalised first, the mask
    recomputed as ``words.sum(-1) != 0`` (``words_mask`` is ignored), the sentence the mean of the normalised words,
    normalised. A row without words (padding) gets a zero sentence (officially a division by zero)."""
    w = to_stat(words_feat)
    if load_vocab_pkl:
        w = l2_normalize(w, eps=TXT_NORM_EPS)
        mask = jnp.sum(w, axis=-1) != 0
        s = jnp.sum(w, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)[:, None].astype(w.dtype)
    else:
        mask = jnp.asarray(words_mask).astype(bool)
        w = jnp.where(mask[..., None], w, 0.0)
        s = jnp.sum(w, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)[:, None].astype(w.dtype)
        w = l2_normalize(w, eps=TXT_NORM_EPS)
    s = l2_normalize(s, eps=TXT_NORM_EPS)
    return to_dtype(w, words_feat.dtype), mask, to_dtype(s, words_feat.dtype)


def group_slots(row_group, slots: int):
    """SS-MESM's sentence layout (``split_expand_and_pad(num_clips, num_clips, sentence_feat)``, model.py L199, and
    ``_sequence_mask_sent`` L490-503): for row b, slot j holds row ``start_b + j`` of its group (rows with equal
    ``row_group``, contiguous, in row order) for ``j < n_b``; returns ``(slot_rows (R, S) int32, slot_valid (R, S)
    bool, own (R,) int32 the row's own slot)``. Padding rows (``row_group < 0``) get no valid slot and own slot 0."""
    g = jnp.asarray(row_group, jnp.int32)
    r = g.shape[0]
    valid = g >= 0
    same = (g[:, None] == g[None, :]) & valid[:, None] & valid[None, :]
    n = jnp.sum(same, axis=1)
    idx = jnp.arange(r)
    start = jnp.where(valid, jnp.argmax(same, axis=1), idx)
    j = jnp.arange(slots)[None, :]
    slot_rows = jnp.clip(start[:, None] + j, 0, r - 1).astype(jnp.int32)
    return slot_rows, j < n[:, None], (idx - start).astype(jnp.int32)


def compact_left(x, mask):
    """``split_and_pad(mask.sum(1), x[mask])`` (utils/data_utils.py L85-94): each row's selected entries moved to
    the front in order, zeros after; returns ``(x' (R, L, ...), mask' (R, L))``."""
    order = jnp.argsort(jnp.logical_not(mask).astype(jnp.int32), axis=1, stable=True)
    idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
    out = jnp.take_along_axis(x, idx, axis=1)
    new_mask = jnp.arange(mask.shape[1])[None, :] < jnp.sum(mask, axis=1)[:, None]
    return jnp.where(new_mask.reshape(new_mask.shape + (1,) * (x.ndim - 2)), out, 0).astype(x.dtype), new_mask


# ---------------------------------------------------------------------------------------------- sampling


def sample_outclass_neg(key, row_group, num_rows):
    """``sample_outclass_neg`` (utils/data_utils.py L113-124): for each real row, a row of ANOTHER item drawn
    uniformly among the real rows (``row < num_rows``, ``row_group`` differs) -> ``(R,)`` int32. A row without a
    candidate (a batch of one item, where the official code crashes; padding rows) gets -1: a training batch must
    hold at least two items."""
    g = jnp.asarray(row_group, jnp.int32)
    r = g.shape[0]
    real = (jnp.arange(r) < num_rows) & (g >= 0)
    cand = (g[:, None] != g[None, :]) & real[None, :] & real[:, None]
    u = jax.random.uniform(key, (r, r))
    pick = jnp.argmax(jnp.where(cand, u, -1.0), axis=1)
    return jnp.where(jnp.any(cand, axis=1), pick, -1).astype(jnp.int32)


def sample_mlm_mask(key, words_mask, words_weight):
    """FW-MESM's masked words (``MESM._mask_words``, model.py L361-384): for a row with ``l`` valid words, ``k =
    max(l // 3, 1)`` positions among the first ``l`` (none if ``l <= 1``), drawn without replacement with
    probability proportional to ``words_weight`` (``np.random.choice(l, k, replace=False, p=w / sum w)``: successive
    sampling, drawn here as the Gumbel top-k of ``log w``) -> ``(R, Lw)`` bool. Zero-weight positions are never
    drawn (fewer than k positive weights: all of them; numpy raises there)."""
    mask = jnp.asarray(words_mask).astype(bool)
    w = jnp.asarray(words_weight, F32)
    l = jnp.sum(mask, axis=1)
    k = jnp.where(l > 1, jnp.maximum(l // 3, 1), 0)
    pos = jnp.arange(mask.shape[1])[None, :]
    ok = (pos < l[:, None]) & (w > 0)
    gumbel = jax.random.gumbel(key, w.shape, F32)
    score = jnp.where(ok, jnp.log(jnp.where(ok, w, 1.0)) + gumbel, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=1, stable=True), axis=1)
    return (rank < k[:, None]) & ok


# ---------------------------------------------------------------------------------------------- blocks


class MLP(nn.Module):
    """``MLP`` (model.py L397-409 / transformer.py L21-33): ``layers_j`` Linears, ReLU between."""

    hidden: int
    out: int
    num_layers: int
    in_features: int
    dtype: Dtype = F32
    init_kind: str = "torch"
    zero_last_bias: bool = False  # bbox_embed (transformer.py L320-321; the weight is then xavier'ed)

    @nn.compact
    def __call__(self, x):
        dims = [self.in_features] + [self.hidden] * (self.num_layers - 1)
        outs = [self.hidden] * (self.num_layers - 1) + [self.out]
        for j, (n, k) in enumerate(zip(dims, outs)):
            last = j == self.num_layers - 1
            x = dense(k, n, f"layers_{j}", self.dtype, self.init_kind,
                      "zeros" if (last and self.zero_last_bias) else "torch")(x)
            if not last:
                x = jax.nn.relu(x)
        return x


class PReLU(nn.Module):
    """``nn.PReLU()``: one learned slope (torch key ``weight`` (1,), init 0.25); ``x if x >= 0 else a x``."""

    @nn.compact
    def __call__(self, x):
        a = self.param("weight", nn.initializers.constant(PRELU_INIT), (1,), F32)
        return jnp.where(x >= 0, x, a.astype(x.dtype) * x)


class Table(nn.Module):
    """A bare parameter table ``embedding`` (``nn.Embedding.weight``), N(0, 1)."""

    shape: tuple

    @nn.compact
    def __call__(self):
        return self.param("embedding", nn.initializers.normal(stddev=1.0), self.shape, F32)


class FusedInProj(nn.Module):
    """``nn.MultiheadAttention``'s ``in_proj_weight`` (3d, d) / ``in_proj_bias`` as one ``kernel (d, 3d)`` (=
    weight.T) and ``bias (3d,)`` (xavier_uniform, 0: ``_reset_parameters``); q, k, v from their own inputs."""

    d: int
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, q, k, v):
        d = self.d
        kernel = self.param("kernel", nn.initializers.xavier_uniform(), (d, 3 * d), F32).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (3 * d,), F32).astype(self.dtype)

        def proj(x, j):
            return jnp.matmul(to_dtype(x, self.dtype), kernel[:, j * d:(j + 1) * d]) + bias[j * d:(j + 1) * d]

        return proj(q, 0), proj(k, 1), proj(v, 2)


def attention(q, k, v, nhead: int, masked, dropout: Optional[nn.Module], train: bool, subtract_max: bool = False):
    """Scaled dot-product attention of torch's ``multi_head_attention_forward`` (and attention.py L276-393): ``q``
    (B, Lq, E) scaled by ``(E / nhead)^-1/2`` first, heads = contiguous slices, logits in float32 (float64), masked
    entries (``masked`` broadcastable to (B, nhead, Lq, Lk), True = masked) set to the lowest finite value, softmax,
    dropout on the probabilities, ``@ v`` with value heads ``v.shape[-1] / nhead`` -> (B, Lq, Ev).

    ``subtract_max``: attention.py L380-381 subtracts the row max from the logits *with* its gradient before the
    softmax. Exact arithmetic gives the same values and gradients; in float32 the gradient that flows through the
    max is rounding noise that the official code has and ``jax.nn.softmax`` (max under ``stop_gradient``) has not,
    and it is what reaches tensors whose exact gradient is zero (the decoder's first self-attention keys)."""
    b, lq, e = q.shape
    lk = k.shape[1]
    hd, vd = e // nhead, v.shape[-1] // nhead
    st = stat_dtype(q.dtype)
    qh = (q * jnp.asarray(float(hd) ** -0.5, q.dtype)).reshape(b, lq, nhead, hd)
    kh = k.reshape(b, lk, nhead, hd)
    if q.dtype == st:
        logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh)
    else:
        logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh, preferred_element_type=st)
    logits = jnp.where(masked, jnp.finfo(st).min, logits)
    if subtract_max:
        logits = logits - jnp.max(logits, axis=-1, keepdims=True)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        probs = dropout(probs, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", to_dtype(probs, v.dtype), v.reshape(b, lk, nhead, vd))
    return out.reshape(b, lq, nhead * vd)


class TorchMHA(nn.Module):
    """``nn.MultiheadAttention(d, nhead, dropout)`` called batch-first: fused in-projection, :func:`attention`,
    ``out_proj`` (weight torch default or xavier when the owner re-initialises it; bias 0)."""

    d: int
    nhead: int
    dropout: float
    dtype: Dtype = F32
    init_kind: str = "torch"

    @nn.compact
    def __call__(self, query, key, value, masked, *, train: bool = False):
        q, k, v = FusedInProj(self.d, self.dtype, name="in_proj")(query, key, value)
        out = attention(q, k, v, self.nhead, masked, Dropout(self.dropout, name="dropout"), train)
        return dense(self.d, self.d, "out_proj", self.dtype, self.init_kind, "zeros")(out)


class T2VLayer(nn.Module):
    """``T2V_TransformerEncoderLayer`` (transformer.py L485-559) / ``_TwoMLP`` (L562-612), batch-first. ``src_txt``
    (B, Lk, d) keys/values, ``src_vid`` (B, Lq, d) queries, ``txt_pad``/``vid_pad`` True = padding, positions or
    None (zero). ``is_mlm`` with ``two_mlp``: ``linear{1,2}_1``, ``norm{1,2}_1`` (and their dropouts)."""

    cfg: MESMConfig
    init_kind: str = "xavier"
    two_mlp: bool = False
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, src_txt, src_vid, txt_pad, vid_pad, pos_txt, pos_vid, num_rows, *, is_mlm: bool = False,
                 train: bool = False):
        c, dt = self.cfg, self.dtype
        d, ff = c.hidden_dim, c.dim_feedforward
        q = src_vid if pos_vid is None else src_vid + to_dtype(pos_vid, dt)
        k = src_txt if pos_txt is None else src_txt + to_dtype(pos_txt, dt)
        masked = t2v_attention_mask(vid_pad, txt_pad, c.nheads, num_rows, c.t2v_mask)
        attn = TorchMHA(d, c.nheads, c.dropout, dt, self.init_kind, name="self_attn")(q, k, src_txt, masked,
                                                                                       train=train)
        x = src_vid + Dropout(c.dropout, name="dropout1")(attn, deterministic=not train)
        act = PReLU(name="activation")

        def ffn(x, sfx):
            y = layer_norm(name=f"norm1{sfx}", dtype=dt)(x)
            y = act(dense(ff, d, f"linear1{sfx}", dt, self.init_kind)(y))
            y = Dropout(c.dropout, name=f"dropout{sfx}")(y, deterministic=not train)
            y = dense(d, ff, f"linear2{sfx}", dt, self.init_kind)(y)
            x = x + Dropout(c.dropout, name=f"dropout2{sfx}")(y, deterministic=not train)
            return layer_norm(name=f"norm2{sfx}", dtype=dt)(x)

        second = is_mlm and self.two_mlp
        if self.two_mlp and self.is_initializing():  # every official parameter exists after init
            ffn(x, "" if second else "_1")
        return ffn(x, "_1" if second else "")


class T2VStack(nn.Module):
    """``T2V_TransformerEncoder`` (transformer.py L208-242, no final norm: post-norm): ``layers_{i}``; returns the
    output and the list of every layer's output."""

    cfg: MESMConfig
    num_layers: int
    init_kind: str = "xavier"
    two_mlp: bool = False
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, src_txt, src_vid, txt_pad, vid_pad, pos_txt, pos_vid, num_rows, *, is_mlm=False, train=False):
        out, outs = src_vid, []
        for i in range(self.num_layers):
            out = T2VLayer(self.cfg, self.init_kind, self.two_mlp, self.dtype, name=f"layers_{i}")(
                src_txt, out, txt_pad, vid_pad, pos_txt, pos_vid, num_rows, is_mlm=is_mlm, train=train)
            outs.append(out)
        return out, outs


class T2VEncoder(nn.Module):
    """``T2VEncoder`` / ``T2VEncoder_TwoMLP`` (transformer.py L62-116): a :class:`T2VStack` ``t2v_encoder`` with every
    >1-dim parameter xavier-initialised; returns ``(output, [layer outputs])``."""

    cfg: MESMConfig
    num_layers: int
    two_mlp: bool = False
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, src_txt, src_vid, txt_pad, vid_pad, pos_txt, pos_vid, num_rows, *, is_mlm=False, train=False):
        return T2VStack(self.cfg, self.num_layers, "xavier", self.two_mlp, self.dtype, name="t2v_encoder")(
            src_txt, src_vid, txt_pad, vid_pad, pos_txt, pos_vid, num_rows, is_mlm=is_mlm, train=train)


class EncoderLayer(nn.Module):
    """``TransformerEncoderLayer.forward_post`` (transformer.py L637-650): ``q = k = src + pos``, ``v = src``;
    ``norm1(src + drop1(attn))``, ``norm2(src + drop2(linear2(drop(PReLU(linear1(src))))))``."""

    cfg: MESMConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, src, masked, pos, *, train=False):
        c, dt = self.cfg, self.dtype
        d, ff = c.hidden_dim, c.dim_feedforward
        qk = src + pos
        a = TorchMHA(d, c.nheads, c.dropout, dt, "xavier", name="self_attn")(qk, qk, src, masked, train=train)
        src = layer_norm(name="norm1", dtype=dt)(src + Dropout(c.dropout, name="dropout1")(a, deterministic=not train))
        y = PReLU(name="activation")(dense(ff, d, "linear1", dt, "xavier")(src))
        y = dense(d, ff, "linear2", dt, "xavier")(Dropout(c.dropout, name="dropout")(y, deterministic=not train))
        src = src + Dropout(c.dropout, name="dropout2")(y, deterministic=not train)
        return layer_norm(name="norm2", dtype=dt)(src)


class Encoder(nn.Module):
    """``TransformerEncoder`` (transformer.py L245-277; no final norm): ``layers_{i}``."""

    cfg: MESMConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, src, pad, pos, *, train=False):
        masked = pad[:, None, None, :]
        for i in range(self.cfg.enc_layers):
            src = EncoderLayer(self.cfg, self.dtype, name=f"layers_{i}")(src, masked, pos, train=train)
        return src


def uses_ca_qpos(layer_id: int) -> bool:
    """``keep_query_pos=False``: only decoder layer 0 has (and uses) ``ca_qpos_proj`` (transformer.py L329-331,
    L770-776)."""
    return layer_id == 0


def head_reference(new_reference):
    """The refined reference the heads read (transformer.py L393-397): appended to ``ref_points`` before
    ``.detach()``, so gradients flow (only the next layer's input is detached)."""
    return new_reference


class DecoderAttention(nn.Module):
    """The decoder's ``MultiheadAttention`` (attention.py L61-182, L276-393) without in-projection: ``embed_dim``
    heads ``embed_dim / nhead`` (q scaled by its ^-1/2), value heads ``vdim / nhead``, ``out_proj`` Linear(vdim,
    vdim) (xavier weight under ``Transformer``, bias 0), dropout on the probabilities."""

    vdim: int
    nhead: int
    dropout: float
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, q, k, v, masked, *, train=False):
        out = attention(q, k, v, self.nhead, masked, Dropout(self.dropout, name="dropout"), train, subtract_max=True)
        return dense(self.vdim, self.vdim, "out_proj", self.dtype, "xavier", "zeros")(out)


class DecoderLayer(nn.Module):
    """``TransformerDecoderLayer.forward`` (transformer.py L723-797), batch-first."""

    cfg: MESMConfig
    layer_id: int
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, tgt, memory, mem_masked, pos, query_pos, query_sine_embed, *, train=False):
        c, dt = self.cfg, self.dtype
        d, nh, ff = c.hidden_dim, c.nheads, c.dim_feedforward

        def lin(name, n_in=d, n_out=d):
            return dense(n_out, n_in, name, dt, "xavier")

        def drop(name, x):
            return Dropout(c.dropout, name=name)(x, deterministic=not train)

        # self-attention (L734-754)
        q = lin("sa_qcontent_proj")(tgt) + lin("sa_qpos_proj")(query_pos)
        k = lin("sa_kcontent_proj")(tgt) + lin("sa_kpos_proj")(query_pos)
        v = lin("sa_v_proj")(tgt)
        no_mask = jnp.zeros((1, 1, 1, 1), bool)
        t2 = DecoderAttention(d, nh, c.dropout, dt, name="self_attn")(q, k, v, no_mask, train=train)
        tgt = layer_norm(name="norm1", dtype=dt)(tgt + drop("dropout1", t2))
        # cross-attention (L759-793)
        q_content = lin("ca_qcontent_proj")(tgt)
        k_content = lin("ca_kcontent_proj")(memory)
        v = lin("ca_v_proj")(memory)
        k_pos = lin("ca_kpos_proj")(pos)
        if uses_ca_qpos(self.layer_id):
            q = q_content + lin("ca_qpos_proj")(query_pos)
            k = k_content + k_pos
        else:
            q, k = q_content, k_content
        b, nq, _ = q.shape
        lm = k.shape[1]
        sine = lin("ca_qpos_sine_proj")(query_sine_embed)
        hd = d // nh  # per head [content ; sine] queries and [content ; pos] keys (L778-784)
        q = jnp.concatenate([q.reshape(b, nq, nh, hd), sine.reshape(b, nq, nh, hd)], -1).reshape(b, nq, 2 * d)
        k = jnp.concatenate([k.reshape(b, lm, nh, hd), k_pos.reshape(b, lm, nh, hd)], -1).reshape(b, lm, 2 * d)
        t2 = DecoderAttention(d, nh, c.dropout, dt, name="cross_attn")(q, k, v, mem_masked, train=train)
        tgt = layer_norm(name="norm2", dtype=dt)(tgt + drop("dropout2", t2))
        y = PReLU(name="activation")(lin("linear1", d, ff)(tgt))
        y = lin("linear2", ff, d)(drop("dropout", y))
        return layer_norm(name="norm3", dtype=dt)(tgt + drop("dropout3", y))


class Decoder(nn.Module):
    """``TransformerDecoder.forward`` (transformer.py L333-418; cond_elewise query scale, modulate_t_attn, one shared
    ``bbox_embed``, return_intermediate) -> ``(hs (L, B, nq, d), references (L, B, nq, 2), per-layer records)``."""

    cfg: MESMConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, memory, mem_pad, pos, refpoints_unsigmoid, *, train=False):
        c, dt = self.cfg, self.dtype
        d = c.hidden_dim
        st = stat_dtype(dt)
        norm = layer_norm(name="norm", dtype=dt)
        query_scale = MLP(d, d, 2, d, dt, "xavier", name="query_scale")
        ref_point_head = MLP(d, d, 2, d, dt, "xavier", name="ref_point_head")
        bbox_embed = MLP(d, 2, 3, d, dt, "xavier", zero_last_bias=True, name="bbox_embed")
        ref_anchor_head = MLP(d, 1, 2, d, dt, "xavier", name="ref_anchor_head")
        b = memory.shape[0]
        nq = refpoints_unsigmoid.shape[0]
        output = jnp.zeros((b, nq, d), dt)
        ref = jnp.broadcast_to(jax.nn.sigmoid(refpoints_unsigmoid.astype(st))[None], (b, nq, 2))
        ref_points, intermediate = [ref], []
        rec = {k: [] for k in ("dec_reference_in", "dec_query_sine_embed", "dec_query_pos", "dec_output",
                               "dec_new_reference")}
        mem_masked = mem_pad[:, None, None, :]
        for layer_id in range(c.dec_layers):
            obj_center = ref
            sine = sine_embed_for_position(obj_center, d)
            query_pos = ref_point_head(to_dtype(sine, dt))
            if layer_id == 0:
                if self.is_initializing():
                    query_scale(output)
            else:
                sine = sine * to_stat(query_scale(output))
            reft_cond = jax.nn.sigmoid(to_stat(ref_anchor_head(output)))
            sine = sine * (reft_cond[..., 0] / obj_center[..., 1])[..., None]
            output = DecoderLayer(c, layer_id, dt, name=f"layers_{layer_id}")(
                output, memory, mem_masked, pos, query_pos, to_dtype(sine, dt), train=train)
            tmp = to_stat(bbox_embed(output)) + inverse_sigmoid(ref)
            new_ref = jax.nn.sigmoid(tmp)
            if layer_id != c.dec_layers - 1:
                ref_points.append(head_reference(new_ref))
            for k, v in zip(rec, (obj_center, sine, query_pos, output, new_ref)):
                rec[k].append(v)
            ref = jax.lax.stop_gradient(new_ref)
            intermediate.append(norm(output))
        return jnp.stack(intermediate), jnp.stack(ref_points).astype(st), rec


class Transformer(nn.Module):
    """``Transformer.forward`` (transformer.py L174-205): the global token prepended and key-masked (L185-186),
    the encoder, the decoder on the local memory (``decode=False``: encoder only, the negative branch). Returns
    ``(hs, references, memory (B, L, d), memory_global (B, d), records)``."""

    cfg: MESMConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, src, pad, query_embed, pos, global_token, global_pos, *, decode=True, train=False):
        b = src.shape[0]
        pad = jnp.concatenate([jnp.ones((b, 1), bool), pad], axis=1)
        src = jnp.concatenate([global_token, src], axis=1)
        pos = jnp.concatenate([global_pos, pos], axis=1)
        memory = Encoder(self.cfg, self.dtype, name="encoder")(src, pad, pos, train=train)
        memory_global, memory_local = memory[:, 0], memory[:, 1:]
        if not decode:
            return None, None, memory_local, memory_global, {"encoder_memory": memory}
        hs, refs, rec = Decoder(self.cfg, self.dtype, name="decoder")(memory_local, pad[:, 1:], pos[:, 1:],
                                                                       query_embed, train=train)
        return hs, refs, memory_local, memory_global, dict(rec, encoder_memory=memory)


class TrainablePositionalEncoding(nn.Module):
    """``TrainablePositionalEncoding`` (position_encoding.py L10-32): ``Dropout(LayerNorm(x + E[:L]))``, E N(0, 1)."""

    rows: int
    d: int
    dropout: float
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x, *, train=False):
        if x.shape[1] > self.rows:
            raise JaxprvrError("txt_position_embed", f"at most {self.rows} positions", str(x.shape[1]))
        e = nn.Embed(self.rows, self.d, embedding_init=nn.initializers.normal(1.0), name="position_embeddings",
                     dtype=self.dtype, param_dtype=F32)(jnp.arange(x.shape[1]))
        x = layer_norm(name="LayerNorm", dtype=self.dtype)(x + e[None])
        return Dropout(self.dropout, name="dropout")(x, deterministic=not train)


class SegSenRecon(nn.Module):
    """``SegSenRecon`` (model.py L437-503): the own slot <- ``masked_sent_token``, ``recon_trans`` (T2V layers with
    torch default init) with the slots as queries and the video as keys, no positions; the own slot's output
    L2-normalised (eps 1e-12) and ``output_sent_proj``. Returns ``(recon (R, d), projed (R, d), stages)``."""

    cfg: MESMConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, vid, vid_mask, sent, sent_mask, own, num_rows, *, train=False):
        c, dt = self.cfg, self.dtype
        d = c.hidden_dim
        token = self.param("masked_sent_token", nn.initializers.zeros, (d,), F32)
        is_own = jnp.arange(sent.shape[1])[None, :] == own[:, None]
        sent = jnp.where(is_own[..., None], token.astype(dt), sent)
        out, _ = T2VStack(c, c.num_recss_layers, "torch", False, dt, name="recon_trans")(
            vid, sent, ~vid_mask, ~sent_mask, None, None, num_rows, train=train)
        recon = jnp.take_along_axis(out, own[:, None, None], axis=1)[:, 0]
        recon = to_dtype(l2_normalize(to_stat(recon), eps=RECON_NORM_EPS), dt)
        p = LinearLayer(d, d, c.input_dropout, True, dt, name="output_sent_proj_0")(recon, train=train)
        p = LinearLayer(d, d, c.input_dropout, False, dt, name="output_sent_proj_1")(p, train=train)
        return recon, p, {"ss_masked_sent": sent, "ss_sent_loc": is_own, "ss_recon_tokens": out}


# ---------------------------------------------------------------------------------------------- the model


class MESM(nn.Module):
    """The MESM network over a static padded batch. See the module docstring."""

    cfg: MESMConfig
    max_group_rows: int = 0  # SS-MESM slot capacity S (>= the largest item's row count); 0 = R

    @property
    def compute_dtype(self) -> Dtype:
        return resolve_compute_dtype(self.cfg)

    def setup(self):
        c = self.cfg
        validate_config(c)
        dt = self.compute_dtype
        d = c.hidden_dim
        self.enhance_encoder = T2VEncoder(c, c.num_recfw_layers, not c.share_MLP, dt)
        self.t2v_encoder = T2VEncoder(c, c.t2v_layers, False, dt)
        self.transformer = Transformer(c, dt)
        rows = c.max_words_l + 1 if c.rec_ss else c.max_words_l  # runner.py L250-252
        self.txt_position_embed = TrainablePositionalEncoding(rows, d, c.input_dropout, dt)
        self.span_embed = MLP(d, 2, 3, d, dt)
        self.class_embed = dense(2, d, None, dt)
        self.query_embed = Table((c.num_queries, 2))
        relu = [True] * 3
        relu[c.n_input_proj - 1] = False
        ins_t = [c.t_feat_dim] + [d] * 2
        ins_v = [video_in_dim(c)] + [d] * 2
        self.input_txt_proj = [LinearLayer(d, ins_t[j], c.input_dropout, relu[j], dt)
                               for j in range(c.n_input_proj)]
        self.input_vid_proj = [LinearLayer(d, ins_v[j], c.input_dropout, relu[j], dt)
                               for j in range(c.n_input_proj)]
        self.saliency_proj1 = dense(d, d, None, dt)
        self.saliency_proj2 = dense(d, d, None, dt)
        self.global_rep_token = self.param("global_rep_token", nn.initializers.normal(1.0), (d,), F32)
        self.global_rep_pos = self.param("global_rep_pos", nn.initializers.normal(1.0), (d,), F32)
        if c.rec_fw:
            self.masked_token = self.param("masked_token", nn.initializers.zeros, (c.t_feat_dim,), F32)
            self.unknown_token = self.param("unknown_token", nn.initializers.zeros, (c.t_feat_dim,), F32)
            self.output_txt_proj = [LinearLayer(d, d, c.input_dropout, True, dt),
                                    dense(num_classes(c), d, None, dt)]
        if c.rec_ss:
            self.ss_reconstructor = SegSenRecon(c, dt)

    def _proj(self, layers, x, train):
        for layer in layers:
            x = layer(x, train=train)
        return x

    def _positions(self, x, train):
        """``txt_position_embed(x)`` when ``use_txt_pos``, else None (zeros, L169-172 / L225-228)."""
        return self.txt_position_embed(x, train=train) if self.cfg.use_txt_pos else None

    def _saliency(self, memory, memory_global):
        d = self.cfg.hidden_dim
        s = jnp.sum(to_stat(self.saliency_proj1(memory)) * to_stat(self.saliency_proj2(memory_global))[:, None],
                    axis=-1)
        return s / np.sqrt(d)

    def __call__(self, batch, *, train: bool = False, neg_index=None, mlm_mask=None, with_neg: Optional[bool] = None):
        c = self.cfg
        dt = self.compute_dtype
        st = stat_dtype(dt)
        d = c.hidden_dim
        init = self.is_initializing()
        with_neg = train if with_neg is None else with_neg
        video_feat = to_dtype(jnp.asarray(batch["video_feat"]), dt)
        video_mask = jnp.asarray(batch["video_mask"]).astype(bool)
        r = video_feat.shape[0]
        if video_feat.ndim != 3 or video_feat.shape[2] != video_in_dim(c):
            raise JaxprvrError("batch['video_feat']", f"(R, Lv, {video_in_dim(c)}) (v_feat_dim + TEF)",
                               str(tuple(video_feat.shape)))
        words_in = to_dtype(jnp.asarray(batch["words_feat"]), dt)
        if words_in.ndim != 3 or words_in.shape[:2] != (r, words_in.shape[1]) or words_in.shape[2] != c.t_feat_dim:
            raise JaxprvrError("batch['words_feat']", f"(R={r}, Lw, t_feat_dim={c.t_feat_dim})",
                               str(tuple(words_in.shape)))
        words_mask_in = batch.get("words_mask")
        if words_mask_in is None:
            if not c.load_vocab_pkl:
                raise JaxprvrError("batch", "a 'words_mask' (R, Lw)", "none")
            words_mask_in = jnp.ones(words_in.shape[:2], bool)
        num_rows = jnp.asarray(batch.get("num_rows", r), jnp.int32)
        row_group = jnp.asarray(batch["row_group"], jnp.int32)
        aux = {}

        # 1-2. text, projections, positions (L155-172)
        words_feat, words_mask, sentence_feat = text_features(words_in, words_mask_in, c.load_vocab_pkl)
        projed_video_feat = self._proj(self.input_vid_proj, video_feat, train)
        projed_words_feat = self._proj(self.input_txt_proj, words_feat, train)
        vid_position = sine_position_embedding(video_mask, d, st)
        txt_position = self._positions(projed_words_feat, train)
        aux.update(words_feat=words_feat, words_mask=words_mask, sentence_feat=sentence_feat,
                   projed_video_feat=projed_video_feat, projed_words_feat=projed_words_feat, vid_position=vid_position)
        if txt_position is not None:
            aux["txt_position"] = txt_position

        # 3. FW-MESM enhancer (L175-182)
        if c.rec_fw or init:
            enhanced, aux["enhance_layers"] = self.enhance_encoder(
                projed_words_feat, projed_video_feat, ~words_mask, ~video_mask, txt_position, vid_position, num_rows,
                train=train)
        enhanced_video_feat = enhanced if c.rec_fw else projed_video_feat
        aux["enhanced_video_feat"] = enhanced_video_feat

        # 4. SS-MESM (L184-222)
        if c.rec_ss:
            if "ss_video_feat" in batch:  # QVH: the group's windows (split_expand_and_pad, L190-195)
                ss_vid = to_dtype(jnp.asarray(batch["ss_video_feat"]), dt)
                ss_vid_mask = jnp.asarray(batch["ss_video_mask"]).astype(bool)
            else:  # charades / tacos: the row's own video (L185-189)
                ss_vid, ss_vid_mask = video_feat, video_mask
            slot_rows, slot_valid, own = group_slots(row_group, self.max_group_rows or c.ss_slots or r)
            sent = jnp.where(slot_valid[..., None], sentence_feat[slot_rows], 0).astype(dt)
            ss_vid_p = self._proj(self.input_vid_proj, ss_vid, train)  # the second application (L201-202)
            sent_p = self._proj(self.input_txt_proj, sent, train)
            recon_feat, projed_recon_feat, ss_rec = self.ss_reconstructor(ss_vid_p, ss_vid_mask, sent_p, slot_valid,
                                                                          own, num_rows, train=train)
            expanded_words_feat = jnp.concatenate([recon_feat[:, None], projed_words_feat], axis=1)
            expanded_words_mask = jnp.concatenate([jnp.ones((r, 1), bool), words_mask], axis=1)
            aux.update(ss_rec, ss_batched_vid=ss_vid, ss_batched_vid_mask=ss_vid_mask, ss_batched_sent=sent,
                       ss_batched_sent_mask=slot_valid, ss_projed_vid=ss_vid_p, ss_projed_sent=sent_p,
                       recon_feat=recon_feat, projed_recon_feat=projed_recon_feat)
        else:
            expanded_words_feat, expanded_words_mask = projed_words_feat, words_mask
        expanded_txt_position = self._positions(expanded_words_feat, train)
        aux.update(expanded_words_feat=expanded_words_feat, expanded_words_mask=expanded_words_mask)
        if expanded_txt_position is not None:
            aux["expanded_txt_position"] = expanded_txt_position

        # 5. aligner (L230-234)
        encoded, aux["aligner_layers"] = self.t2v_encoder(
            expanded_words_feat, enhanced_video_feat, ~expanded_words_mask, ~video_mask, expanded_txt_position,
            vid_position, num_rows, train=train)
        # 6. transformer and heads (L236-253, L301)
        g_tok = jnp.broadcast_to(self.global_rep_token.astype(dt), (r, 1, d))
        g_pos = jnp.broadcast_to(self.global_rep_pos.astype(dt), (r, 1, d))
        query_embed = self.query_embed()
        vid_pos_dt = to_dtype(vid_position, dt)
        hs, references, memory, memory_global, t_rec = self.transformer(encoded, ~video_mask, query_embed, vid_pos_dt,
                                                                        g_tok, g_pos, train=train)
        outputs_class = to_stat(self.class_embed(hs))
        outputs_coord = jax.nn.sigmoid(to_stat(self.span_embed(hs)) + inverse_sigmoid(references))
        saliency_scores = self._saliency(memory, memory_global)
        aux.update(t_rec, encoded_video_feat=encoded, memory=memory, memory_global=memory_global, hs=hs,
                   references=references, outputs_class=outputs_class, outputs_coord=outputs_coord)
        out = {"pred_logits": outputs_class[-1], "pred_spans": outputs_coord[-1], "saliency_scores": saliency_scores}

        # 7. negative branch (L260-302)
        if with_neg:
            neg_index = self._input(batch, "neg_index", neg_index, "the negative branch (train or with_neg=True)")
            neg_index = jnp.clip(jnp.asarray(neg_index, jnp.int32), 0, r - 1)
            neg_expanded = expanded_words_feat[neg_index]
            neg_expanded_mask = expanded_words_mask[neg_index]
            neg_expanded_pos = None if expanded_txt_position is None else expanded_txt_position[neg_index]
            if c.rec_ss:
                neg_words, neg_words_mask = neg_expanded[:, 1:], neg_expanded_mask[:, 1:]
                neg_pos = None if neg_expanded_pos is None else neg_expanded_pos[:, 1:]
            else:
                neg_words, neg_words_mask, neg_pos = neg_expanded, neg_expanded_mask, neg_expanded_pos
            if c.rec_fw:
                neg_enhanced, _ = self.enhance_encoder(neg_words, projed_video_feat, ~neg_words_mask, ~video_mask,
                                                       neg_pos, vid_position, num_rows, train=train)
            else:
                neg_enhanced = projed_video_feat
            neg_encoded, _ = self.t2v_encoder(neg_expanded, neg_enhanced, ~neg_expanded_mask, ~video_mask,
                                              neg_expanded_pos, vid_position, num_rows, train=train)
            _, _, neg_memory, neg_memory_global, _ = self.transformer(neg_encoded, ~video_mask, query_embed,
                                                                      vid_pos_dt, g_tok, g_pos, decode=False,
                                                                      train=train)
            out["neg_saliency_scores"] = self._saliency(neg_memory, neg_memory_global)
            aux.update(neg_index=neg_index, neg_enhanced_video_feat=neg_enhanced, neg_encoded_video_feat=neg_encoded,
                       neg_memory=neg_memory, neg_memory_global=neg_memory_global)

        if c.aux_loss:
            out["aux_outputs"] = [{"pred_logits": outputs_class[i], "pred_spans": outputs_coord[i]}
                                  for i in range(c.dec_layers - 1)]
        if c.rec_ss:
            out.update(projed_video_feat=projed_video_feat, recon_feat=recon_feat,
                       projed_recon_feat=projed_recon_feat, expanded_words_feat=expanded_words_feat,
                       expanded_words_mask=expanded_words_mask, enhanced_video_feat=enhanced_video_feat,
                       projed_words_feat=projed_words_feat)

        # 8. the MLM pass (L307-332)
        if c.rec_fw and (train or init):
            if init and mlm_mask is None and "mlm_mask" not in batch:
                masked_words = jnp.zeros(words_mask.shape, bool)
            else:
                masked_words = jnp.asarray(self._input(batch, "mlm_mask", mlm_mask, "the MLM pass (train)"))
                masked_words = masked_words.astype(bool)
            unknown = jnp.asarray(batch["unknown_mask"]).astype(bool)
            clip_mask = jnp.asarray(batch["clip_mask"]).astype(bool)
            unk = self._proj(self.input_txt_proj, self.unknown_token.astype(dt)[None, None], train)
            unknowned = jnp.where(unknown[..., None], unk, projed_words_feat)
            merged_clip, merged_mask = compact_left(projed_video_feat, clip_mask)
            msk = self._proj(self.input_txt_proj, self.masked_token.astype(dt)[None, None], train)
            masked_words_feat = jnp.where(masked_words[..., None], msk, unknowned)
            merged_pos, _ = compact_left(vid_position, clip_mask)
            recfw_out, _ = self.enhance_encoder(merged_clip, masked_words_feat, ~merged_mask, ~words_mask, merged_pos,
                                                txt_position, num_rows, is_mlm=True, train=train)
            logits = self.output_txt_proj[1](self.output_txt_proj[0](recfw_out, train=train))
            aux.update(unknown_token_proj=unk, masked_token_proj=msk, unknowned_words_feat=unknowned,
                       merged_clip_feat=merged_clip, merged_clip_mask=merged_mask, merged_clip_position=merged_pos,
                       masked_words=masked_words, masked_words_feat=masked_words_feat, recfw_out=recfw_out)
            if train:
                out.update(words_mask=words_mask, recfw_words_logit=to_stat(logits))
        if init and not c.use_txt_pos:  # txt_position_embed exists officially even when unused
            self.txt_position_embed(projed_words_feat)
        return to_float32(out), to_float32(aux)

    @staticmethod
    def _input(batch, name, value, what):
        if value is None:
            value = batch.get(name)
        if value is None:
            raise JaxprvrError(f"MESM input {name!r}", f"an injected {name} for {what} (sample_outclass_neg / "
                               "sample_mlm_mask)", "none")
        return value
