"""OpenAI CLIP (ViT image tower + causal text tower) in Flax, usable on its own.

The architecture of openai/CLIP ``clip/model.py`` as BackBone_tvr runs it (``backbone_tvr/tvr/models/module_clip.py``
L218-465, the same as DRL's): pre-LN residual blocks with torch's fused ``in_proj`` attention and a QuickGELU MLP,
LayerNorm (eps 1e-5) computed in float32 and cast back (``LayerNorm.forward``, L218-224).

- Vision (``VisualTransformer``, L271-311): a bias-free patch conv (kernel = stride = patch), the class embedding
  prepended, positional embeddings added, ``ln_pre``, the blocks (no mask), then ``ln_post`` and ``@ proj`` on
  **every** token (BackBone's ``encode_image`` L436-445; OpenAI applies them to the class token only, which gives
  the same token 0).
- Text (``encode_text`` L447-465): token embedding + positional rows ``[:L]`` (L <= context length), the causal
  mask (``-inf`` above the diagonal, built at the current length, L424-430), ``ln_final``, ``@ text_projection``
  on every token; the sentence embedding is the token at ``argmax(ids)`` (EOT, the largest id). No padding mask:
  causality keeps tokens up to EOT independent of the padding after it.

Sizes come from the weights (:meth:`CLIPDims.from_state_dict`, ``modeling.py`` L48-60 / ``build_model``), so
ViT-B/32 and ViT-B/16 (and the tiny random models of the tests) are the same code. ``precision``: ``fp32`` (the
official CPU path: no ``convert_weights``), ``bf16`` (matmuls and activations in bfloat16, LayerNorm statistics
and softmax in float32), ``fp16`` (float16 activations: what ``convert_weights`` computes on a GPU, behaviour not
bits), ``fp64`` (float64 throughout, for the float64 parity runs under ``jax_enable_x64``). ``remat``: rematerialise each residual block in the backward pass.

Parameter tree (the key table in ``parity/clip.py`` maps it to OpenAI's 302 keys): ``visual/{conv1/kernel,
class_embedding, positional_embedding, ln_pre, transformer/resblocks_i, ln_post, proj}``, ``text/{token_embedding,
positional_embedding, transformer/resblocks_i, ln_final, text_projection}``, ``logit_scale``. A block holds
``ln_1, in_proj (kernel (W, 3W) = in_proj_weight.T), out_proj, ln_2, c_fc, c_proj``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprvr.errors import JaxprvrError

F32 = jnp.float32
PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16, "fp64": jnp.float64}
CLIP_LN_EPS = 1e-5
# preprocessing constants of openai/CLIP clip/clip.py L79-86 (Normalize after ToTensor)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SOT_ID, EOT_ID = 49406, 49407
# the scalar entries of a TorchScript archive's state dict that are not parameters (clip/model.py L430-432)
NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclasses.dataclass(frozen=True)
class CLIPDims:
    """CLIP's hyper-parameters; ``*_heads = 0`` means ``width // 64`` (OpenAI's rule)."""

    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 32
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    vision_heads: int = 0
    text_heads: int = 0

    @property
    def v_heads(self) -> int:
        return self.vision_heads or self.vision_width // 64

    @property
    def t_heads(self) -> int:
        return self.text_heads or self.text_width // 64

    @property
    def grid(self) -> int:
        return self.image_resolution // self.vision_patch_size

    def validate(self, where: str = "CLIPDims") -> "CLIPDims":
        for name, width, heads in (("vision", self.vision_width, self.v_heads), ("text", self.text_width,
                                                                               self.t_heads)):
            if heads < 1 or width % heads:
                raise JaxprvrError(where, f"a {name} width divisible by its head count (>= 1)",
                                   f"width {width}, heads {heads}")
        if self.image_resolution % self.vision_patch_size:
            raise JaxprvrError(where, "an image resolution that is a multiple of the patch size",
                               f"{self.image_resolution} / {self.vision_patch_size}")
        return self

    @classmethod
    def from_state_dict(cls, sd, prefix: str = "", where: str = "state dict") -> "CLIPDims":
        """The sizes of an OpenAI-format CLIP state dict (``build_model``: widths from ``conv1`` / ``ln_final``,
        layer counts from the block keys, the resolution from the positional rows). ``prefix``: ``"clip."`` for a
        BackBone_tvr checkpoint. Shapes are read with ``np.shape``, so tensors and arrays both work. A state dict
        without the visual part (MESM's ``clip_text_encoder.pth``) gives the text sizes and ViT-B/32's visual ones."""

        def shape(key):
            if prefix + key not in sd:
                raise JaxprvrError(where, f"the CLIP key {prefix + key!r}", "no such key")
            return tuple(np.shape(sd[prefix + key]))

        def count(tower):
            rx = re.compile(re.escape(prefix + tower) + r"transformer\.resblocks\.(\d+)\.")
            idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
            return len(idx)

        if any(k.startswith(prefix + "visual.layer1") for k in sd):
            raise JaxprvrError(where, "a ViT CLIP", "a ResNet CLIP (visual.layer1...): not supported")
        text_width = shape("ln_final.weight")[0]
        kw = dict(embed_dim=shape("text_projection")[1], context_length=shape("positional_embedding")[0],
                  vocab_size=shape("token_embedding.weight")[0], text_width=text_width, text_layers=count(""))
        if prefix + "visual.conv1.weight" in sd:
            width, _, patch, _ = shape("visual.conv1.weight")
            grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
            kw.update(vision_width=width, vision_patch_size=patch, image_resolution=patch * grid,
                      vision_layers=count("visual."))
        return cls(**kw).validate(where)


VIT_B_32 = CLIPDims()
VIT_B_16 = CLIPDims(vision_patch_size=16)


def quick_gelu(x):
    """``x * sigmoid(1.702 x)`` (``QuickGELU``)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _ln(name: str, eps: float, dtype) -> nn.LayerNorm:
    """torch's LayerNorm computed in float32 (float64 for float64 input) and cast to ``dtype``."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name, dtype=dtype, param_dtype=F32)


def _stat(x):
    return x if x.dtype == jnp.float64 else x.astype(F32)


def torch_linear_init(fan_in: int):
    """``nn.Linear``'s default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=F32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ResidualAttentionBlock(nn.Module):
    """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` (``ResidualAttentionBlock``). ``mask``: boolean, broadcastable
    to ``(B, heads, L, L)``, True = attend (the causal mask; a fully masked row cannot occur there); ``bias``:
    additive, broadcastable likewise (seqTransf's ``-1e6`` on padded keys). ``init``: ``"torch"`` (the modules'
    defaults: the vision tower), ``"openai_text"`` (``initialize_parameters``' normals with ``init_std = (attn,
    proj, fc)``; biases at torch's defaults) or ``"bert"`` (BackBone_tvr's ``init_weights``: Linear weights
    N(0, 0.02), biases 0; ``in_proj`` keeps MultiheadAttention's xavier, as it is not an ``nn.Linear``)."""

    width: int
    heads: int
    ln_eps: float = CLIP_LN_EPS
    dtype: Any = F32
    init_std: Optional[tuple] = None
    init: str = "torch"

    @nn.compact
    def __call__(self, x, mask=None, bias=None):
        w, h = self.width, self.heads
        d = w // h
        in_init = nn.initializers.xavier_uniform()  # nn.MultiheadAttention._reset_parameters (bias 0)
        if self.init == "openai_text":
            a, p, f = self.init_std
            in_init, out_init = nn.initializers.normal(a), nn.initializers.normal(p)
            fc_init, proj_init = nn.initializers.normal(f), nn.initializers.normal(p)
            fc_bias, proj_bias = torch_linear_init(w), torch_linear_init(4 * w)
        elif self.init == "bert":
            out_init = fc_init = proj_init = nn.initializers.normal(0.02)
            fc_bias = proj_bias = nn.initializers.zeros
        else:
            out_init, fc_init, proj_init = (torch_linear_init(w), torch_linear_init(w), torch_linear_init(4 * w))
            fc_bias, proj_bias = torch_linear_init(w), torch_linear_init(4 * w)
        dense = dict(dtype=self.dtype, param_dtype=F32)
        y = _ln("ln_1", self.ln_eps, self.dtype)(x)
        qkv = nn.Dense(3 * w, kernel_init=in_init, bias_init=nn.initializers.zeros, name="in_proj", **dense)(y)
        b, n = x.shape[0], x.shape[1]
        q, k, v = (t.reshape(b, n, h, d) for t in jnp.split(qkv, 3, axis=-1))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(d ** -0.5, q.dtype), k)
        logits = _stat(logits)
        if bias is not None:
            logits = logits + bias
        if mask is not None:
            logits = jnp.where(mask, logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        att = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, w)
        x = x + nn.Dense(w, kernel_init=out_init, bias_init=nn.initializers.zeros, name="out_proj", **dense)(att)
        y = _ln("ln_2", self.ln_eps, self.dtype)(x)
        y = nn.Dense(4 * w, kernel_init=fc_init, bias_init=fc_bias, name="c_fc", **dense)(y)
        y = nn.Dense(w, kernel_init=proj_init, bias_init=proj_bias, name="c_proj", **dense)(quick_gelu(y))
        return x + y


