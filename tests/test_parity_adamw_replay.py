"""``parity.check.AdamWReplay``, the float32 AdamW-conditioning arbiter of the MRNet training row: its float64
replay against ``torch.optim.AdamW`` after ``clip_grad_norm_`` (the official recipe), and its verdict on planted
optimizer and gradient bugs and on NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity.check import AdamWReplay

B1, B2, EPS, WD, MAX_NORM, GRAD_REL = 0.9, 0.99, 1e-8, 1e-5, 5.0, 1e-4
LRS = [8e-4, 8e-4, 8e-4, 8e-4, 8e-5]


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    start = {"a": rng.standard_normal((6, 5)), "b": rng.standard_normal(7), "frozen": rng.standard_normal(3)}
    # gradients large enough that clipping is active on some steps, and one entry near zero (Adam-ill-conditioned)
    grads = []
    for t in range(len(LRS)):
        g = {"a": rng.standard_normal((6, 5)) * (3.0 if t % 2 else 0.2), "b": rng.standard_normal(7) * 0.5}
        g["a"][0, 0] = 1e-9 * (-1) ** t
        grads.append(g)
    return start, grads


def _torch_adamw(start, grads, dtype, opt_eps=EPS, b2=B2):
    """The official recipe in torch: clip_grad_norm_ over the parameters with a gradient, AdamW (frozen: no grad)."""
    ps = {k: torch.nn.Parameter(torch.tensor(v, dtype=dtype)) for k, v in start.items()}
    opt = torch.optim.AdamW(list(ps.values()), lr=LRS[0], betas=(B1, b2), eps=opt_eps, weight_decay=WD)
    for lr, g in zip(LRS, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for k, v in g.items():
            ps[k].grad = torch.tensor(v, dtype=dtype)
        torch.nn.utils.clip_grad_norm_([ps[k] for k in g], MAX_NORM)
        opt.step()
    return {k: p.detach().double().numpy() for k, p in ps.items()}


def _clipped(g):
    """``clip_grad_norm_`` as a numpy formula: the twins hand over their gradients after clipping."""
    coef = min(1.0, MAX_NORM / (np.sqrt(sum(float(np.sum(v * v)) for v in g.values())) + 1e-6))
    return {k: v * coef for k, v in g.items()}


def _replay(start, grads, at64=None, g32_noise=0.0):
    r = AdamWReplay(start, B1, B2, EPS, WD, MAX_NORM, GRAD_REL)
    for t, (lr, g) in enumerate(zip(LRS, grads)):
        c = _clipped(g)
        r.step(g, lr, c, {k: v + g32_noise for k, v in c.items()}, g if at64 is None else at64[t])
    return r


def test_replay_is_torch_adamw_in_float64():
    start, grads = _problem()
    ref = _torch_adamw(start, grads, torch.float64)
    r = _replay(start, grads)
    for k in start:
        np.testing.assert_allclose(r.p[k], ref[k], rtol=1e-13, atol=1e-15, err_msg=k)
    assert np.array_equal(r.p["frozen"], start["frozen"])  # never stepped: kept, as torch skips grad None


def test_float32_adamw_of_its_own_gradients_passes():
    start, grads = _problem()
    f32 = _torch_adamw(start, grads, torch.float32)
    r = _replay(start, grads)
    for k in ("a", "b"):
        ok, why = r.judge(k, f32[k])
        assert ok, (k, why)


@pytest.mark.parametrize("bug", ["eps", "b2"])
def test_a_planted_optimizer_bug_fails(bug):
    start, grads = _problem()
    wrong = _torch_adamw(start, grads, torch.float32, **({"opt_eps": 1e-3} if bug == "eps" else {"b2": 0.999}))
    ok, why = _replay(start, grads).judge("a", wrong["a"])
    assert not ok and "not AdamW of its own gradients" in why


def test_a_gradient_off_float64_fails_even_with_an_exact_optimizer():
    start, grads = _problem()
    # "b" off by 3e-4 relative on step 4 (one tensor: a uniform scale would be undone by clipping)
    off = [{k: v * (1.0 + (3e-4 if t == 3 and k == "b" else 0.0)) for k, v in g.items()} for t, g in enumerate(grads)]
    f32 = _torch_adamw(start, grads, torch.float32)
    ok, why = _replay(start, grads, at64=off).judge("b", f32["b"])
    assert not ok and "step 4 gradient" in why
    # ... unless float32 itself (the float32 twin) is as far off: the bounded arbiter
    ok, _ = _replay(start, grads, at64=off, g32_noise=1e-3).judge("b", f32["b"])
    assert ok


def test_nan_never_passes():
    start, grads = _problem()
    f32 = _torch_adamw(start, grads, torch.float32)
    bad = f32["a"].copy()
    bad[1, 2] = np.nan
    assert not _replay(start, grads).judge("a", bad)[0]
    nan_g = [{k: v.copy() for k, v in g.items()} for g in grads]
    nan_g[2]["b"][0] = np.nan
    assert not _replay(start, grads, at64=nan_g).judge("b", f32["b"])[0]
    assert not _replay(start, grads).judge("missing", f32["a"])[0]
