"""BackBone_tvr's recipe (``jaxprvr.tasks.t2v.t2v_optimizer``) against its transcription in torch
(``torch_ref.clip_wti.official_optimizer`` + ``official_after_backward``): the same gradients injected into both for
several steps across the warmup boundary, in float64 -- four parameter groups (decay x ``clip.``), the global clip,
warmup_cosine with its zero first step, and the ``logit_scale`` clamp at ln 100. Plus the schedule against its
formula and planted mutants."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxprvr.config import load_config
from jaxprvr.optim import warmup_cosine
from jaxprvr.tasks.t2v import t2v_optimizer
from parity import clip_wti as pw
from torch_ref import clip_wti as tw
from torch_ref.clip import tiny_clip

STEPS, T_TOTAL = 6, 20  # warmup 0.1 x 20 = 2 steps: steps 0, 1 in the warmup (step 0 at lr 0), then cosine


def _setup():
    clip = tiny_clip(embed_dim=64, vocab_size=300, vision_layers=1, transformer_layers=1)
    twin = tw.official_init(clip.state_dict(), num_hidden_layers=1).double()
    with torch.no_grad():
        twin.clip.logit_scale.fill_(math.log(100) - 1e-6)  # the clamp acts from the first step with lr > 0
    cfg = load_config("msrvtt", "clip_wti", ["model.num_hidden_layers=1", "train.lr=1e-2", "train.coef_lr=0.1",
                                            "train.wd=0.01"])
    cfg2, params, _ = pw.torch_to_params(cfg.model, twin.state_dict(), dtype=np.float64)
    cfg = dataclasses.replace(cfg, model=cfg2)
    return cfg, twin, params


def _grads(twin, t):
    g = torch.Generator().manual_seed(100 + t)
    out = {}
    for n, p in twin.named_parameters():
        scale = 0.5 if t % 2 else 0.01  # odd steps above the global clip norm of 1, even ones below it
        out[n] = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
    out["clip.logit_scale"] = torch.tensor(-5.0, dtype=torch.float64)  # pushes logit_scale up, into the clamp
    return out


def _run(tx_factory=None):
    cfg, twin, params = _setup()
    opt = tw.official_optimizer(twin, lr=cfg.train.lr, coef_lr=cfg.train.coef_lr, weight_decay=cfg.train.wd,
                                warmup=cfg.train.lr_warmup_proportion, t_total=T_TOTAL)
    with jax.enable_x64(True):
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        tx = (tx_factory or t2v_optimizer)(cfg, T_TOTAL // cfg.train.n_epoch)
        state = tx.init(p)
        for t in range(STEPS):
            g = _grads(twin, t)
            for n, q in twin.named_parameters():
                q.grad = g[n].clone()
            tw.official_after_backward(twin, opt)
            jg = pw.params_to_torch(cfg.model, jax.tree.map(lambda a: a, p), {})  # structure only
            flat = {k: g[k].numpy() for k in jg}
            grads = _to_params(cfg, flat)
            u, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, u)
        back = pw.params_to_torch(cfg.model, jax.tree.map(np.asarray, p), {})
    return twin, back


def _to_params(cfg, flat):
    from parity.clip import _unflatten
    from parity.keys import to_flax

    return _unflatten({e.flax: jnp.asarray(to_flax(e.kind, flat[e.torch]), jnp.float64)
                       for e in pw.make_table(cfg.model)})


def test_matches_the_official_recipe_in_float64():
    twin, back = _run()
    worst = max(float(np.abs(back[n] - q.detach().numpy()).max() / max(np.abs(q.detach().numpy()).max(), 1e-30))
                for n, q in twin.named_parameters())
    assert worst < 1e-12, worst
    ls = float(twin.clip.logit_scale)
    assert ls == math.log(100) and float(back["clip.logit_scale"]) == ls  # clamped, exactly


def test_schedule_against_the_formula():
    for step, total, warm in [(0, 20, 0.1), (1, 20, 0.1), (2, 20, 0.1), (19, 20, 0.1), (7, 10, 0.0)]:
        x = step / total
        ref = x / warm if x < warm else 0.5 * (1 + math.cos(math.pi * x))
        assert warmup_cosine(step, warm, total) == ref
        with jax.enable_x64(True):
            assert abs(float(warmup_cosine(jnp.int32(step), warm, total, dtype=jnp.float64)) - ref) < 1e-15
    assert warmup_cosine(0, 0.1, 20) == 0.0  # the zero-lr first step
    assert abs(warmup_cosine(2, 0.1, 20) - 0.5 * (1 + math.cos(math.pi * 0.1))) < 1e-15  # 0.976: no renormalisation


@pytest.mark.parametrize("mutant", ["no_coef", "decay_bias", "no_clamp"])
def test_planted_recipe_bugs_fail(mutant, monkeypatch):
    import jaxprvr.tasks.t2v as t2v

    if mutant == "no_coef":
        def factory(cfg, spe):
            return t2v.t2v_optimizer(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, coef_lr=1.0)),
                                     spe)
    elif mutant == "decay_bias":
        import jaxprvr.optim as jo

        monkeypatch.setattr(jo, "NO_DECAY", ())  # the no-decay rule forgotten: biases decayed too
        factory = t2v.t2v_optimizer
    else:
        def factory(cfg, spe):
            return optax.chain(*_drop_last(cfg, spe))

    twin, back = _run(factory)
    worst = max(float(np.abs(back[n] - q.detach().numpy()).max()) for n, q in twin.named_parameters())
    assert worst > 1e-9


def _drop_last(cfg, spe):
    """The recipe without its final clamp."""
    from jaxprvr.optim import bert_adam, clip_grad_norm_torch
    from jaxprvr.tasks.t2v import _named

    t = cfg.train
    return [clip_grad_norm_torch(1.0),
            bert_adam(t.lr, t.lr_warmup_proportion, spe * t.n_epoch, weight_decay=t.wd, max_grad_norm=1.0, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, schedule="warmup_cosine",
                      lr_scale=lambda p: _named(p, lambda n: t.coef_lr if "clip." in n else 1.0))]