class Transformer(nn.Module):
    """``layers`` residual blocks named ``resblocks_i``; ``remat``: each block rematerialised in the backward."""

    width: int
    layers: int
    heads: int
    ln_eps: float = CLIP_LN_EPS
    dtype: Any = F32
    init_std: Optional[tuple] = None
    remat: bool = False
    init: str = "torch"

    @nn.compact
    def __call__(self, x, mask=None, bias=None):
        block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
        for i in range(self.layers):
            x = block(self.width, self.heads, self.ln_eps, self.dtype, self.init_std, self.init,
                      name=f"resblocks_{i}")(x, mask, bias)
        return x


class PatchConv(nn.Module):
    """``conv1``: Conv2d(3, width, kernel = stride = patch, bias=False) on NCHW pixels, as one matmul over the
    non-overlapping patches; the kernel is stored HWIO like a Flax conv (``kernel (p, p, 3, width)``)."""

    width: int
    patch: int
    dtype: Any = F32

    @nn.compact
    def __call__(self, pixels):
        p = self.patch
        n, c, hh, ww = pixels.shape
        fan_in = c * p * p
        kernel = self.param("kernel", torch_linear_init(fan_in), (p, p, c, self.width), F32)
        g_h, g_w = hh // p, ww // p
        x = pixels[:, :, :g_h * p, :g_w * p].reshape(n, c, g_h, p, g_w, p)
        x = x.transpose(0, 2, 4, 3, 5, 1).reshape(n, g_h * g_w, p * p * c)  # (kh, kw, c) order = HWI
        return jnp.einsum("npk,kw->npw", x.astype(self.dtype), kernel.reshape(p * p * c, self.width).astype(
            self.dtype))


