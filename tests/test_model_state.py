"""The generic trainer with a model that keeps BatchNorm statistics (``model_state``): a toy regression task
stands in for a family (the trainer must not know which one), checked against numpy and against an
uninterrupted run.

* one train step updates the running statistics as flax's BatchNorm formula says, recomputed in numpy from
  the initial parameters and the first batch;
* a run stopped by ``max_steps`` and resumed ends bit-identical (parameters, optimizer state and statistics)
  to an uninterrupted one, so the statistics are saved and restored with every checkpoint;
* validation and test evaluate with the statistics of the state / of the selected checkpoint: the test metric
  equals a numpy evaluation with the ``best`` checkpoint's parameters and statistics, and a run whose
  statistics were not passed on would differ.
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprvr.config import Config, DataConfig, ModelConfig, TrainConfig
from jaxprvr.tasks.base import Task, TrainPlan

N_TRAIN, N_EVAL, D, BS = 24, 16, 5, 8
MOMENTUM = 0.9


class ToyBN(nn.Module):
    @nn.compact
    def __call__(self, batch, train: bool = False):  # the convention: a dict batch
        h = nn.Dense(6, name="inp")(batch["x"])
        h = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=1e-5, name="bn")(h)
        return nn.Dense(1, name="out")(nn.relu(h))[:, 0]


def _data(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, (n, D)).astype(np.float32)  # far from the init statistics (0, 1)
    return {"x": x, "y": (x @ rng.normal(size=D)).astype(np.float32)}


class ToyTask(Task):
    name = "toy"
    batch_keys = ("x", "y")
    selection_metric = "neg_mse"
    # Selects the *worst* validation epoch: the loss falls, so ``best`` is an early checkpoint and differs from
    # the final state, which an evaluation that took the statistics of the state instead would use.
    selection_mode = "min"

    def __init__(self):
        self.eval_calls = []

    def open_split(self, cfg, root, split):
        return _data({"train": 0, "val": 1, "test": 2}[split], N_TRAIN if split == "train" else N_EVAL)

    def dummy_batch(self, cfg):
        return {"x": np.zeros((2, D), np.float32), "y": np.zeros((2,), np.float32)}

    def train_plan(self, cfg, ds, *, mesh, n_slices):
        def batches(epoch, skip):
            order = np.random.default_rng(epoch).permutation(N_TRAIN)
            for i in range(skip, N_TRAIN // BS):
                idx = order[i * BS:(i + 1) * BS]
                yield {k: v[idx] for k, v in ds.items()}

        return TrainPlan(N_TRAIN // BS, batches, lambda b: {"items": len(b["x"])})

    def loss(self, model, cfg, steps_per_epoch):
        def loss_fn(params, batch, rngs, step, model_state):
            pred, new_state = model.apply({"params": params, **model_state}, batch, train=True,
                                          mutable=["batch_stats"])
            mse = jnp.mean((pred - batch["y"]) ** 2)
            return mse, ({"mse": mse}, new_state)

        return loss_fn

    def optimizer(self, cfg, params, steps_per_epoch):
        return optax.adam(1e-2)

    def lr_at(self, cfg, steps_per_epoch):
        return lambda step: 1e-2

    def evaluator(self, model, cfg, mesh=None):
        task = self

        class Ev:
            def evaluate(self, params, ds, progress=False, keep_outputs=False, model_state=None):
                task.eval_calls.append(model_state is not None)
                pred = model.apply({"params": params, **model_state}, ds, train=False)
                return {"neg_mse": -float(jnp.mean((pred - ds["y"]) ** 2))}

        return Ev()

    def format_metrics(self, metrics):
        return f"neg_mse={metrics['neg_mse']:.4f}"


def _cfg(n_epoch=3):
    return Config(model=ModelConfig(name="toy_bn"), data=DataConfig(dataset="toy"),
                  train=TrainConfig(n_epoch=n_epoch, log_every=1, max_es_cnt=-1, seed=3))


@pytest.fixture
def toy(monkeypatch):
    import jaxprvr.models
    import jaxprvr.train as train_mod

    task = ToyTask()
    monkeypatch.setattr(train_mod, "task_for", lambda cfg: task)
    monkeypatch.setattr(jaxprvr.models, "build_model", lambda mcfg: ToyBN())
    return task


def _np_bn_forward(params, stats, x):
    h = x @ np.asarray(params["inp"]["kernel"]) + np.asarray(params["inp"]["bias"])
    h = (h - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * np.asarray(params["bn"]["scale"]) + np.asarray(
        params["bn"]["bias"])
    return (np.maximum(h, 0) @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"]))[:, 0]


def _restore(out, slot, params_like, state_like):
    from jaxprvr.checkpoint import Checkpoints, abstract_tree

    ck = Checkpoints(out / "ckpt")
    try:
        p, o, meta = ck.restore(slot, abstract_tree(params_like), None)
        ms = ck.restore_model_state(slot, abstract_tree(state_like))
    finally:
        ck.close()
    return p, ms, meta


def test_one_step_updates_running_statistics_as_numpy(toy, tmp_path):
    from jaxprvr.train import init_variables, train

    cfg = _cfg()
    train(cfg, None, tmp_path / "run", progress=False, max_steps=1)
    params0, state0 = init_variables(ToyBN(), cfg, jax.random.PRNGKey(cfg.train.seed))
    assert np.all(np.asarray(state0["batch_stats"]["bn"]["mean"]) == 0)
    batch = next(toy.train_plan(cfg, toy.open_split(cfg, None, "train"), mesh=None, n_slices=1).batches(0, 0))
    h = (batch["x"] @ np.asarray(params0["inp"]["kernel"]) + np.asarray(params0["inp"]["bias"])).astype(np.float64)
    want_mean = (1 - MOMENTUM) * h.mean(0)
    want_var = MOMENTUM * 1.0 + (1 - MOMENTUM) * h.var(0)  # flax: biased batch variance
    _, ms, meta = _restore(tmp_path / "run", "latest", params0, state0)
    assert meta["global_step"] == 1
    np.testing.assert_allclose(ms["batch_stats"]["bn"]["mean"], want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ms["batch_stats"]["bn"]["var"], want_var, rtol=1e-5)
    assert np.abs(want_mean).max() > 0.05  # the statistics moved: an update left out would fail above


def test_resume_is_bit_identical_and_eval_uses_the_checkpoint_statistics(toy, tmp_path):
    from jaxprvr.train import init_variables, train

    cfg = _cfg()
    full = train(cfg, None, tmp_path / "full", progress=False)
    assert all(toy.eval_calls)  # every validation and the test got the statistics
    toy.eval_calls.clear()
    train(cfg, None, tmp_path / "cut", progress=False, max_steps=4)  # inside epoch 1
    resumed = train(cfg, None, tmp_path / "cut", progress=False, resume=True)
    assert full["steps"] == resumed["steps"] == 3 * (N_TRAIN // BS)
    assert full["best_epoch"] < 2  # best is not the final state (selection_mode "min" above)

    p_like, s_like = init_variables(ToyBN(), cfg, jax.random.PRNGKey(0))
    pa, sa, _ = _restore(tmp_path / "full", "latest", p_like, s_like)
    pb, sb, _ = _restore(tmp_path / "cut", "latest", p_like, s_like)
    for a, b in zip(jax.tree.leaves((pa, sa)), jax.tree.leaves((pb, sb))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The test metric: the best checkpoint's parameters and statistics, evaluated in numpy.
    p_best, s_best, _ = _restore(tmp_path / "full", "best", p_like, s_like)
    test = toy.open_split(cfg, None, "test")
    stats = {k: np.asarray(v, np.float64) for k, v in s_best["batch_stats"]["bn"].items()}
    want = -np.mean((_np_bn_forward(p_best, stats, test["x"].astype(np.float64)) - test["y"]) ** 2)
    got = json.loads((tmp_path / "full" / "test_results.json").read_text())["neg_mse"]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # ... and the initial statistics (what an evaluation without model_state would use) give another number.
    init_stats = {"mean": np.zeros(6), "var": np.ones(6)}
    other = -np.mean((_np_bn_forward(p_best, init_stats, test["x"].astype(np.float64)) - test["y"]) ** 2)
    assert abs(other - want) > 1e-2 * abs(want)


def test_load_model_state_names_a_checkpoint_without_it(tmp_path):
    from jaxprvr.checkpoint import Checkpoints, load_model_state
    from jaxprvr.errors import JaxprvrError

    ck = Checkpoints(tmp_path / "ckpt")
    ck.save("latest", 1, {"w": np.ones(3, np.float32)}, meta={})
    ck.close()
    with pytest.raises(JaxprvrError, match="model_state"):
        load_model_state(tmp_path, {"batch_stats": {"m": jax.ShapeDtypeStruct((3,), jnp.float32)}})


def test_dataclass_config_is_what_the_trainer_saves(toy, tmp_path):
    """The run's config.json is the config as given (the toy's), not a PRVR default."""
    from jaxprvr.train import train

    cfg = _cfg(n_epoch=1)
    train(cfg, None, tmp_path / "r", progress=False, run_test=False)
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == dataclasses.asdict(cfg)


def test_trainer_validates_only_where_the_task_says(toy, tmp_path):
    """``Task.validates_after``: epochs without validation end with a ``latest`` checkpoint only; the metrics log
    holds exactly the validated epochs; ``best`` comes from them."""
    from jaxprvr.train import train

    toy.validates_after = lambda cfg, epoch: epoch in (1, 3)
    summary = train(_cfg(n_epoch=4), None, tmp_path / "r", progress=False, run_test=False)
    logs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logs if r.get("split") == "val"] == [1, 3]
    assert summary["epochs_done"] == 4 and summary["best_epoch"] in (1, 3)


def test_vmr_evaluation_epochs_follow_the_official_rule():
    """MRNet trainer.py L145 (1-based epoch): evaluate when ``epoch % TEST_PERIOD == 0 and epoch >= SKIP_TEST``;
    ours also evaluates after the last epoch."""
    from jaxprvr.config import load_config
    from jaxprvr.tasks.vmr import TASK

    cfg = load_config("tacos")  # TEST_PERIOD 10, SKIP_TEST 0, 250 epochs
    got = [e + 1 for e in range(cfg.train.n_epoch) if TASK.validates_after(cfg, e)]
    assert got == [e for e in range(1, 251) if e % 10 == 0]
    cfg = load_config("activitynet", overrides=["train.test_period=4", "train.skip_test=6", "train.n_epoch=15"])
    assert [e + 1 for e in range(15) if TASK.validates_after(cfg, e)] == [8, 12, 15]
