"""``parity.check`` can fail: bugs planted one at a time into the Flax side turn the rows that see them to FAIL.

Each mutant is a small, realistic bug (a transposed square weight, LayerNorm eps 1e-6, a dropout removed or moved,
a mask sign flipped, a bias left out, weight decay on the biases, an EMA decay off by 1e-3, a NaN in one gradient,
a block output of a broadcastable wrong shape). The relevant rows must FAIL in float64 mode (rtol 1e-9) and, where
the planted change is larger than float32 noise, in float32 mode too; an unmutated run of the same configuration
passes every row (the control), so the failures are the mutants'.

A tiny MS-SL (hidden 32, 2 heads, 16 frames, 8 clips, 3 videos) keeps this file short on 2 cores: the compiled
training gradient is shared by the runs of one precision (its model is never mutated), and the eagerly applied
block / model stages reuse XLA's op cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxprvr.config import load_config
from jaxprvr.errors import JaxprvrError
from jaxprvr.models import layers
from parity import check, convert, rows as prow
from tests.conftest import FAST_COMPILE, TINY_QUERY, TINY_VISUAL, x64

TINY = ["model.hidden_size=32", "model.n_heads=2", f"model.q_feat_size={TINY_QUERY}",
        f"model.visual_feat_dim={TINY_VISUAL}", "model.max_ctx_l=16", "model.map_size=8", "model.max_desc_l=8"]
STEPS = 3
DTYPES = ("float64", "float32")


def _cfg(extra=()):
    return load_config("tvr", "ms_sl", TINY + list(extra))


@pytest.fixture(scope="module", autouse=True)
def shared_grad_fn():
    """One compiled training gradient per (model config, loss config): the runs of one precision share it."""
    real = check.make_grad_fn
    cache = {}

    def make_grad_fn(name, cfg, model, compiler_options=None):
        key = (name, cfg.model, cfg.loss)
        if key not in cache:
            cache[key] = real(name, cfg, model, FAST_COMPILE)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(check, "make_grad_fn", make_grad_fn)
        yield


@pytest.fixture(scope="module", autouse=True)
def own_dropout_capture():
    """torch_ref.dropout compiles its key-capturing Flax forward once per model config; here each run starts from
    an empty cache of this module's own (:func:`run`), so a mutated module is traced again."""
    import torch_ref.dropout as td

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(td, "_CAPTURE", {})
        yield


def run(dtype, groups, extra=(), **kw):
    import torch_ref.dropout as td

    td._CAPTURE.clear()
    with x64(dtype == "float64"):
        out = check.run_check(_cfg(extra), n_videos=3, steps=STEPS, groups=groups, dtype=dtype, **kw)
    return {r.stage: r for r in out}


def failed(rows):
    return {s for s, r in rows.items() if not r.passed}


FORWARD = ("block", "model")
_CONTROL = {}


def control(dtype):
    """The unmutated run: every row of every group the mutants of that precision touch passes (the training
    mutants are float64's)."""
    if dtype not in _CONTROL:
        if dtype == "float64":
            _CONTROL[dtype] = run(dtype, FORWARD + ("grad", "train", "dropout"), ["train.use_ema=true"])
        else:
            _CONTROL[dtype] = run(dtype, FORWARD + ("grad", "dropout"))
    rows = _CONTROL[dtype]
    assert not failed(rows), check.format_table([r for r in rows.values() if not r.passed])
    return rows


