"""torch_ref.dropout: the counter-hash dropout in PyTorch draws the bits, masks and outputs of jaxprvr.ops.dropout,
and under ``shared_dropout`` each twin's train-mode forward (and gradient) is the Flax model's with the same
dropout masks, for all four models; a wrong seed, a dropout left on torch's RNG or a wrong counter layout breaks
the match. Without shared masks HashDropout is ``nn.Dropout``.

Small models (hidden 32, visual 24, query 16, 16 frames, 8 clips, 8 query tokens, dropout 0.2): each Flax forward
is compiled once (``shared_dropout`` reuses its jitted capture for the mutants and the error cases)."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_ref
from jaxprvr.models import build_model
from jaxprvr.ops import dropout as jdrop
from parity import check, convert
from tests.conftest import tiny_config
from torch_ref import dropout as tdrop
from torch_ref.dropout import HashDropout, SharedDropoutError, arm, shared_dropout

SMALL = ["model.visual_feat_dim=24", "model.q_feat_size=16", "model.max_ctx_l=16", "model.map_size=8",
         "model.max_desc_l=8", "model.input_drop=0.2", "model.drop=0.2"]
# (model, branch_impl): the Gaussian branches as K modules (the CPU default) and vmapped (the GPU default)
MODELS = [("ms_sl", None), ("gmmformer", "batched"), ("gmmformer_v2", "batched"), ("mtm", "loop")]
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The twins' many small ops next to XLA's threads on 2 shared cores: one torch thread keeps them quick."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def setup_model(name, impl=None, seed=0):
    """Config, Flax model, twin (its init + N(0, 0.05^2) noise, so biases and LayerNorms are not trivial), the
    same weights as Flax params, and a batch."""
    extra = SMALL + ([f"model.branch_impl={impl}"] if impl else []) + (["model.num_mamba_layers=1"] if name == "mtm"
                                                                        else [])
    cfg = tiny_config(name, extra=extra).model
    torch.manual_seed(seed)
    twin = torch_ref.build_model(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    params = jax.tree.map(jnp.asarray, convert.torch_to_flax(convert.model_table(cfg), twin.state_dict()))
    return cfg, build_model(cfg), twin, params, check.make_batch(cfg, n_videos=3, seed=seed)


def _np(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def assert_same_outputs(flax_out, twin_out):
    """Every score and every aux entry both frameworks return agree (integers exactly)."""
    (fs, fa), (ts, ta) = flax_out, twin_out
    assert set(fs) == set(ts)
    shared = sorted(set(fa) & set(ta))
    assert len(shared) >= len(fa) - 1, (sorted(fa), sorted(ta))  # MS-SL's Flax aux also returns the frame mask
    for where, a, t in [(f"scores[{k}]", fs[k], ts[k]) for k in fs] + [(f"aux[{k}]", fa[k], ta[k]) for k in shared]:
        a, t = np.asarray(a), _np(t)
        assert a.shape == t.shape, where
        if np.issubdtype(a.dtype, np.integer):
            np.testing.assert_array_equal(t, a, err_msg=where)
        else:
            np.testing.assert_allclose(t, a, rtol=RTOL, atol=ATOL, err_msg=where)


# ---------------------------------------------------------------------------------------------- the hash


@pytest.mark.parametrize("make_key", [lambda s: jax.random.key(s, impl="rbg"), lambda s: jax.random.key(s),
                                      jax.random.PRNGKey], ids=["rbg", "threefry", "raw_uint32"])
def test_bits_masks_and_outputs_equal_jax_bit_for_bit(make_key):
    rates = (0.5, 0.1, 0.2)
    for shape in [(3, 5, 7), (129,), ()]:  # odd sizes and a scalar
        f = jax.jit(lambda k, x: (jdrop.hash_bits(k, x.shape), [jdrop.keep_mask(k, x.shape, r) for r in rates],
                                  [jdrop.dropout(k, x, r) for r in rates]))
        for seed in (0, 11, 2**31 + 5):
            key = make_key(seed)
            x = np.random.default_rng(seed % 97).standard_normal(shape).astype(np.float32)
            bits, masks, outs = f(key, x)
            seeds = tdrop.key_seeds(key)
            assert seeds == tuple(int(s) for s in jdrop.key_seeds(key))
            np.testing.assert_array_equal(tdrop.hash_bits(seeds, shape).numpy(), np.asarray(bits).astype(np.int64))
            for r, m, y in zip(rates, masks, outs):
                np.testing.assert_array_equal(tdrop.keep_mask(seeds, shape, r).numpy(), np.asarray(m))
                ty = tdrop.dropout(torch.from_numpy(x), r, seeds).numpy()
                np.testing.assert_array_equal(np.asarray(ty).view(np.uint32), np.asarray(y).view(np.uint32))


def test_counters_are_exact_up_to_2_32_and_index_selects_them():
    m32 = 0xFFFFFFFF
    big = [0, 1, 2**31 - 1, 2**31, 3_000_000_000, 2**32 - 1]
    got = tdrop.mul32(torch.tensor(big, dtype=torch.int64), tdrop.GOLDEN).tolist()
    assert got == [(i * tdrop.GOLDEN) & m32 for i in big]  # no int64 overflow in the product
    seeds = tdrop.key_seeds(jax.random.key(3))
    whole = tdrop.hash_bits(seeds, (4, 6, 5))
    part = tdrop.hash_bits(seeds, (2, 6, 5), index=tdrop.flat_index((2, 6, 5), offset=60))
    assert torch.equal(part, whole[2:])  # a draw's counters select a slice of a bigger draw
    with pytest.raises(ValueError, match="index of shape"):
        tdrop.hash_bits(seeds, (3,), index=tdrop.flat_index((4,)))


# ---------------------------------------------------------------------------------------------- the twins


@pytest.mark.parametrize("name,impl", MODELS, ids=[n for n, _ in MODELS])
def test_twin_draws_the_flax_masks(name, impl):
    cfg, model, twin, params, batch = setup_model(name, impl)
    key = jax.random.key(5, impl="rbg")
    with shared_dropout(twin, model, params, batch, key) as shared:
        out = twin(batch, train=True)
    assert_same_outputs(shared.flax_outputs, out)
    with torch.no_grad():
        eval_scores, _ = twin(batch, train=False)
    assert not np.allclose(_np(eval_scores["clip_raw"]), _np(out[0]["clip_raw"]), rtol=RTOL, atol=ATOL)
    flax_sizes = {k: len(v) for k, v in shared.keys.items()}
    assert all(n >= 1 for n in flax_sizes.values()) and len(flax_sizes) >= 10

    def mutant(edit):
        """The twin's forward with the shared draws edited by ``edit(draws)``: must not match Flax."""
        draws = {k: list(v) for k, v in shared.draws.items()}
        edit(draws)
        with arm(twin, draws), torch.no_grad():
            got = twin(batch, train=True)
        with pytest.raises(AssertionError):
            assert_same_outputs(shared.flax_outputs, got)

    def other_seeds(draws):  # one call of one dropout with another seed word
        d = draws["query_input_proj.net.0"][0]
        draws["query_input_proj.net.0"][0] = tdrop.Draw((d.seeds[0] ^ 1, d.seeds[1]), d.index, d.source)

    mutant(other_seeds)
    # every counter-layout rule is needed: the same seeds with plain counters do not give the Flax masks
    layouts = {getattr(d.index, "__name__", "") for ds in shared.draws.values() for d in ds if d.index is not None}
    assert layouts == {"ms_sl": set(), "gmmformer": set(), "gmmformer_v2": {"part_index"},
                       "mtm": {"part_index", "heads_first_index", "channels_first_index"}}[name]
    for layout in sorted(layouts):
        def plain_counters(draws, layout=layout):
            for k, ds in draws.items():
                draws[k] = [tdrop.Draw(d.seeds, None, d.source) if getattr(d.index, "__name__", "") == layout else d
                            for d in ds]

        mutant(plain_counters)
    # one HashDropout back on torch's RNG: outputs differ, and its unused Flax draws are reported by name
    with pytest.raises(SharedDropoutError, match=r"query_pos_embed\.dropout \(\d+ left"):
        with shared_dropout(twin, model, params, batch, key), torch.no_grad():
            twin.query_pos_embed.dropout._draws = None
            got = twin(batch, train=True)
    with pytest.raises(AssertionError):
        assert_same_outputs(shared.flax_outputs, got)


