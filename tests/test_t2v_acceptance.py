"""The official-checkpoint path of text-video retrieval, end to end, on tiny synthetic MSR-VTT videos: the twin
(BackBone_tvr's construction, optimizer and step) trains two steps and saves ``pytorch_model.bin.1`` as the official
``save_model`` does; ``parity.convert torch2jax`` converts it; ``jaxprvr.evaluate --save-scores`` evaluates the test
split. The twin's own evaluation -- features per pair in batches of 16, ``_run_on_single_gpu``'s blocks of 32 through
``get_similarity_logits``, the official ``compute_metrics`` -- on the same preprocessed inputs gives the same
similarity matrix (1e-5) and the same metrics; ``jax2torch`` gives the file back bit for bit, strict-loadable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jaxprvr.config import load_config
from jaxprvr.data.synthetic_t2v import write_synthetic_t2v
from jaxprvr.tasks import t2v as T
from torch_ref import clip_wti as tw
from torch_ref.clip import tiny_clip
from torch_ref.t2v_eval import official_compute_metrics

# head counts by OpenAI's width // 64 rule (what official_init derives from the weights): text 64 -> 1, vision 128 -> 2
SETS = ["model.max_frames=4", "model.max_words=16", "model.num_hidden_layers=1", "train.batch_size=4"]


def _official_eval(model, ds):
    """``eval_epoch`` (one process): text and video features per pair in batches of 16, then
    ``_run_on_single_gpu`` (blocks of 32 through ``get_similarity_logits``)."""
    tf, tm, vf, vm = [], [], [], []
    with torch.no_grad():
        for s in range(0, len(ds), 16):
            idx = np.arange(s, min(len(ds), s + 16))
            ids = torch.from_numpy(ds.text_ids[idx].astype(np.int64))
            mask = torch.from_numpy(ds.text_mask[idx].astype(np.int64))
            videos = [ds.video(int(ds.caption_video[i])) for i in idx]
            v = torch.from_numpy(np.stack([a for a, _ in videos]))
            m = torch.from_numpy(np.stack([b for _, b in videos]).astype(np.int64))
            t_feat, _ = model.get_text_feat(ids, mask)
            tf.append(t_feat)
            tm.append(mask)
            vf.append(model.get_video_feat(v, m))
            vm.append(m)
        rows = []
        for t_feat, t_mask in zip(torch.cat(tf).split(32), torch.cat(tm).split(32)):
            rows.append(torch.cat([model.get_similarity_logits(t_feat, t_mask, v_feat, v_mask)[0]
                                   for v_feat, v_mask in zip(torch.cat(vf).split(32), torch.cat(vm).split(32))], 1))
    return torch.cat(rows, 0).numpy()


@pytest.mark.parametrize("agg", ["seqTransf"])
def test_official_file_converts_and_evaluates_like_the_twin(tmp_path, capsys, agg):
    from jaxprvr import evaluate
    from parity import convert

    root = tmp_path / "data"
    write_synthetic_t2v(root, "msrvtt", n_train=6, n_test=6, seed=3)
    cfg = load_config("msrvtt", "clip_wti", SETS + ["model.image_resolution=64", "model.vision_patch_size=16"])
    # the twin: BackBone_tvr's construction from a (random, tiny) CLIP, two official training steps
    clip = tiny_clip(embed_dim=64, vocab_size=49408, vision_layers=1, transformer_layers=1, vision_width=128,
                     transformer_width=64, transformer_heads=1)
    model = tw.official_init(clip.state_dict(), num_hidden_layers=1)
    opt = tw.official_optimizer(model, lr=1e-3, coef_lr=1.0, t_total=4)
    train = T.TASK.open_split(cfg, root, "train")
    model.train()
    for b in list(T.train_batches(train, cfg, epoch=0))[:2]:
        loss = model(*(torch.from_numpy(np.asarray(b[k])).long() if k != "video" else torch.from_numpy(b[k])
                       for k in ("text_ids", "text_mask", "video", "video_mask")))
        loss.backward()
        tw.official_after_backward(model, opt)
    model.eval()
    src = tmp_path / "pytorch_model.bin.1"
    torch.save(model.state_dict(), src)  # main_retrieval.save_model
    sets = [f"--set={s}" for s in SETS]
    assert convert.main(["torch2jax", "--model", "clip_wti", "--config", "msrvtt", *sets, str(src),
                         str(tmp_path / "run")]) == 0
    out = tmp_path / "scores"
    assert evaluate.main(["--config", "msrvtt", "--model", "clip_wti", "--ckpt", str(tmp_path / "run"),
                          "--data-root", str(root), "--save-scores", str(out), "--no-progress"]) == 0
    sim = np.load(out / "sim.npy")
    metrics = json.loads((out / "metrics.json").read_text())
    test = T.TASK.open_split(load_config("msrvtt", "clip_wti", SETS + ["model.image_resolution=64"]), root, "test")
    ref = _official_eval(model, test)
    np.testing.assert_allclose(sim, ref, rtol=1e-5, atol=1e-5)
    off_t2v, off_v2t = official_compute_metrics(ref), official_compute_metrics(ref.T)
    for ours, off in (("t2v", off_t2v), ("v2t", off_v2t)):
        for k, o in (("R1", "R1"), ("R5", "R5"), ("R10", "R10"), ("MdR", "MR"), ("MnR", "MeanR")):
            assert metrics[f"{ours}/{k}"] == pytest.approx(float(off[o]), abs=1e-9), (ours, k)
    # and back: the official file, bit for bit, loading strictly into the twin
    back = tmp_path / "back.bin"
    assert convert.main(["jax2torch", "--model", "clip_wti", "--config", "msrvtt", *sets, str(tmp_path / "run"),
                         str(back)]) == 0
    sd, sd0 = torch.load(back, weights_only=True), model.state_dict()
    assert list(sd) == list(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd0)
    tw.BackBoneTVR(tw.dims_of(clip.state_dict()), num_hidden_layers=1).load_state_dict(sd, strict=True)