# ---------------------------------------------------------------------------------------------- forward mutants
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_transposed_square_weight_fails_downstream(dtype, monkeypatch):
    real = convert.torch_to_flax

    def transposed(tab, sd, where="state_dict"):
        params = real(tab, sd, where)
        k = params["query_encoder"]["self"]["value"]["kernel"]  # 32 x 32
        params["query_encoder"]["self"]["value"]["kernel"] = np.ascontiguousarray(k.T)
        return params

    ok = control(dtype)
    monkeypatch.setattr(convert, "torch_to_flax", transposed)
    rows = run(dtype, FORWARD, perturb="none")
    bad = failed(rows)
    assert {"query_encoder (self-attention v1, masked)", "aux[query]", "scores[clip]"} <= bad
    assert "query input_proj + pos_embed (LinearLayer, positional encoding)" not in bad  # upstream: still equal
    assert "aux[clip_feats]" not in bad and ok["aux[clip_feats]"].passed  # another branch


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_eps_1e6_fails(dtype, monkeypatch):
    """eps 1e-6 instead of torch's 1e-5 moves a LayerNorm output by ~4.5e-6 / var relative: far outside rtol 1e-9;
    in float32 it shows where a LayerNorm normalises a small variance (the positional-encoding LayerNorm of
    0.02-scale projections)."""
    control(dtype)
    monkeypatch.setattr(layers, "LN_EPS", 1e-6)
    rows = run(dtype, FORWARD, perturb="none")
    bad = failed(rows)
    assert "query input_proj + pos_embed (LinearLayer, positional encoding)" in bad
    assert "aux[query_embed]" in bad
    if dtype == "float64":
        assert {"clip input_proj + pos_embed", "frame input_proj + pos_embed", "aux[query]"} <= bad


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_flipped_attention_mask_sign_fails_the_masked_blocks(dtype, monkeypatch):
    control(dtype)
    monkeypatch.setattr(layers, "ATTN_MASK_FILL", 10000.0)  # padded keys get +10000 instead of -10000
    bad = failed(run(dtype, FORWARD, perturb="none"))
    assert {"query_encoder (self-attention v1, masked)", "frame_encoder (self-attention v1, masked)",
            "aux[query]", "scores[frame]"} <= bad
    assert "clip_encoder (self-attention v1)" not in bad  # no mask there


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_bias_left_out_fails_on_perturbed_weights_only(dtype, monkeypatch):
    """The attention output dense without its bias: invisible at the official init (biases 0), which is why the
    block and model stages run again on perturbed weights."""
    real = layers.dense

    def dense(features, use_bias=True, name=None, dtype=layers.F32):
        return real(features, use_bias=use_bias and name != "dense", name=name, dtype=dtype)

    control(dtype)
    monkeypatch.setattr(layers, "dense", dense)
    rows = run(dtype, FORWARD, perturb="forward")
    bad = failed(rows)
    assert not {s for s in bad if "[perturbed]" not in s}  # official init: every bias is 0
    assert {"query_encoder (self-attention v1, masked) [perturbed]", "aux[query] [perturbed]",
            "clip_encoder (self-attention v1) [perturbed]"} <= bad


def test_a_block_output_of_a_broadcastable_wrong_shape_is_a_final_fail(monkeypatch):
    """(1, ...) broadcasts against the torch output, and its values are right: the float64 arbiter must not
    overturn the shape FAIL."""
    spec = check.spec_of(_cfg())
    real = type(spec).block_specs

    def block_specs(self, cfg, twin, taux, batch):
        specs = real(self, cfg, twin, taux, batch)
        stage, ffn, tfn, inputs = specs[0]
        return [(stage, lambda m, *a: ffn(m, *a)[None], tfn, inputs)] + specs[1:]

    monkeypatch.setattr(type(spec), "block_specs", block_specs)
    rows = run("float32", ("block",), perturb="none")
    row = rows["query input_proj + pos_embed (LinearLayer, positional encoding)"]
    assert not row.passed and row.tolerance == "same shape" and "shapes" in row.note


# ---------------------------------------------------------------------------------------------- dropout mutants
class NoDropoutSelfOutput(layers.BertSelfOutput):
    @nn.compact
    def __call__(self, hidden_states, input_tensor, *, train: bool = False):
        h = layers.dense(self.hidden_size, name="dense", dtype=self.dtype)(hidden_states)
        return layers.layer_norm(name="LayerNorm", dtype=self.dtype)(h + input_tensor)


class MovedDropoutSelfOutput(layers.BertSelfOutput):
    """The dropout after the LayerNorm instead of before the residual: same shape, same key, other values."""

    @nn.compact
    def __call__(self, hidden_states, input_tensor, *, train: bool = False):
        h = layers.dense(self.hidden_size, name="dense", dtype=self.dtype)(hidden_states)
        out = layers.layer_norm(name="LayerNorm", dtype=self.dtype)(h + input_tensor)
        return layers.Dropout(self.hidden_dropout_prob)(out, deterministic=not train)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_dropout_removed_fails_the_dropout_rows(dtype, monkeypatch):
    ok = control(dtype)
    assert any(s.endswith("[train, dropout on]") for s in ok)
    monkeypatch.setattr(layers, "BertSelfOutput", NoDropoutSelfOutput)
    rows = run(dtype, ("dropout",))
    row = rows["the same dropout calls in both frameworks"]
    assert not row.passed and "output" in row.note


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_dropout_moved_fails_the_dropout_rows(dtype, monkeypatch):
    control(dtype)
    monkeypatch.setattr(layers, "BertSelfOutput", MovedDropoutSelfOutput)
    bad = failed(run(dtype, ("dropout",)))
    assert {"aux[query_tokens] [train, dropout on]", "scores[clip] [train, dropout on]",
            "training loss, dropout on"} <= bad
    assert any(s.startswith("d loss / d param, dropout on") for s in bad)
    assert "aux[query_embed] [train, dropout on]" not in bad  # upstream of the query encoder


