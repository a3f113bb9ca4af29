"""The official-checkpoint path of issue 14, end to end, for the three MRNet configs (tiny widths):

the twin trains a few official steps on synthetic MMN data and saves ``{model, optimizer, scheduler, epoch}``
-> ``python -m parity.convert torch2jax`` -> ``python -m jaxprvr.evaluate --save-predictions P`` on the test split;
the twin's own pipeline (``official_inference`` + the official ``evaluate`` loop) on the same split gives the
official metric dict of ``P/metrics.json`` exactly, and its NMS top-10 lists equal ``P/predictions.json`` wherever
the scores are not tied within 1e-6.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TINY = ["model.input_size=24", "model.text_dim=16", "model.num_pre_clips=32", "model.num_clips=16",
        "model.featpool_kernel=2", "model.pooling_counts=(7,4)", "model.joint_space=32", "model.featpool_hidden=32",
        "model.predictor_hidden=16", "model.predictor_kernel=3", "model.predictor_layers=2", "model.n_heads=4",
        "model.ffn_dim=64", "model.trans_layers=1", "train.batch_size=4", "data.eval_batch_size=4", "data.prefetch=0"]


@pytest.mark.parametrize("dataset", ["activitynet", "tacos", "charades"])
def test_official_checkpoint_converts_and_evaluates_like_the_twin(dataset, tmp_path):
    from jaxprvr.config import load_config
    from jaxprvr.data.mmn_format import MMNDataset, eval_batches, train_batches
    from jaxprvr.data.synthetic_vmr import write_synthetic_vmr
    from jaxprvr.evaluate import main as evaluate_main
    from parity import convert
    from torch_ref.mrnet import (MRNet as Twin, official_batch, official_optimizer, official_train_step,
                                 save_official_checkpoint)
    from torch_ref.vmr_eval import nms, official_evaluate, official_inference, score2d_to_moments_scores

    root = tmp_path / "data"
    n_val = 0 if dataset == "charades" else 4
    write_synthetic_vmr(root, dataset, 8, n_val, 6, seed=1, video_dim=24, query_dim=16, num_pre_clips=32)
    cfg = load_config(dataset, "mrnet", TINY)
    d = cfg.data

    # The twin: 3 official training steps (epoch 1), the scheduler stepped once, the official file.
    torch.manual_seed(0)
    twin = Twin(cfg)
    opt, sched = official_optimizer(twin, cfg)
    for b in list(train_batches(MMNDataset(root, cfg, "train"), cfg, 0))[:3]:
        official_train_step(twin, opt, official_batch(b), 1, cfg)
    sched.step()
    pth = save_official_checkpoint(tmp_path / "pool_model_1e.pth", twin, opt, sched, epoch=1)

    out = tmp_path / "converted"
    sets = [f"--set={s}" for s in TINY if s.startswith("model.")]
    assert convert.main(["torch2jax", "--model", "mrnet", "--config", dataset, *sets, str(pth), str(out)]) == 0
    pred_dir = tmp_path / "pred"
    args = ["--config", dataset, "--model", "mrnet", "--ckpt", str(out), "--data-root", str(root), "--split", "test",
            "--save-predictions", str(pred_dir), "--no-progress"]
    args += [a for s in TINY if not s.startswith("model.") for a in ("--set", s)]
    assert evaluate_main(args) == 0
    metrics = json.loads((pred_dir / "metrics.json").read_text())
    preds = json.loads((pred_dir / "predictions.json").read_text())["queries"]

    # The twin's pipeline on the same split: official inference, the official evaluate loop.
    test = MMNDataset(root, cfg, "test")
    maps = official_inference(twin, (official_batch(b) for b in eval_batches(test, cfg)))
    records = [{"duration": test.record(i).duration, "moments": test.record(i).moments} for i in range(len(test))]
    want = official_evaluate(records, maps, d.nms_thresh, d.iou_thresholds, d.contrastive_score_pow)
    assert metrics["official"] == want, (metrics["official"], want)

    # Top-10 lists, query by query (file order, rank order), where no two of the top scores are within 1e-6.
    n = cfg.model.num_clips
    compared = 0
    q = 0
    for rec, m in zip(records, maps):
        score2d = torch.pow(m["contrastive"] * 0.5 + 0.5, d.contrastive_score_pow) * m["iou"]
        for s2d in score2d:
            cand, scores = score2d_to_moments_scores(s2d, n, rec["duration"])
            top = np.sort(scores.numpy())[::-1][:11]
            mine = np.asarray(preds[q]["pred"], np.float64)
            q += 1
            if len(top) > 1 and np.min(-np.diff(top)) < 1e-6:
                continue
            theirs = nms(cand, scores, d.nms_thresh)[:10].numpy()
            assert mine.shape[0] == theirs.shape[0]
            np.testing.assert_allclose(mine[:, :2], theirs, rtol=0, atol=1e-5)
            compared += 1
    assert q == metrics["n_queries"] and compared >= q // 2, (compared, q)