def test_batched_branches_record_their_keys_like_the_loop():
    """The vmapped branches (``branch_impl=batched``) record under ``attn<k>`` the same module paths as the K
    modules do, each call once (only the key values differ between the two forms). Traced, not compiled."""
    paths = {}
    for impl in ("loop", "batched"):
        cfg, model, twin, params, batch = setup_model("gmmformer_v2", impl)
        _, state = jax.eval_shape(lambda p, b, k: model.apply({"params": p}, b, train=True, rngs={"dropout": k},
                                                              mutable=[tdrop.DROPOUT_KEYS]),
                                  params, batch, jax.random.key(5, impl="rbg"))
        keys = tdrop.collect_keys(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state[tdrop.DROPOUT_KEYS]))
        paths[impl] = {p: len(v) for p, v in keys.items()}
        names = {tdrop.torch_dropout_name(twin, p) for p in keys}
        assert names == {n for n, m in tdrop.hash_dropouts(twin).items() if m.p > 0}  # every dropout used
    assert paths["loop"] == paths["batched"]
    assert paths["loop"]["clip_encoder/attn7/Dropout_1"] == 1 and paths["loop"]["query_input_proj/net_0"] == 2


def test_gradients_match_with_dropout_on():
    cfg, model, twin, params, batch = setup_model("ms_sl")
    key = jax.random.key(9, impl="rbg")
    rng = np.random.default_rng(0)
    with shared_dropout(twin, model, params, batch, key) as shared:
        weights = {k: rng.standard_normal(np.shape(v)).astype(np.float32) for k, v in shared.flax_outputs[0].items()}
        scores, _ = twin(batch, train=True)
        sum(torch.sum(scores[k] * torch.from_numpy(w)) for k, w in weights.items()).backward()

    def loss(p):
        s, _ = model.apply({"params": p}, batch, train=True, rngs={"dropout": key})
        return sum(jnp.sum(s[k] * w) for k, w in weights.items())

    grads = convert.flax_to_arrays(convert.model_table(cfg), jax.jit(jax.grad(loss))(params))
    named = dict(twin.named_parameters())
    scale = max(float(np.abs(g).max()) for g in grads.values())
    for k, g in grads.items():
        np.testing.assert_allclose(_np(named[k].grad), g, rtol=RTOL, atol=1e-5 * scale, err_msg=k)