# ---------------------------------------------------------------------------------------------- training mutants
def test_weight_decay_on_the_biases_fails_train(monkeypatch):
    """The official groups exclude biases and LayerNorm parameters from weight decay; decaying them moves each by
    ``lr_t * wd * p`` per step, ~2e-6 of ``||p||`` in these few warm-up steps: far outside float64's rtol 1e-9, but
    inside float32's train tolerance (1e-5 of ``||p||``, set by the float32 noise of the worst tensors), so only the
    float64 mode can see it."""
    import jaxprvr.optim as optim

    control("float64")
    monkeypatch.setattr(optim, "official_weight_decay_mask", lambda params: jax.tree.map(lambda _: True, params))
    rows = run("float64", ("train",), perturb="all")  # biases and LayerNorm parameters away from 0 / 1
    row = rows[f"params after {STEPS} BertAdam steps"]
    assert not row.passed
    failing = row.note.split("failing:")[1]
    assert "bias" in failing or "LayerNorm" in failing


def test_an_ema_decay_off_by_1e3_fails_the_ema_row(monkeypatch):
    """``d - 1e-3`` moves the shadow by ``1e-3 |shadow - p|``, ~1e-7 of the shadow after a few small steps: outside
    float64's rtol 1e-9, within float32 noise (float64 mode only)."""
    import jaxprvr.optim as optim

    real = optim.ema_decay_at
    ok = control("float64")
    ema_stage = next(s for s in ok if s.startswith(f"EMA weights after {STEPS} steps"))
    monkeypatch.setattr(optim, "ema_decay_at", lambda step, decay, dtype=np.float32: real(step, decay, dtype) - 1e-3)
    rows = run("float64", ("train",), ["train.use_ema=true"], perturb="none")
    assert rows[f"params after {STEPS} BertAdam steps"].passed
    assert not rows[ema_stage].passed


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_nan_in_one_gradient_fails_and_is_named(dtype, monkeypatch):
    real = check.make_grad_fn

    def make_grad_fn(name, cfg, model, compiler_options=None):
        fn = real(name, cfg, model, compiler_options)

        def poisoned(params, batch, negs):
            loss, g = fn(params, batch, negs)
            b = g["query_encoder"]["self"]["value"]["bias"]
            g["query_encoder"]["self"]["value"]["bias"] = b.at[3].set(np.nan)
            return loss, g

        return poisoned

    control(dtype)
    monkeypatch.setattr(check, "make_grad_fn", make_grad_fn)
    groups = ("grad", "train") if dtype == "float64" else ("grad",)
    rows = run(dtype, groups)
    grad = next(r for s, r in rows.items() if s.startswith("d loss / d param"))
    assert not grad.passed and "query_encoder.self.value.bias" in grad.note and "NaN" in grad.note
    if dtype == "float64":  # the NaN reaches the weights through Adam
        train = rows[f"params after {STEPS} BertAdam steps"]
        assert not train.passed and "NaN" in train.note


# ---------------------------------------------------------------------------------------------- unit checks
def test_nan_inf_and_shape_rows_fail_and_name_the_tensor():
    t = np.ones((2, 3), np.float32)
    bad = t.copy()
    bad[0, 1] = np.nan
    r = prow.close_row("grad", "w", bad, t, 1e-5, 1e-6)
    assert not r.passed and "w: jax 1 NaN" in r.note
    r = prow.close_row("block", "x", t, np.full((2, 3), np.inf, np.float32), 1e-5, 1e-6)
    assert not r.passed and "torch 6 Inf" in r.note
    r = prow.close_row("block", "y", t[None], t, 1e-5, 1e-6)
    assert not r.passed and r.tolerance == "same shape"


def test_float64_needs_x64():
    with x64(False):
        with pytest.raises(JaxprvrError, match="x64"):
            check.run_check(_cfg(), groups=("convert",), dtype="float64")
        with pytest.raises(JaxprvrError, match="x64"):
            layers.resolve_compute_dtype(check.with_compute_dtype(_cfg(), "float64").model)


def test_metric_changes_only_where_near_ties_explain_them():
    """A near-tie (within 1e-6) of the ground truth may rank either way; a flip across a real gap may not."""
    from jaxprvr.metrics.prvr import eval_q2m
    from parity.prvr import tie_row

    rng = np.random.default_rng(0)
    t = rng.uniform(0.0, 1.0, (50, 20))
    gt = np.arange(50) % 20
    t[0, 5] = t[0, gt[0]] + 5e-7  # query 0: video 5 a hair above its ground truth in torch ...
    j = t + rng.uniform(-1e-9, 1e-9, t.shape)
    j[0, 5] = t[0, gt[0]] - 5e-7  # ... and a hair below in JAX: a rank change the tie explains

    def res(s):
        return {**eval_q2m(s, gt), "_scores": s}

    row = tie_row("m", res(j), res(t), gt)
    assert row.passed, row.note
    assert "1 in 1 queries" in row.note and "differs for 1 queries (0 not explained" in row.note
    j2 = j.copy()
    j2[1, gt[1]] = t[1].max() + 0.01  # query 1 jumps to rank 1 across a real gap
    row = tie_row("m", res(j2), res(t), gt)
    assert not row.passed and "1 not explained" in row.note
