"""MTM (tianxinlin666/MTM, ``src/Models/MTM/model.py``), prvr.md §6: building blocks.

* :class:`TCN` (``model.py:28-50``): ``LN(x + clamp(alpha, 0, 1) * Drop(ReLU(conv2(Drop(ReLU(conv1(x)))))))``,
  both convs ``Conv1d(D, D, k=3, padding=1)`` (torch default init under MTM's ``reset_parameters``), dropout
  hard-coded 0.1, ``alpha`` a learnable scalar starting at 0.5; unmasked (padding leaks into the last frames,
  as officially).
* :func:`mamba_residual`: the clip and frame branches' ``h + LN(Mamba(LN(Mamba(h))))`` (``model.py:300-305,
  319-324``): ``num_mamba_layers`` pairs of (``Mamba``, ``nn.LayerNorm``) held in one list, so the torch keys
  are ``clip_mamba.0.*`` (Mamba), ``clip_mamba.1.{weight,bias}`` (LayerNorm), ... and the Flax names
  ``clip_mamba_0``, ``clip_mamba_1``, ... (:func:`make_mamba_stack`, assigned in ``setup``). No mask inside; padded rows are not
  re-zeroed after it (official).
* :class:`AttentionPooling` (``model.py:52-66``): ``softmax(masked_fill(attn_proj(x), mask == 0, -1e9))``
  over time, weighted sum (``attn_proj`` has a bias).
* :class:`MLPReconstructor` (``model.py:9-26``): Linear/ReLU/Dropout layers in a ``mlp`` Sequential; the hidden
  width is ``min(input * factor, output)``.

Parameter names follow the torch attributes (``conv1``, ``conv2``, ``layer_norm``, ``alpha``; ``attn_proj``;
``mlp_0``, ``mlp_3`` for ``mlp.0``/``mlp.3``); key rows in :mod:`parity.keys`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprvr.models.layers import dense, layer_norm
from jaxprvr.models.mamba import Mamba

TCN_DROPOUT = 0.1  # hard-coded in MTM_Net (model.py: TCN(hidden_size, dropout=0.1))
POOL_FILL = -1e9


def _torch_conv_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class TCN(nn.Module):
    hidden_size: int
    dropout: float = TCN_DROPOUT

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        d = self.hidden_size

        def conv(name):
            init = _torch_conv_init(3 * d)  # torch Conv1d default: fan_in = in_channels * kernel
            return nn.Conv(d, kernel_size=(3,), padding=[(1, 1)], name=name, kernel_init=init, bias_init=init)

        y = nn.Dropout(self.dropout)(jax.nn.relu(conv("conv1")(x)), deterministic=not train)
        y = nn.Dropout(self.dropout)(jax.nn.relu(conv("conv2")(y)), deterministic=not train)
        alpha = self.param("alpha", nn.initializers.constant(0.5), ())
        return layer_norm("layer_norm")(x + jnp.clip(alpha, 0.0, 1.0) * y)


def make_mamba_stack(d_model: int, num_layers: int, scan: str = "sequential") -> list:
    """``[Mamba, LayerNorm] * num_layers`` (MTM's init: its ``reset_parameters`` re-initialises the Mamba
    Linears). Assign it to an attribute in ``setup`` (``self.clip_mamba = make_mamba_stack(...)``): Flax then
    names the entries ``clip_mamba_0``, ``clip_mamba_1``, ... like the torch ModuleList ``clip_mamba.0``, ..."""
    layers = []
    for _ in range(num_layers):
        layers.append(Mamba(d_model, d_state=16, d_conv=4, expand=2, init_scheme="mtm", scan=scan))
        layers.append(layer_norm())
    return layers


def mamba_residual(layers, h):
    """``h + LN(Mamba(... LN(Mamba(h))))`` over the ``[Mamba, LayerNorm, ...]`` list."""
    m = h
    for i in range(0, len(layers), 2):
        m = layers[i + 1](layers[i](m))
    return h + m


class AttentionPooling(nn.Module):
    hidden_size: int

    @nn.compact
    def __call__(self, x, mask=None):
        scores = dense(1, name="attn_proj")(x)  # (N, L, 1)
        if mask is not None:
            scores = jnp.where(mask[..., None] == 0, POOL_FILL, scores)
        w = jax.nn.softmax(scores, axis=1)
        return jnp.sum(x * w, axis=1)


class MLPReconstructor(nn.Module):
    input_dim: int
    output_dim: int
    num_layers: int = 2
    hidden_dim_factor: float = 2
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        cur, idx = self.input_dim, 0
        for _ in range(self.num_layers - 1):
            nxt = min(int(cur * self.hidden_dim_factor), self.output_dim)
            x = jax.nn.relu(dense(nxt, name=f"mlp_{idx}")(x))
            x = nn.Dropout(self.dropout)(x, deterministic=not train)
            cur, idx = nxt, idx + 3
        return dense(self.output_dim, name=f"mlp_{idx}")(x)
