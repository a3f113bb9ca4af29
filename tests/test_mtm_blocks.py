"""MTM building blocks against their PyTorch twins (the Mamba layers are the official mamba_ssm ones):
TCN, the residual Mamba stack, attention pooling, the MLP reconstructor; key rows and MTM's init."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprvr.models import mtm
from parity import convert, keys
from torch_ref import layers as tl
from torch_ref import mtm as tmtm

D, L = 32, 24


class _TcnHolder(fnn.Module):
    @fnn.compact
    def __call__(self, x, train=False):
        return mtm.TCN(D, name="frame_tcn")(x, train=train)


class _StackHolder(fnn.Module):
    def setup(self):
        self.clip_mamba = mtm.make_mamba_stack(D, 2)

    def __call__(self, x):
        return mtm.mamba_residual(self.clip_mamba, x)


def _check(flax_module, twin, table, x, *, rtol=1e-5, atol=1e-6, grad_rtol=1e-4):
    """Converted weights: outputs and every parameter gradient of sum(out * w) agree."""
    assert [e.torch for e in table] == list(twin.state_dict())
    params = jax.tree.map(jnp.asarray, convert.torch_to_flax(table, twin.state_dict()))
    ref = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), x))["params"]
    convert.check_shapes(params, ref, "test")
    for p in twin.parameters():
        p.grad = None
    xt = torch.tensor(x, requires_grad=True)
    yt = twin(xt)
    w = np.random.default_rng(9).standard_normal(yt.shape).astype(np.float32)
    (yt * torch.from_numpy(w)).sum().backward()
    y = flax_module.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=rtol, atol=atol)
    gp, gx = jax.grad(lambda p, xx: jnp.sum(flax_module.apply({"params": p}, xx) * w), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy(), rtol=grad_rtol, atol=1e-6)
    g = convert.flax_to_arrays(table, jax.device_get(gp))
    for k, p in twin.named_parameters():
        rel = np.linalg.norm(g[k] - p.grad.numpy()) / max(np.linalg.norm(p.grad.numpy()), 1e-30)
        assert rel < grad_rtol, (k, rel)


def _x(seed=0, n=2):
    return np.random.default_rng(seed).standard_normal((n, L, D)).astype(np.float32)


class _TorchHolder(torch.nn.Module):
    """Registers ``module`` under ``name`` (so its keys are the official ``name.*``) and applies ``fn``."""

    def __init__(self, name, module, fn):
        super().__init__()
        self.add_module(name, module)
        self.__dict__["fn"] = fn  # not a submodule: its parameters are registered under ``name`` only

    def forward(self, x):
        return self.fn(x)


def test_tcn_matches_twin_and_clamps_alpha():
    torch.manual_seed(0)
    tcn = tmtm.TCN(D)
    holder = _TorchHolder("frame_tcn", tcn, tcn).eval()
    tl.reset_parameters(holder)  # MTM's reset_parameters: convs back to torch's default, LayerNorm (1, 0)
    table = keys.check_table(keys.tcn("frame_tcn"))
    for alpha in (0.5, 1.7, -0.3):  # the clamp to [0, 1] (1.7 -> 1, -0.3 -> 0: the TCN is switched off)
        with torch.no_grad():
            tcn.alpha.fill_(alpha)
        _check(_TcnHolder(), holder, table, _x(1))


def test_mamba_residual_stack_matches_official_mamba():
    torch.manual_seed(1)
    stack = tmtm.mamba_stack(D, 2)
    holder = _TorchHolder("clip_mamba", stack, lambda x: tmtm.mamba_residual(stack, x))
    tl.reset_parameters(holder)  # MTM: every Linear in the Mamba layers N(0, 0.02), zero bias
    assert not stack[0].dt_proj.bias.any()
    _check(_StackHolder(), holder, keys.check_table(keys.mamba_stack("clip_mamba", 2)), _x(2))


def test_attention_pooling_and_reconstructor():
    torch.manual_seed(2)
    pool = tmtm.AttentionPooling(D)
    mask = np.ones((2, L), np.float32)
    mask[1, 5:] = 0
    x = _x(3)
    with torch.no_grad():
        out_t = pool(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
    p = convert.torch_to_flax(keys.check_table(keys.linear("attn_proj", "attn_proj")), pool.state_dict())
    out = mtm.AttentionPooling(D).apply({"params": p}, x, mask)
    np.testing.assert_allclose(np.asarray(out), out_t, rtol=1e-5, atol=1e-6)
    # brute force: the masked rows get no weight
    s = x[1, :5] @ pool.attn_proj.weight.detach().numpy()[0] + pool.attn_proj.bias.item()
    w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_allclose(np.asarray(out[1]), w @ x[1, :5], rtol=1e-5, atol=1e-6)

    rec = tmtm.MLPReconstructor(D, 5 * 7, num_layers=2, hidden_dim_factor=4, dropout=0.1).eval()
    table = keys.check_table(keys.linear("mlp.0", "mlp_0") + keys.linear("mlp.3", "mlp_3"))
    assert [e.torch for e in table] == list(rec.state_dict())
    assert rec.mlp[0].out_features == min(4 * D, 35)  # hidden width capped at the output size
    p = convert.torch_to_flax(table, rec.state_dict())
    q = np.random.default_rng(4).standard_normal((3, D)).astype(np.float32)
    with torch.no_grad():
        ref = rec(torch.from_numpy(q)).numpy()
    out = mtm.MLPReconstructor(D, 35, num_layers=2, hidden_dim_factor=4).apply({"params": p}, q)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)


def test_tcn_init_is_torch_default_and_alpha_half():
    p = jax.device_get(mtm.TCN(384).init(jax.random.key(0), jnp.zeros((1, 4, 384)))["params"])
    assert float(p["alpha"]) == 0.5
    bound = 1 / np.sqrt(3 * 384)
    for c in ("conv1", "conv2"):
        k = p[c]["kernel"]
        assert k.shape == (3, 384, 384) and np.abs(k).max() <= bound
        assert k.std() == pytest.approx(bound / np.sqrt(3), rel=0.02)
