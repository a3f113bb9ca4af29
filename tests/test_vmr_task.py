"""The moment-retrieval task through the generic trainer and evaluator (MRNet, tiny widths, synthetic MMN data).

* training learns: the test R1@0.5 of a short run beats the chance level of a uniformly drawn proposal
  (computed independently here by brute force over the grid) and the loss falls;
* a run stopped by ``--max-steps`` inside an epoch and resumed ends bit-identical to an uninterrupted one
  (parameters, AdamW moments and BatchNorm statistics);
* ``jaxprvr.evaluate --save-predictions`` writes predictions whose recomputed metrics (a numpy brute force
  over ``predictions.json``) are the ``metrics.json`` numbers, score maps that decode to the same top-1, and
  the frozen parameters (no official gradient) never move.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

TINY = ["model.input_size=24", "model.text_dim=16", "model.num_pre_clips=32", "model.num_clips=16",
        "model.featpool_kernel=2", "model.pooling_counts=(7,4)", "model.joint_space=32", "model.featpool_hidden=32",
        "model.predictor_hidden=32", "model.predictor_kernel=3", "model.predictor_layers=2", "model.n_heads=8",
        "model.ffn_dim=64", "model.trans_layers=1", "train.batch_size=8", "train.n_epoch=6",
        "train.milestones=(5,)", "train.lr=1.5e-3", "train.log_every=1", "train.skip_test=0", "loss.only_iou_epoch=4",
        "data.eval_batch_size=8", "data.prefetch=0"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from jaxprvr.data.synthetic_vmr import write_synthetic_vmr

    out = tmp_path_factory.mktemp("vmr")
    write_synthetic_vmr(out, "activitynet", 96, 16, 24, seed=3, video_dim=24, query_dim=16, num_pre_clips=32)
    return out


def _cfg(extra=()):
    from jaxprvr.config import load_config

    return load_config("activitynet", "mrnet", TINY + list(extra))


@pytest.fixture(scope="module")
def run(root, tmp_path_factory):
    from jaxprvr.train import train

    out = tmp_path_factory.mktemp("run") / "full"
    summary = train(_cfg(), root, out, progress=False)
    return out, summary


def _brute_metrics(queries, thresholds):
    """R@1/R@5 at each threshold and mIoU of the top-1, from the saved ranked moments (float64 IoU)."""
    def iou(a, b):
        inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
        union = max(a[1], b[1]) - min(a[0], b[0])
        return inter / union if union > 0 else 0.0

    out = {}
    for t in thresholds:
        for k in (1, 5):
            hits = [any(iou(p, q["gt"]) >= t - 1e-6 for p in q["pred"][:k]) for q in queries]
            out[f"R{k}@{t:g}"] = float(np.mean(hits))
    out["mIoU"] = float(np.mean([iou(q["pred"][0], q["gt"]) for q in queries]))
    return out


def _chance_brute(root, split, cfg, thresholds):
    from jaxprvr.data.mmn_format import MMNDataset
    from jaxprvr.ops.proposals import mask2d

    ds = MMNDataset(root, cfg, split)
    n = cfg.model.num_clips
    cells = np.argwhere(mask2d(n, cfg.model.pooling_counts))
    rates = {t: [] for t in thresholds}
    for i in range(len(ds)):
        r = ds.record(i)
        for s, e in r.moments:
            spans = np.stack([cells[:, 0] * r.duration / n, (cells[:, 1] + 1) * r.duration / n], 1)
            inter = np.clip(np.minimum(spans[:, 1], e) - np.maximum(spans[:, 0], s), 0, None)
            iou = inter / (np.maximum(spans[:, 1], e) - np.minimum(spans[:, 0], s))
            for t in thresholds:
                rates[t].append(np.mean(iou >= t - 1e-6))
    return {t: float(np.mean(v)) for t, v in rates.items()}


def test_training_learns_beyond_chance(run, root):
    out, summary = run
    test = summary["test"]
    cfg = _cfg()
    chance = _chance_brute(root, "test", cfg, (0.5,))[0.5]
    assert abs(test["chance_R1@0.5"] - chance) < 2e-3  # the evaluator's chance level, recomputed
    assert test["R1@0.5"] >= 2.0 * chance, (test["R1@0.5"], chance)
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_iou"] for r in logs if "loss_iou" in r]
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    assert {"loss", "loss_iou", "loss_vid", "loss_sent", "loss_sp", "lr"} <= set(logs[0])
    lrs = sorted({round(r["lr"], 12) for r in logs if "lr" in r})
    assert np.allclose(lrs, [1.5e-4, 1.5e-3], rtol=1e-6)  # MultiStepLR: x0.1 after epoch 5


def test_resume_is_bit_identical(run, root, tmp_path):
    from jaxprvr.checkpoint import Checkpoints, abstract_tree
    from jaxprvr.train import train

    full, _ = run
    cut = tmp_path / "cut"
    train(_cfg(), root, cut, progress=False, max_steps=17)  # inside epoch 1 (12 steps per epoch)
    train(_cfg(), root, cut, progress=False, resume=True, run_test=False)

    def state(out):
        ck = Checkpoints(out / "ckpt")
        try:
            step = ck.latest_step("latest")
            import orbax.checkpoint as ocp

            d = out / "ckpt" / "latest" / str(step)
            return {k: ocp.StandardCheckpointer().restore(d / k) for k in ("params", "opt_state", "model_state")}
        finally:
            ck.close()

    a, b = state(full), state(cut)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_evaluate_cli_outputs_agree(run, root, tmp_path):
    from jaxprvr.evaluate import main

    out, _ = run
    pred_dir = tmp_path / "pred"
    args = ["--config", "activitynet", "--model", "mrnet", "--ckpt", str(out), "--data-root", str(root),
            "--split", "test", "--save-predictions", str(pred_dir), "--no-progress", "--topk", "7"]
    for o in TINY:
        if o.startswith("data.") or o.startswith("train."):
            args += ["--set", o]
    assert main(args) == 0
    metrics = json.loads((pred_dir / "metrics.json").read_text())
    preds = json.loads((pred_dir / "predictions.json").read_text())
    assert preds["topk"] == 7 and preds["split"] == "test" and preds["dataset"] == "activitynet"
    qs = preds["queries"]
    assert len(qs) == metrics["n_queries"] and all(1 <= len(q["pred"]) <= 7 for q in qs)
    brute = _brute_metrics(qs, (0.3, 0.5, 0.7))
    for k, v in brute.items():
        assert abs(metrics[k] - v) < 1e-6, (k, metrics[k], v)
    assert metrics["official"]["R@1,IoU@0.5"] == pytest.approx(metrics["R1@0.5"])
    # The saved maps decode to the saved top-1 (score = ((c + 1) / 2) ** pow * iou, candidate spans).
    maps = np.load(pred_dir / "score_maps.npz")
    cfg = _cfg()
    n, pw = cfg.model.num_clips, cfg.data.contrastive_score_pow
    for q in qs[:10]:
        c, u = maps[f"{q['vid']}/contrastive"][q["query_rank"]], maps[f"{q['vid']}/iou"][q["query_rank"]]
        score = ((c + 1) / 2) ** pw * u
        i, j = np.unravel_index(np.argmax(np.where(u > 0, score, -1)), score.shape)
        assert np.allclose(q["pred"][0][:2], [i * q["duration"] / n, (j + 1) * q["duration"] / n], atol=1e-4)


def test_frozen_parameters_never_move(run):
    import orbax.checkpoint as ocp

    from jaxprvr.models import build_model
    from jaxprvr.train import init_variables

    out, _ = run
    cfg = _cfg()
    model = build_model(cfg.model)
    p0, _ = jax.jit(lambda k: init_variables(model, cfg, k))(jax.random.PRNGKey(cfg.train.seed))
    step_dir = sorted((out / "ckpt" / "latest").iterdir())[-1]
    p1 = ocp.StandardCheckpointer().restore(step_dir / "params")
    for name in ("fc_out1",):
        np.testing.assert_array_equal(np.asarray(p1["text_encoder"][name]["kernel"]),
                                      np.asarray(p0["text_encoder"][name]["kernel"]))
    np.testing.assert_array_equal(np.asarray(p1["text_out"]["layernorm"]["scale"]),
                                  np.asarray(p0["text_out"]["layernorm"]["scale"]))
    assert not np.array_equal(np.asarray(p1["text_encoder"]["fc_out2"]["kernel"]),
                              np.asarray(p0["text_encoder"]["fc_out2"]["kernel"]))