class VisionTower(nn.Module):
    """``VisualTransformer`` + ``ln_post`` and ``proj`` on every token: pixels ``(N, 3, R, R)`` float ->
    ``{"embeds": (N, D), "tokens": (N, grid^2 + 1, D)}`` (token 0 = the class token = the image embedding)."""

    dims: CLIPDims
    dtype: Any = F32
    remat: bool = False

    @nn.compact
    def __call__(self, pixels):
        dm = self.dims
        w = dm.vision_width
        scale = w ** -0.5
        x = PatchConv(w, dm.vision_patch_size, self.dtype, name="conv1")(pixels)
        cls = self.param("class_embedding", nn.initializers.normal(scale), (w,), F32)
        pos = self.param("positional_embedding", nn.initializers.normal(scale), (dm.grid ** 2 + 1, w), F32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, w)), x], axis=1)
        x = x + pos.astype(x.dtype)
        x = _ln("ln_pre", CLIP_LN_EPS, self.dtype)(x)
        x = Transformer(w, dm.vision_layers, dm.v_heads, dtype=self.dtype, remat=self.remat, name="transformer")(x)
        x = _ln("ln_post", CLIP_LN_EPS, self.dtype)(x)
        proj = self.param("proj", nn.initializers.normal(scale), (w, dm.embed_dim), F32)
        tokens = x @ proj.astype(x.dtype)
        return {"embeds": tokens[:, 0], "tokens": tokens}


def causal_mask(n: int):
    """``build_attention_mask``: True on and below the diagonal, ``(1, 1, n, n)``."""
    return jnp.tril(jnp.ones((n, n), bool))[None, None]