def test_recording_keys_traces_nothing_unless_asked(monkeypatch):
    """The plain train forward's trace is the same with the recording switched off: nothing is traced unless the
    collection is mutable, so the training step is unchanged. (That the plain forward draws the recorded masks is
    shown by the gradient test, which differentiates the plain forward.)"""
    from jaxprvr.models import layers

    cfg, model, _, params, batch = setup_model("ms_sl")
    fwd = lambda p, b, k: model.apply({"params": p}, b, train=True, rngs={"dropout": k})  # noqa: E731
    key = jax.random.key(5, impl="rbg")
    with_sow = str(jax.make_jaxpr(fwd)(params, batch, key))
    with monkeypatch.context() as mp:
        mp.setattr(layers, "sow_dropout_key", lambda module, key: None)
        assert str(jax.make_jaxpr(fwd)(params, batch, key)) == with_sow
    recording = jax.make_jaxpr(lambda p, b, k: model.apply({"params": p}, b, train=True, rngs={"dropout": k},
                                                           mutable=[tdrop.DROPOUT_KEYS]))(params, batch, key)
    assert len(recording.eqns) > len(jax.make_jaxpr(fwd)(params, batch, key).eqns)  # the recording is real


def test_extra_calls_and_unknown_paths_are_named_errors():
    cfg, model, twin, params, batch = setup_model("ms_sl")
    key = jax.random.key(5, impl="rbg")
    with pytest.raises(SharedDropoutError, match=r"dropout [a-z_.0-9]+: called more often"):
        with shared_dropout(twin, model, params, batch, key), torch.no_grad():
            twin(batch, train=True)
            twin(batch, train=True)  # a second forward has no masks left
    with pytest.raises(SharedDropoutError, match="no torch module for 'nope'"):
        tdrop.plan_draws(twin, {"clip_encoder/nope/Dropout_0": [np.zeros(2, np.uint32)]})
    assert all(m._draws is None for m in tdrop.hash_dropouts(twin).values())  # disarmed after the errors


# ---------------------------------------------------------------------------------------------- official behaviour


def test_without_shared_masks_hash_dropout_is_nn_dropout():
    x = torch.randn(4, 7, 9)
    for p in (0.1, 0.5):
        torch.manual_seed(3)
        a = HashDropout(p).train()(x)
        torch.manual_seed(3)
        b = torch.nn.Dropout(p).train()(x)
        assert torch.equal(a, b) and not torch.equal(a, x)
        assert torch.equal(HashDropout(p).eval()(x), x)
    assert list(HashDropout(0.3).state_dict()) == [] and HashDropout(0.3).p == 0.3


@pytest.mark.parametrize("name", [n for n, _ in MODELS])
def test_twins_without_shared_masks_are_official(name):
    """A twin whose HashDropouts are replaced by ``nn.Dropout`` gives the same train-mode outputs under the same
    torch seed, and the same state_dict keys."""
    cfg = tiny_config(name, extra=SMALL + (["model.num_mamba_layers=1"] if name == "mtm" else [])).model
    twin = torch_ref.build_model(cfg)
    plain = copy.deepcopy(twin)
    for mod_name, m in list(plain.named_modules()):
        for child, sub in list(m.named_children()):
            if isinstance(sub, HashDropout):
                setattr(m, child, torch.nn.Dropout(sub.p))
    assert not any(isinstance(m, HashDropout) for m in plain.modules())
    assert list(plain.state_dict()) == list(twin.state_dict())
    batch = check.make_batch(cfg, n_videos=3)
    outs = []
    for m in (twin, plain):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(m(batch, train=True))
    for k in outs[0][0]:
        assert torch.equal(outs[0][0][k], outs[1][0][k]), k
