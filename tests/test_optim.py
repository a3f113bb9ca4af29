"""BertAdam / warmup_linear against numpy and torch transcriptions of the official optimizer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprvr.errors import JaxprvrError
from jaxprvr.optim import bert_adam, official_weight_decay_mask, warmup_linear

LR, WARMUP, T_TOTAL, N_STEPS = 0.05, 0.3, 10, 7  # warmup ends at step 3 (progress 0.3)


def ref_schedule(step, warmup, t_total):
    """GMMFormer src/Opts/optimization.py WarmupLinearSchedule.get_lr (float64)."""
    progress = float(step) / t_total
    if progress < warmup:
        return progress / warmup
    return max((progress - 1.0) / (warmup - 1.0), 0.0)


def test_warmup_linear_values():
    want = [0.0, 1 / 3, 2 / 3, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0, 0.0]
    for step, w in enumerate(want):
        np.testing.assert_allclose(warmup_linear(step, WARMUP, T_TOTAL), w, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(warmup_linear(jnp.asarray(step), WARMUP, T_TOTAL), w, rtol=1e-6, atol=1e-7)
    assert warmup_linear(5, 0.01, -1) == 1.0  # t_total < 0: constant
    np.testing.assert_allclose(warmup_linear(4, -1, 10), 0.6)  # warmup -1 -> 0: linear decay only
    with pytest.raises(JaxprvrError):
        warmup_linear(0, 1.0, 10)


def _params(rng):
    # Names as our Flax models use them (torch attribute names; LayerNorm module -> scale/bias).
    return {
        "query_input_proj": {"LayerNorm": {"scale": rng.normal(size=(6,)), "bias": rng.normal(size=(6,))},
                             "net_1": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(4,))}},
        "clip_encoder": {"norm1": {"scale": rng.normal(size=(4,)), "bias": rng.normal(size=(4,))}},
        "weight_token": rng.normal(size=(1, 1, 4)),
        "query_pos_embed": {"position_embeddings": {"embedding": rng.normal(size=(3, 4))}},
    }


EXPECTED_DECAY = {
    "query_input_proj/LayerNorm/scale": False, "query_input_proj/LayerNorm/bias": False,
    "query_input_proj/net_1/kernel": True, "query_input_proj/net_1/bias": False,
    "clip_encoder/norm1/scale": True, "clip_encoder/norm1/bias": False,
    "weight_token": True, "query_pos_embed/position_embeddings/embedding": True,
}


def _flat(tree):
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_official_weight_decay_mask_rule():
    mask = _flat(official_weight_decay_mask(_params(np.random.default_rng(0))))
    assert mask == EXPECTED_DECAY
    # Against the torch substring rule on the official names of the same tensors.
    torch_names = {
        "query_input_proj/LayerNorm/scale": "query_input_proj.LayerNorm.weight",
        "query_input_proj/LayerNorm/bias": "query_input_proj.LayerNorm.bias",
        "query_input_proj/net_1/kernel": "query_input_proj.net.1.weight",
        "query_input_proj/net_1/bias": "query_input_proj.net.1.bias",
        "clip_encoder/norm1/scale": "clip_encoder.norm1.weight", "clip_encoder/norm1/bias": "clip_encoder.norm1.bias",
        "weight_token": "weight_token", "query_pos_embed/position_embeddings/embedding":
            "query_pos_embed.position_embeddings.weight",
    }
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    for k, name in torch_names.items():
        assert mask[k] == (not any(nd in name for nd in no_decay)), k


def test_mask_on_a_real_flax_module():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm(epsilon=1e-5, name="LayerNorm")(x)
            x = nn.Dense(3, name="dense")(x)
            x = nn.LayerNorm(epsilon=1e-5, name="norm2")(x)
            tok = self.param("weight_token", nn.initializers.normal(), (1, 3))
            return x + tok

    variables = Block().init(jax.random.key(0), jnp.ones((2, 3)))
    mask = _flat(official_weight_decay_mask(variables))
    assert mask == {"params/LayerNorm/scale": False, "params/LayerNorm/bias": False,
                    "params/dense/kernel": True, "params/dense/bias": False,
                    "params/norm2/scale": True, "params/norm2/bias": False, "params/weight_token": True}


def _grads(rng, params, step):
    # Alternate small and large gradients so that per-tensor clipping binds on some steps only.
    scale = 5.0 if step % 2 else 0.05
    return jax.tree_util.tree_map(lambda p: scale * rng.normal(size=np.shape(p)), params)


def numpy_bert_adam(params, grads_seq, mask, lr, warmup, t_total, wd=0.01, max_norm=1.0, b1=0.9, b2=0.999,
                    eps=1e-6):
    """BertAdam.step() (GMMFormer src/Opts/optimization.py:289-336) tensor by tensor, float64."""
    leaves, tdef = jax.tree_util.tree_flatten(params)
    p = [np.asarray(x, np.float64).copy() for x in leaves]
    decay = jax.tree_util.tree_leaves(mask)
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for step, grads in enumerate(grads_seq):
        for i, g in enumerate(jax.tree_util.tree_leaves(grads)):
            g = np.asarray(g, np.float64).copy()
            norm = np.sqrt((g ** 2).sum())
            coef = max_norm / (norm + 1e-6)
            if coef < 1:
                g = g * coef
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            update = m[i] / (np.sqrt(v[i]) + eps)
            if decay[i] and wd > 0:
                update = update + wd * p[i]
            p[i] = p[i] - lr * ref_schedule(step, warmup, t_total) * update
    return jax.tree_util.tree_unflatten(tdef, p)


def _run_jax(params, grads_seq, **kw):
    opt = bert_adam(LR, WARMUP, T_TOTAL, **kw)
    p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = opt.init(p)

    @jax.jit
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    history = []
    for g in grads_seq:
        p, state = step(p, state, jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), g))
        history.append(p)
    return history, state


def test_bert_adam_matches_numpy_transcription():
    rng = np.random.default_rng(0)
    params = _params(rng)
    grads_seq = [_grads(rng, params, s) for s in range(N_STEPS)]
    history, state = _run_jax(params, grads_seq)
    assert int(state.count) == N_STEPS
    mask = official_weight_decay_mask(params)
    # The first update runs at lr 0: parameters unchanged after step 0.
    for a, b in zip(jax.tree_util.tree_leaves(history[0]), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-7)
    for n in range(1, N_STEPS + 1):
        want = numpy_bert_adam(params, grads_seq[:n], mask, LR, WARMUP, T_TOTAL)
        for k, (a, b) in enumerate(zip(jax.tree_util.tree_leaves(history[n - 1]), jax.tree_util.tree_leaves(want))):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=f"step {n} leaf {k}")


def test_per_tensor_clip_differs_from_global_clip():
    """Guards the test above: with the same grads, clipping by the global norm changes the result."""
    rng = np.random.default_rng(1)
    params = _params(rng)
    grads_seq = [_grads(rng, params, s) for s in range(4)]
    history, _ = _run_jax(params, grads_seq)
    opt = optax.chain(optax.clip_by_global_norm(1.0), bert_adam(LR, WARMUP, T_TOTAL, max_grad_norm=-1))
    p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    s = opt.init(p)
    for g in grads_seq:
        u, s = opt.update(jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), g), s, p)
        p = optax.apply_updates(p, u)
    diffs = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree_util.tree_leaves(history[-1]), jax.tree_util.tree_leaves(p))]
    assert max(diffs) > 1e-3


def test_bert_adam_options():
    rng = np.random.default_rng(2)
    params = _params(rng)
    grads_seq = [_grads(rng, params, s) for s in range(5)]
    all_decay = jax.tree_util.tree_map(lambda _: True, params)
    history, _ = _run_jax(params, grads_seq, weight_decay_mask=None, max_grad_norm=0.5, eps=1e-8)
    want = numpy_bert_adam(params, grads_seq, all_decay, LR, WARMUP, T_TOTAL, max_norm=0.5, eps=1e-8)
    for a, b in zip(jax.tree_util.tree_leaves(history[-1]), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    # an explicit pytree mask of jax bools works too (traced branch)
    arr_mask = jax.tree_util.tree_map(jnp.asarray, official_weight_decay_mask(params))
    h2, _ = _run_jax(params, grads_seq, weight_decay_mask=arr_mask)
    h3, _ = _run_jax(params, grads_seq)
    for a, b in zip(jax.tree_util.tree_leaves(h2[-1]), jax.tree_util.tree_leaves(h3[-1])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(JaxprvrError):
        bert_adam(-1.0, 0.1, 10)


def test_bert_adam_matches_torch_transcription():
    torch = pytest.importorskip("torch")
    from torch_ref.optim import BertAdam  # the official BertAdam.step(), transcribed in PyTorch

    rng = np.random.default_rng(3)
    params = _params(rng)
    grads_seq = [_grads(rng, params, s) for s in range(N_STEPS)]
    flat_names = list(_flat(params))
    mask = _flat(official_weight_decay_mask(params))
    tp = [torch.nn.Parameter(torch.tensor(np.asarray(x), dtype=torch.float32)) for x in jax.tree_util.tree_leaves(params)]
    groups = [{"params": [p for n, p in zip(flat_names, tp) if mask[n]], "weight_decay": 0.01},
              {"params": [p for n, p in zip(flat_names, tp) if not mask[n]], "weight_decay": 0.0}]
    opt = BertAdam(groups, lr=LR, warmup=WARMUP, t_total=T_TOTAL, schedule="warmup_linear", b1=0.9, b2=0.999, e=1e-6,
                   max_grad_norm=1.0)
    for grads in grads_seq:
        for p, g in zip(tp, jax.tree_util.tree_leaves(grads)):
            p.grad = torch.tensor(np.asarray(g), dtype=torch.float32)
        opt.step()
    history, _ = _run_jax(params, grads_seq)
    for name, a, b in zip(flat_names, jax.tree_util.tree_leaves(history[-1]), tp):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