class TextTower(nn.Module):
    """The text half of CLIP (runs alone: MESM's frozen text encoder, text features): ids ``(B, L)`` int,
    L <= ``context_length``, 0-padded after EOT -> ``{"embeds": (B, D) at argmax(ids), "hidden": (B, L, W) after
    ln_final (before the projection), "tokens": (B, L, D) = hidden @ text_projection}``."""

    dims: CLIPDims
    dtype: Any = F32
    remat: bool = False

    @nn.compact
    def __call__(self, ids):
        dm = self.dims
        w, n = dm.text_width, ids.shape[-1]
        if n > dm.context_length:
            raise JaxprvrError("text ids", f"at most context_length = {dm.context_length} tokens", f"{n}")
        emb = nn.Embed(dm.vocab_size, w, embedding_init=nn.initializers.normal(0.02), param_dtype=F32,
                       name="token_embedding")(ids)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01), (dm.context_length, w), F32)
        x = (emb + pos[:n]).astype(self.dtype)
        # initialize_parameters (clip/model.py): attn W^-1/2, proj W^-1/2 (2 layers)^-1/2, fc (2W)^-1/2
        std = (w ** -0.5, (w ** -0.5) * ((2 * dm.text_layers) ** -0.5), (2 * w) ** -0.5)
        x = Transformer(w, dm.text_layers, dm.t_heads, dtype=self.dtype, init_std=std, remat=self.remat,
                        init="openai_text", name="transformer")(x, mask=causal_mask(n))
        hidden = _ln("ln_final", CLIP_LN_EPS, self.dtype)(x)
        proj = self.param("text_projection", nn.initializers.normal(w ** -0.5), (w, dm.embed_dim), F32)
        tokens = hidden @ proj.astype(hidden.dtype)
        eot = jnp.argmax(ids, axis=-1)
        embeds = jnp.take_along_axis(tokens, eot[:, None, None], axis=1)[:, 0]
        return {"embeds": embeds, "hidden": hidden, "tokens": tokens}


class CLIP(nn.Module):
    """Both towers and ``logit_scale``. ``__call__(pixels, ids) -> (outputs, aux)`` (the zero-shot logits of
    ``CLIP.forward``); ``encode_image`` / ``encode_text`` return the towers' dicts."""

    dims: CLIPDims = VIT_B_32
    precision: str = "fp32"
    remat: bool = False
    logit_scale_init: float = float(np.log(1 / 0.07))

    def setup(self):
        if self.precision not in PRECISIONS:
            raise JaxprvrError("model.precision", f"one of {sorted(PRECISIONS)}", repr(self.precision))
        dt = PRECISIONS[self.precision]
        self.visual = VisionTower(self.dims, dt, self.remat)
        self.text = TextTower(self.dims, dt, self.remat)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), (), F32)

    def encode_image(self, pixels):
        return self.visual(pixels)

    def encode_text(self, ids):
        return self.text(ids)

    def __call__(self, pixels, ids):
        img, txt = self.visual(pixels), self.text(ids)
        i = _stat(img["embeds"])
        t = _stat(txt["embeds"])
        i = i / jnp.linalg.norm(i, axis=-1, keepdims=True)
        t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
        logits_per_image = jnp.exp(self.logit_scale) * i @ t.T
        return {"logits_per_image": logits_per_image, "logits_per_text": logits_per_image.T}, {
            "image": img, "text": txt}


def init_clip(dims: CLIPDims, key, precision: str = "fp32", image: bool = True, batch: int = 1):
    """Random parameters of :class:`CLIP` (OpenAI's init for the text tower, torch's defaults elsewhere)."""
    model = CLIP(dims.validate(), precision)
    pixels = jnp.zeros((batch, 3, dims.image_resolution, dims.image_resolution), F32)
    ids = jnp.zeros((batch, min(8, dims.context_length)), jnp.int32)
    return model, model.init(key, pixels, ids)["params"]


__all__ = ["CLIP", "CLIPDims", "VisionTower", "TextTower", "Transformer", "ResidualAttentionBlock", "PatchConv",
           "VIT_B_32", "VIT_B_16", "CLIP_MEAN", "CLIP_STD", "SOT_ID", "EOT_ID", "NON_PARAMETER_KEYS", "init_clip",
           "quick_gelu", "causal_mask", "PRECISIONS"]
