"""The moment-retrieval optimizer recipe (jaxprvr.optim.torch_adamw + multistep_lr) against torch itself:
``clip_grad_norm_`` + ``torch.optim.AdamW`` + ``MultiStepLR`` stepped per epoch, with a parameter that has no
gradient (``grad is None``: torch neither updates nor decays it). Run in float64 on both sides so that the
comparison is exact up to rounding (rtol 1e-12), which also separates torch's clip (``/(norm + 1e-6)``) from
optax's ``clip_by_global_norm``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

LR, B1, B2, WD, CLIP = 8e-4, 0.9, 0.99, 1e-5, 5.0
SPE, MILESTONES, GAMMA, STEPS = 3, (2, 3), 0.1, 10


def _data():
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=(5,)), "frozen": rng.normal(size=(2, 2))}
    # Gradient scales that make the global norm cross the clip threshold on some steps and not on others.
    grads = [{"a": rng.normal(size=(4, 3)) * s, "b": rng.normal(size=(5,)) * s, "frozen": np.zeros((2, 2))}
             for s in np.resize([0.3, 4.0, 1.0, 9.0], STEPS)]
    return params, grads


def _torch_run(params, grads):
    ps = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in params.items()}
    opt = torch.optim.AdamW(list(ps.values()), lr=LR, betas=(B1, B2), weight_decay=WD)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(MILESTONES), gamma=GAMMA)
    for i, g in enumerate(grads):
        opt.zero_grad(set_to_none=True)
        for k in ("a", "b"):  # "frozen" keeps grad None
            ps[k].grad = torch.tensor(g[k], dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(list(ps.values()), CLIP)
        opt.step()
        if (i + 1) % SPE == 0:
            sched.step()
    return {k: v.detach().numpy() for k, v in ps.items()}


def _jax_run(params, grads, tx):
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads:
        upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, upd)
    return jax.tree.map(np.asarray, p)


def _recipe(trainable=True, clip="torch"):
    from jaxprvr.optim import multistep_lr, torch_adamw

    mask = {"a": True, "b": True, "frozen": False} if trainable else None
    tx = torch_adamw(multistep_lr(LR, MILESTONES, GAMMA, SPE), B1, B2, WD, CLIP if clip == "torch" else 0.0, mask)
    if clip == "optax":
        tx = optax.chain(optax.clip_by_global_norm(CLIP), tx)
    return tx


def _max_rel(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]) / (np.abs(b[k]) + 1e-30))) for k in b)


def test_adamw_recipe_equals_torch_in_float64():
    params, grads = _data()
    want = _torch_run(params, grads)
    with jax.enable_x64(True):
        got = _jax_run(params, grads, _recipe())
    assert _max_rel(got, want) < 1e-12
    np.testing.assert_array_equal(got["frozen"], params["frozen"])  # no update, no decay
    assert _max_rel(params, want) > 1e-4  # the trained tensors moved: the comparison is not vacuous


@pytest.mark.parametrize("mutant", ["frozen_decayed", "optax_clip"])
def test_adamw_recipe_mutants_are_caught(mutant):
    params, grads = _data()
    want = _torch_run(params, grads)
    with jax.enable_x64(True):
        tx = _recipe(trainable=False) if mutant == "frozen_decayed" else _recipe(clip="optax")
        got = _jax_run(params, grads, tx)
    assert _max_rel(got, want) > 1e-12


def test_multistep_lr_matches_torch_scheduler():
    from jaxprvr.optim import multistep_lr

    sched = multistep_lr(LR, MILESTONES, GAMMA, SPE)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=LR)
    ts = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(MILESTONES), gamma=GAMMA)
    for step in range(STEPS):
        assert np.float32(sched(step)) == np.float32(opt.param_groups[0]["lr"]), step
        if (step + 1) % SPE == 0:
            ts.step()


def test_adamw_recipe_float32_close_to_torch():
    params, grads = _data()
    want = _torch_run(params, grads)
    p32 = jax.tree.map(lambda x: x.astype(np.float32), params)
    g32 = [jax.tree.map(lambda x: x.astype(np.float32), g) for g in grads]
    got = _jax_run(p32, g32, _recipe())
    assert _max_rel(got, want) < 1e-5
