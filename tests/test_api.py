"""The Python API (``jaxprvr.load``, docs/api.md) against the evaluation CLI, one tiny run per task.

Each run folder is written in the trainer's layout (``config.json``, ``ckpt/<slot>/<step>`` through
:class:`jaxprvr.checkpoint.Checkpoints`) with random parameters at the model's shapes (a training step, or even the
``init`` compile, costs 4-50 s of CPU per family here), PRVR's with distinct raw and EMA weights (``train.use_ema``),
and ``jaxprvr.evaluate`` (in process) evaluates it on a synthetic split. Then, on the same data:

* PRVR: ``scores(encode_queries, encode_videos)`` is the CLI's ``scores.npy`` (and its metrics); ``load`` picks the
  EMA weights the CLI evaluated (``ema=False``: the raw ones); calls of 3 then 5 items compile once;
* MRNet: ``predict`` gives ``predictions.json``'s ranked windows and scores;
* MESM: ``predict_many`` over the CLI's own batches (``eval_batches.json``) and ``predict`` per video give the
  submission rows (per_row masks); with the official head-major masks ``predict_many`` over the CLI's batch gives
  its rows, and the same videos in another order other numbers;
* text-video: ``similarity(encode_text, encode_video)`` is the CLI's ``sim.npy``;
* official PyTorch files load bit-exactly in memory: MS-SL ``model.ckpt`` and MTM ``best.ckpt`` with its
  ``ema_shadow`` (written by ``parity.convert``), MESM's ``{model, ..., opt}`` (by ``parity.mesm``);
* the README's "Python API" examples run against these runs and print the CLI's numbers.

Each equality has a planted mutant (an input prepared differently) that the same comparison rejects.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxprvr import api, api_tasks
from jaxprvr.errors import JaxprvrError

README = Path(__file__).resolve().parents[1] / "README.md"

PRVR = ["model.hidden_size=16", "model.n_heads=2", "model.q_feat_size=12", "train.batch_size=8", "train.n_epoch=1",
        "data.prefetch=0", "data.eval_context_bsz=8", "data.eval_query_bsz=16", "train.use_ema=true"]
MRNET = ["model.input_size=24", "model.text_dim=16", "model.num_pre_clips=32", "model.num_clips=16",
         "model.featpool_kernel=2", "model.pooling_counts=(7,4)", "model.joint_space=32", "model.featpool_hidden=32",
         "model.predictor_hidden=32", "model.predictor_kernel=3", "model.predictor_layers=2", "model.n_heads=8",
         "model.ffn_dim=64", "model.trans_layers=1", "data.eval_batch_size=4", "data.prefetch=0"]
# per_row T2V masks: a query's rows do not depend on the other videos of an evaluation batch, so one video alone
# (predict) reproduces the CLI's rows; every video is pooled to 32 clips: one frame bucket; the frozen CLIP text
# tower is a tiny random one saved as a clip2jax folder under the data root (model.clip is relative to it)
MESM = ["data.feat_dims=(16,16)", "model.hidden_dim=16", "model.nheads=2", "model.dim_feedforward=32",
        "model.clip=clip_tiny", "model.t_feat_dim=16",
        "model.num_recfw_layers=1", "model.t2v_layers=1", "model.enc_layers=1", "model.num_recss_layers=1",
        "model.max_video_l=32", "model.t2v_mask=per_row", "model.ss_slots=8", "data.eval_batch_size=2",
        "data.prefetch=0", "train.selection=val"]
T2V = ["model.image_resolution=32", "model.vision_patch_size=16", "model.vision_width=32", "model.vision_layers=1",
       "model.text_width=32", "model.text_layers=1", "model.embed_dim=32", "model.num_hidden_layers=1",
       "model.vision_heads=2", "model.text_heads=2", "model.max_frames=4", "model.max_words=16",
       "data.eval_batch_size=4", "data.prefetch=0", "data.workers=1"]


def _sets(overrides):
    return sum((["--set", o] for o in overrides), [])


def _evaluate(argv) -> dict:
    """``python -m jaxprvr.evaluate ARGV`` in process: its metrics dict."""
    from jaxprvr.evaluate import build_parser, run

    return run(build_parser().parse_args(argv + ["--no-progress"]))


def _random_tree(abstract, seed: int):
    """Numpy values at the shapes of ``abstract``: LayerNorm / BatchNorm scales and variances near 1, counters 0,
    weights ~ N(0, 1/fan_in), other vectors ~ N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = str(getattr(path[-1], "key", path[-1]))
        if not np.issubdtype(a.dtype, np.floating):
            return np.zeros(a.shape, a.dtype)
        x = rng.standard_normal(a.shape).astype(a.dtype)
        if name in ("scale", "var"):
            return (1.0 + 0.1 * np.abs(x)).astype(a.dtype)
        if len(a.shape) >= 2:
            return (x / np.sqrt(a.shape[-2])).astype(a.dtype)
        return (0.1 * x).astype(a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _write_run(cfg, out: Path, slot: str, seed: int, ema: bool = False):
    """A run folder as the trainer writes it (``config.json``; ``ckpt/<slot>/<step>`` through
    :class:`jaxprvr.checkpoint.Checkpoints`, the config in its meta) holding random parameters (and BatchNorm
    statistics) at ``cfg``'s shapes; with ``ema`` an optimizer state with other random EMA weights, as
    ``train.use_ema`` keeps them. Returns ``(params, EMA weights or None)``."""
    from jaxprvr.checkpoint import Checkpoints
    from jaxprvr.optim import BertAdamState, EmaState

    abstract, abstract_state = api.abstract_variables(cfg)
    params, state = _random_tree(abstract, seed), _random_tree(abstract_state, seed + 1)
    opt, shadow = None, None
    if ema:
        shadow, zeros = _random_tree(abstract, seed + 2), jax.tree.map(np.zeros_like, params)
        opt = EmaState(inner=BertAdamState(count=np.asarray(3, np.int32), m=zeros, v=zeros), shadow=shadow)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    ck = Checkpoints(out / "ckpt", slots=(slot,))
    ck.save(slot, 3, params, opt, dict(config=cfg.to_dict(), global_step=3, next_epoch=1), model_state=state or None)
    ck.close()
    return params, shadow


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _same_tree(a, b) -> bool:
    fa, fb = _flat(a), _flat(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


@pytest.fixture(scope="module")
def loaded():
    """``jaxprvr.load`` memoised per (path, options): the tests and the README examples share one loaded model
    (and its compiled calls) per run."""
    cache = {}
    real = api.load

    def load(path, **kw):
        key = (str(Path(path).expanduser().resolve()), json.dumps(kw, sort_keys=True, default=str))
        if key not in cache:
            cache[key] = real(path, **kw)
        return cache[key]

    return load


# ---------------------------------------------------------------------------------------------- README


def _readme_examples() -> dict:
    """The ```python blocks of README's "## Python API" section, by their ### heading."""
    text = README.read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for part in section.split("\n### ")[1:]:
        title, body = part.split("\n", 1)
        blocks = re.findall(r"```python\n(.*?)```", body, re.S)
        assert len(blocks) == 1, title
        out[title.strip()] = blocks[0]
    return out


def _run_example(title: str, values: dict, loaded, monkeypatch) -> str:
    """Executes the README example under ``### title`` with its top-level assignments to the names of ``values``
    replaced by those values; returns what it printed."""
    import ast

    code = _readme_examples()[title]
    lines = code.splitlines()
    spans = {}
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            spans[ast.unparse(node.targets[0])] = (node.lineno - 1, node.end_lineno)
    assert set(values) <= set(spans), f"the README example assigns {sorted(spans)}, the test sets {sorted(values)}"
    for name, (a, b) in sorted(((n, spans[n]) for n in values), key=lambda x: -x[1][0]):
        lines[a:b] = [f"{name} = {values[name]!r}"]
    monkeypatch.setattr(api, "load", loaded)  # jaxprvr.load resolves to api.load: one loaded model per run
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile("\n".join(lines), str(README), "exec"), {"__name__": "readme_example"})
    return buf.getvalue()


def test_readme_python_api_has_one_example_per_task():
    assert list(_readme_examples()) == ["Partially relevant video retrieval", "Moment retrieval: MRNet",
                                        "Moment retrieval: MESM", "Text–video retrieval"]


# ---------------------------------------------------------------------------------------------- PRVR


@pytest.fixture(scope="module")
def prvr(tmp_path_factory):
    from jaxprvr.config import load_config
    from jaxprvr.data.synthetic import write_synthetic

    base = tmp_path_factory.mktemp("api-prvr")
    root = write_synthetic(base / "data", "tvr", n_train=8, n_val=4, n_test=10, seed=0, visual_dim=16, query_dim=12)
    cfg = load_config("tvr", "ms_sl", PRVR + ["model.visual_feat_dim=16"])  # the width the trainer reads from the data
    run = base / "run"
    raw, shadow = _write_run(cfg, run, "best", seed=1, ema=True)
    out = base / "eval"
    res = _evaluate(["--config", "tvr", "--ckpt", str(run), "--data-root", str(root), "--split", "test",
                     "--save-scores", str(out)] + _sets(PRVR))
    assert res["ema"] is True
    return dict(root=root, run=run, cfg=cfg, raw=raw, shadow=shadow, res=res, scores=np.load(out / "scores.npy"),
                cap_ids=(out / "query_ids.txt").read_text().split(),
                video_ids=(out / "video_ids.txt").read_text().split())


def _prvr_inputs(p, m):
    from jaxprvr.data import PRVRDataset

    ds = PRVRDataset(p["root"], m.config, "test")
    assert ds.cap_ids == p["cap_ids"] and ds.video_ids == p["video_ids"]
    return ds, [ds.queries.read(c) for c in ds.cap_ids], [ds.videos.read(v) for v in ds.video_ids]


def test_prvr_scores_weights_and_readme_are_the_cli_evaluation(prvr, loaded, monkeypatch):
    from jaxprvr.metrics.prvr import eval_q2m

    m = loaded(prvr["run"])
    assert isinstance(m, api_tasks.PRVRModel) and m.ema and m.name == "ms_sl"
    assert _same_tree(m.params, prvr["shadow"])  # the EMA weights, as the CLI evaluated them
    raw = loaded(prvr["run"], ema=False)
    assert not raw.ema and _same_tree(raw.params, prvr["raw"]) and not _same_tree(raw.params, prvr["shadow"])
    ds, qf, vf = _prvr_inputs(prvr, m)
    q, v = m.encode_queries(qf), m.encode_videos(vf)
    s = m.scores(q, v)
    np.testing.assert_allclose(s, prvr["scores"], rtol=1e-5, atol=1e-6, equal_nan=False)
    got = eval_q2m(s, ds.query_video_index)
    for k in ("r1", "r5", "r10", "r100", "sumr", "medr", "meanr"):
        assert got[k] == prvr["res"][k], k
    import jaxprvr.tasks.prvr as prvr_task

    with monkeypatch.context() as mp:  # queries in blocks of 8 (two calls, the last one padded): the same matrix
        mp.setattr(prvr_task, "MAX_SCORE_ROWS", 8)
        np.testing.assert_allclose(m.scores(q, v), s, rtol=1e-6, atol=1e-7, equal_nan=False)  # another program
    branches = m.scores(q, v, branches=True)
    w = m.model.branch_weights()
    assert set(branches) == {"clip", "frame", "fused"} and np.array_equal(branches["fused"], s)
    np.testing.assert_allclose(s, w["clip"] * branches["clip"] + w["frame"] * branches["frame"], rtol=1e-6,
                               equal_nan=False)
    # mutant: query tokens not L2-normalised -> not the CLI's scores
    import jaxprvr.data.sampling as sampling

    with monkeypatch.context() as mp:
        mp.setattr(sampling, "l2_normalize_rows", lambda x, eps=1e-5: np.asarray(x, np.float32))
        bad = m.scores(m.encode_queries(qf), m.encode_videos(vf))
    assert not np.allclose(bad, prvr["scores"], rtol=1e-5, atol=1e-6)
    # bad input: one line naming the argument, what was expected, what was found
    with pytest.raises(JaxprvrError, match=r"encode_queries\(feats\)\[1\]: expected features of width 12"):
        m.encode_queries([np.ones((3, 12)), np.ones((3, 11))])
    with pytest.raises(JaxprvrError, match="finite features"):
        m.encode_videos([np.full((4, 16), np.nan)])
    with pytest.raises(JaxprvrError, match="the dict of encode_videos"):
        m.scores(np.ones((2, 16)), np.ones((3, 16)))
    # the README example prints the CLI's metrics
    out = _run_example("Partially relevant video retrieval", {"RUN": str(prvr["run"]), "DATA": str(prvr["root"])},
                       loaded, monkeypatch)
    assert dict(re.findall(r"(r1|r5|r10|r100|sumr) ([\d.]+)", out)) == {
        k: f"{prvr['res'][k]:.2f}" for k in ("r1", "r5", "r10", "r100", "sumr")}


def test_calls_compile_once_per_bucket(prvr, loaded):
    assert [api.bucket(n) for n in (1, 3, 5, 8, 9, 16, 17, 33, 64, 65, 129)] == [8, 8, 8, 8, 16, 16, 32, 64, 64,
                                                                               128, 192]
    for n in range(1, 300):  # brute force: the smallest power of two >= max(n, 8) up to 64, else a multiple of 64
        want = min(b for b in (8, 16, 32, 64) if b >= n) if n <= 64 else 64 * -(-n // 64)
        assert api.bucket(n) == want
    full = loaded(prvr["run"])
    m = api.load(prvr["run"])  # a fresh one: nothing compiled yet
    _, qf, _ = _prvr_inputs(prvr, m)
    a = m.encode_queries(qf[:3])
    assert m.traces["encode_query"] == 1
    b = m.encode_queries(qf[3:8])  # 5 items: the same bucket of 8, no new compilation
    assert m.traces["encode_query"] == 1
    m.encode_queries(qf[:9])  # a bucket of 16
    assert m.traces == {"encode_query": 2}
    np.testing.assert_allclose(np.concatenate([a, b]), full.encode_queries(qf)[:8], rtol=1e-5, atol=1e-6,
                               equal_nan=False)


def test_checkpoint_folders_and_official_files_load(prvr, loaded, tmp_path):
    from parity.convert import write_official

    cfg = prvr["cfg"]
    step = next((prvr["run"] / "ckpt" / "best").iterdir())
    for path in (prvr["run"] / "ckpt" / "best", step):  # a slot folder and a step folder: evaluate's --ckpt
        m = api.load(path, ema=False)
        assert _same_tree(m.params, prvr["raw"]) and m.config == loaded(prvr["run"]).config
    # config= named: jaxprvr.evaluate's rule (that config, the checkpoint's model section)
    m = api.load(prvr["run"], config="tvr", overrides=["data.eval_query_bsz=32"])
    assert m.config.model == cfg.model and m.config.data.eval_query_bsz == 32 and m.ema
    # a Config object: the same rule (its sections, the checkpoint's model section, then the overrides)
    from jaxprvr.config import load_config

    c = api.load(prvr["run"], config=load_config("tvr", "ms_sl"), overrides=["data.eval_query_bsz=32"])
    assert c.config == m.config and c.config.model.hidden_size == 16 and c.ema
    assert _same_tree(c.params, prvr["shadow"])
    with pytest.raises(JaxprvrError, match="a checkpoint of the config's model 'mtm'"):
        api.load(prvr["run"], config=load_config("tvr", "mtm"))
    # an official MS-SL model.ckpt, converted in memory through the key table: bit-exact
    official = write_official(tmp_path / "model.ckpt", cfg, prvr["raw"])
    dims = [o for o in PRVR if o.startswith("model.")] + ["model.visual_feat_dim=16"]
    m = api.load(official, config="tvr", model="ms_sl", overrides=dims)
    assert _same_tree(m.params, prvr["raw"]) and m.source == str(official) and not m.ema
    with pytest.raises(JaxprvrError, match="config= naming the config"):
        api.load(official)
    with pytest.raises(JaxprvrError, match="hidden_size|shape"):  # mutant: the wrong width for this file
        api.load(official, config="tvr", model="ms_sl", overrides=["model.hidden_size=32", "model.visual_feat_dim=16",
                                                                   "model.q_feat_size=12", "model.n_heads=2"])
    with pytest.raises(JaxprvrError, match="nothing there"):
        api.load(tmp_path / "missing")
    # restored by jaxprvr.checkpoint's readers at the configured model's shapes: a checkpoint of other widths, a
    # truncated file, a missing EMA state are one error line each
    with pytest.raises(JaxprvrError, match=r"params: expected parameters matching the model config: \S+ of shape "
                                           r"\(32,\), found shape \(16,\)") as e:
        api.load(prvr["run"], ema=False, overrides=["model.hidden_size=32"])
    assert "\n" not in str(e.value)
    import shutil

    cut = shutil.copytree(prvr["run"], tmp_path / "cut")
    data = [f for f in (cut / "ckpt" / "best").rglob("*") if f.is_file() and f.parent.name == "d"
            and "opt_state" in f.parts]
    assert data
    for f in data:
        with open(f, "r+b") as fh:
            fh.truncate(50)
    assert _same_tree(api.load(cut, ema=False).params, prvr["raw"])  # the parameters are intact
    with pytest.raises(JaxprvrError, match=r"opt_state: expected a BertAdam state with EMA weights .*ema=False") as e:
        api.load(cut)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600  # the first line of the cause, not tensorstore's spec


def test_official_mtm_file_gives_its_ema_shadow(tmp_path):
    """An official MTM ``best.ckpt`` with ``ema_shadow`` (parity.convert's writer): ``train.use_ema`` and ``ema=True``
    give the shadow bit for bit, ``ema=False`` or ``train.use_ema`` off the raw weights; a shadow missing a tensor
    is one error naming it."""
    import torch

    from jaxprvr.config import load_config
    from parity.convert import write_official
    from torch_ref.checkpoints import RESTRICTED

    dims = ["model.hidden_size=16", "model.n_heads=2", "model.q_feat_size=12", "model.visual_feat_dim=16",
            "model.max_ctx_l=8", "model.map_size=4", "train.use_ema=true"]
    cfg = load_config("tvr", "mtm", dims)
    abstract = api.abstract_variables(cfg)[0]
    raw, shadow = _random_tree(abstract, 11), _random_tree(abstract, 12)
    f = write_official(tmp_path / "best.ckpt", cfg, raw, ema_shadow=shadow)
    m = api.load(f, config="tvr", model="mtm", overrides=dims)
    assert m.ema and _same_tree(m.params, shadow) and not _same_tree(m.params, raw)
    for kw in (dict(overrides=dims, ema=False), dict(overrides=dims[:-1])):
        r = api.load(f, config="tvr", model="mtm", **kw)
        assert not r.ema and _same_tree(r.params, raw)
    ck = torch.load(f, map_location="cpu", pickle_module=RESTRICTED, weights_only=False)
    key = next(iter(ck["ema_shadow"]))
    ck["ema_shadow"].pop(key)
    torch.save(ck, tmp_path / "cut.ckpt", pickle_module=RESTRICTED)
    with pytest.raises(JaxprvrError, match=r"\(ema_shadow\).*1 missing: " + re.escape(key)):
        api.load(tmp_path / "cut.ckpt", config="tvr", model="mtm", overrides=dims)


def test_every_family_has_its_calls():
    """Each family's task names its jaxprvr.load class (``Task.api_class``); a task without one gets a plain Loaded."""
    from jaxprvr import registry
    from jaxprvr.tasks.base import Task

    want = {"ms_sl": api_tasks.PRVRModel, "gmmformer": api_tasks.PRVRModel, "gmmformer_v2": api_tasks.PRVRModel,
            "mtm": api_tasks.PRVRModel, "mrnet": api_tasks.MRNetModel, "mesm": api_tasks.MESMModel,
            "clip_wti": api_tasks.T2VModel}
    assert sorted(registry.names()) == sorted(want)
    for name, cls in want.items():
        assert api._class_for(registry.get(name).task_instance()) is cls, name
    assert api._class_for(Task()) is api.Loaded


def test_import_stays_cheap():
    code = ("import sys, jaxprvr; jaxprvr.JaxprvrError; "
            "print(sorted(m for m in ('jax', 'flax', 'orbax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------- MRNet


@pytest.fixture(scope="module")
def mrnet(tmp_path_factory):
    from jaxprvr.config import load_config
    from jaxprvr.data.synthetic_vmr import write_synthetic_vmr

    base = tmp_path_factory.mktemp("api-mrnet")
    root = write_synthetic_vmr(base / "data", "activitynet", 4, 2, 5, seed=3, video_dim=24, query_dim=16,
                               num_pre_clips=32)
    cfg = load_config("activitynet", "mrnet", MRNET)
    run = base / "run"
    _write_run(cfg, run, "best", seed=3)
    _evaluate(["--config", "activitynet", "--ckpt", str(run), "--data-root", str(root), "--split", "test",
               "--save-predictions", str(base / "eval")] + _sets(MRNET))
    preds = json.loads((base / "eval" / "predictions.json").read_text())["queries"]
    return dict(root=root, run=run, preds={p["query_id"]: p for p in preds})


def test_mrnet_predictions_and_readme_are_the_cli_predictions(mrnet, loaded, monkeypatch):
    from jaxprvr.data.mmn_format import MMNDataset

    m = loaded(mrnet["run"])
    assert isinstance(m, api_tasks.MRNetModel) and set(m.model_state) == {"batch_stats"}
    ds = MMNDataset(mrnet["root"], m.config, "test")
    n = 0
    for i in range(len(ds)):
        r = ds.record(i)
        got = m.predict(ds.raw_video(r.vid), r.queries, duration=r.duration)
        assert len(got) == len(r.query_ids)
        for qid, g in zip(r.query_ids, got):
            want = np.asarray(mrnet["preds"][qid]["pred"], np.float32)
            assert g.shape == want.shape and np.array_equal(g[:, :2], want[:, :2]), qid  # the same windows
            np.testing.assert_allclose(g[:, 2], want[:, 2], rtol=1e-5, atol=1e-6, equal_nan=False)
            n += 1
    assert n == len(mrnet["preds"])
    # every video in one predict_many: calls of at most data.eval_batch_size (4) videos, the same windows
    recs = [ds.record(i) for i in range(len(ds))]
    assert len(recs) > m.config.data.eval_batch_size == 4
    real, calls = m._fns["forward"], []
    m._fns["forward"] = lambda p, st, b: calls.append(len(b["feats"])) or real(p, st, b)
    try:
        many = m.predict_many([ds.raw_video(r.vid) for r in recs], [r.queries for r in recs],
                              [r.duration for r in recs])
    finally:
        m._fns["forward"] = real
    assert calls == [4, 1] and len(many) == len(recs)
    for r, got in zip(recs, many):
        for qid, g in zip(r.query_ids, got):
            want = np.asarray(mrnet["preds"][qid]["pred"], np.float32)
            assert g.shape == want.shape and np.array_equal(g[:, :2], want[:, :2]), qid
            np.testing.assert_allclose(g[:, 2], want[:, 2], rtol=1e-5, atol=1e-6, equal_nan=False)
    r = ds.record(0)  # one query: (text_dim,) is (1, text_dim); other shapes are one error line
    one = m.predict(ds.raw_video(r.vid), r.queries[0], duration=r.duration)
    assert len(one) == 1 and np.array_equal(one[0], m.predict(ds.raw_video(r.vid), r.queries[:1],
                                                              duration=r.duration)[0])
    with pytest.raises(JaxprvrError, match=r"queries\[0\]\[0\]: expected features of width 16"):
        m.predict(ds.raw_video(r.vid), np.ones(32, np.float32), duration=r.duration)  # not two queries
    with pytest.raises(JaxprvrError, match=r"queries\[0\]: expected query features \(n, 16\)"):
        m.predict(ds.raw_video(r.vid), np.ones((2, 2, 16), np.float32), duration=r.duration)
    # mutant: the queries in another order (MRNet's positions are the ranks)
    got = m.predict(ds.raw_video(r.vid), r.queries[::-1], duration=r.duration)[::-1]
    assert any(not np.array_equal(g, np.asarray(mrnet["preds"][q]["pred"], np.float32)) for q, g in
               zip(r.query_ids, got))
    with pytest.raises(JaxprvrError, match="pre-extracted text features"):
        m.predict(ds.raw_video(r.vid), ["a sentence"], duration=r.duration)
    out = _run_example("Moment retrieval: MRNet", {"RUN": str(mrnet["run"]), "DATA": str(mrnet["root"])}, loaded,
                       monkeypatch)
    top = {q: mrnet["preds"][q]["pred"][0] for q in r.query_ids}  # record(0): the README's video
    assert out.splitlines() == [f"{q} {t[0]:.2f}-{t[1]:.2f}s {t[2]:.4f}" for q, t in top.items()]


# ---------------------------------------------------------------------------------------------- MESM


@pytest.fixture(scope="module")
def mesm(tmp_path_factory):
    from jaxprvr.config import load_config
    from jaxprvr.data.synthetic_mesm import write

    base = tmp_path_factory.mktemp("api-mesm")
    # 2 test videos of 4 queries: one evaluation batch of 8 rows, the API's smallest bucket (one compilation each)
    root = write("charades", None, base / "data", sizes={"train": 4, "test": 2},
                 feat_dims={"clip_image": 16, "slowfast": 16}, seed=1)
    _write_text_tower(Path(root) / "clip_tiny")
    cfg = load_config("charades", "mesm", MESM)
    run = base / "run"
    _write_run(cfg, run, "best_val", seed=5)
    out = base / "eval"
    _evaluate(["--config", "charades", "--model", "mesm", "--ckpt", str(run), "--data-root", str(root),
               "--split", "test", "--save-predictions", str(out)] + _sets(MESM))
    rows = [json.loads(line) for line in (out / "charades_test_submission.jsonl").read_text().splitlines()]
    return dict(root=root, run=run, rows={r["qid"]: r for r in rows},
                batches=json.loads((out / "eval_batches.json").read_text()))


def _write_text_tower(out: Path):
    """A 16-wide, 1-layer CLIP text tower with random weights as a ``parity.convert clip2jax`` folder."""
    import jax.numpy as jnp

    from jaxprvr.models.clip import CLIPDims, TextTower
    from parity.clip import save_clip_dir

    dims = CLIPDims(embed_dim=16, text_width=16, text_layers=1, text_heads=2)
    abstract = jax.eval_shape(lambda: TextTower(dims).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    save_clip_dir(out, dims, {"text": _random_tree(abstract["params"], 9)}, {})


def _mesm_split(mesm, m):
    import h5py

    from jaxprvr.data.mesm import open_mesm

    ds = open_mesm("charades", None, mesm["root"], "test", text=False, feat_dims=(16, 16))
    files = [h5py.File(Path(mesm["root"]) / f, "r") for f in m.feature_files]
    return {q.qid: q for q in ds.queries}, lambda vid: [f[vid][()] for f in files]


def _items(qids, queries):
    """A batch's qids (row order) cut into items: the runs of one video."""
    out = []
    for q in qids:
        if out and queries[q].video_id == queries[out[-1][-1]].video_id:
            out[-1].append(q)
        else:
            out.append([q])
    return out


def test_mesm_predictions_and_readme_are_the_cli_submission(mesm, loaded, monkeypatch):
    m = loaded(mesm["run"], data_root=mesm["root"])
    assert isinstance(m, api_tasks.MESMModel)
    queries, feats = _mesm_split(mesm, m)
    seen = 0
    for batch in mesm["batches"]:  # the CLI's own batches, items in order
        items = _items(batch, queries)
        vids = [queries[it[0]].video_id for it in items]
        got = m.predict_many([feats(v) for v in vids], [[queries[q].sentence for q in it] for it in items],
                             [queries[it[0]].duration for it in items])
        for it, windows in zip(items, got):
            for q, w in zip(it, windows):
                want = np.asarray(mesm["rows"][q]["pred_relevant_windows"], np.float32)
                np.testing.assert_array_equal(w, want)
                seen += 1
        # one video alone (per_row masks: the other videos of the batch change nothing), top-3
        it = items[0]
        one = m.predict(feats(vids[0]), [queries[q].sentence for q in it], duration=queries[it[0]].duration, topk=3)
        for q, w in zip(it, one):
            np.testing.assert_array_equal(w, np.asarray(mesm["rows"][q]["pred_relevant_windows"][:3], np.float32))
    assert seen == len(mesm["rows"])
    # mutant: the video's duration doubled -> other windows
    it = _items(mesm["batches"][0], queries)[0]
    cut = m.predict(feats(queries[it[0]].video_id), [queries[q].sentence for q in it],
                    duration=2 * queries[it[0]].duration)
    assert any(not np.array_equal(w, np.asarray(mesm["rows"][q]["pred_relevant_windows"], np.float32))
               for q, w in zip(it, cut))
    with pytest.raises(JaxprvrError, match=r"video_feats\[0\]: expected 2 arrays"):
        m.predict([np.ones((5, 16))] * 3, ["x"], duration=5.0)
    it = _items(mesm["batches"][-1], queries)[-1]  # the README's video: all its queries, in the CLI's row order
    q0 = queries[it[0]]
    out = _run_example("Moment retrieval: MESM", {"RUN": str(mesm["run"]), "DATA": str(mesm["root"]),
                                                  "VIDEO": q0.video_id, "DURATION": q0.duration,
                                                  "QUERIES": [queries[q].sentence for q in it]}, loaded, monkeypatch)
    assert out.splitlines() == [queries[q].sentence + " " + " ".join(
        f"{s:g}-{e:g}s:{p:.4f}" for s, e, p in mesm["rows"][q]["pred_relevant_windows"][:3]) for q in it]


def test_mesm_head_major_batches_are_the_cli_submission(mesm, loaded, tmp_path):
    """The official head-major T2V mask (``model.t2v_mask``'s default; the fixture's run evaluates per_row): a row's
    output depends on the other rows of its batch, so ``predict_many`` over the CLI's own batch gives its
    submission, and the same two videos in the other order give other numbers (per_row masks would not)."""
    hm = [o for o in MESM if not o.startswith("model.t2v_mask")] + ["model.t2v_mask=head_major"]
    out = tmp_path / "eval"
    _evaluate(["--config", "charades", "--model", "mesm", "--ckpt", str(mesm["run"]), "--data-root",
               str(mesm["root"]), "--split", "test", "--save-predictions", str(out)] + _sets(hm))
    rows = {r["qid"]: r for r in map(json.loads, (out / "charades_test_submission.jsonl").read_text().splitlines())}
    batches = json.loads((out / "eval_batches.json").read_text())
    m = loaded(mesm["run"], data_root=mesm["root"], overrides=["model.t2v_mask=head_major"])
    assert m.config.model.t2v_mask == "head_major"
    queries, feats = _mesm_split(mesm, m)
    items = [it for batch in batches for it in _items(batch, queries)]
    assert len(batches) == 1 and len(items) == 2  # one batch of two videos: the rows of both see each other
    got = m.predict_many([feats(queries[it[0]].video_id) for it in items],
                         [[queries[q].sentence for q in it] for it in items],
                         [queries[it[0]].duration for it in items])
    for it, windows in zip(items, got):
        for q, w in zip(it, windows):
            np.testing.assert_array_equal(w, np.asarray(rows[q]["pred_relevant_windows"], np.float32))
    # the two videos in the other order (the same shapes: no compilation): other numbers
    swapped = m.predict_many([feats(queries[it[0]].video_id) for it in items[::-1]],
                             [[queries[q].sentence for q in it] for it in items[::-1]],
                             [queries[it[0]].duration for it in items[::-1]])[::-1]
    assert any(not np.array_equal(w, np.asarray(rows[q]["pred_relevant_windows"], np.float32))
               for it, windows in zip(items, swapped) for q, w in zip(it, windows))


def test_official_mesm_file_loads_bit_exactly(mesm, loaded, tmp_path):
    """The run's parameters written as an official MESM checkpoint (``{model, ..., opt}`` + ``opt.json``,
    parity.mesm's writer): ``jaxprvr.load`` reads them back bit for bit with the model the file's options fix; a
    file missing a tensor is one error naming it."""
    from parity import mesm_keys
    from parity.mesm import save_official

    run = loaded(mesm["run"], data_root=mesm["root"])
    cfg = run.config
    sd = mesm_keys.params_to_torch(jax.device_get(run.params), cfg.model)
    f = save_official(tmp_path / "model_best.ckpt", cfg, sd)
    own = ["model.clip=clip_tiny", "model.t2v_mask=per_row", "model.ss_slots=8"]  # not official options
    m = api.load(f, config="charades", model="mesm", overrides=own, data_root=mesm["root"])
    assert isinstance(m, api_tasks.MESMModel) and m.config.model == cfg.model
    assert _same_tree(m.params, run.params)
    key = next(iter(sd))
    save_official(tmp_path / "cut.ckpt", cfg, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(JaxprvrError, match=re.escape(key)):
        api.load(tmp_path / "cut.ckpt", config="charades", model="mesm", data_root=mesm["root"])


# ---------------------------------------------------------------------------------------------- text-video


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    from jaxprvr.config import load_config
    from jaxprvr.data.synthetic_t2v import write_synthetic_t2v

    base = tmp_path_factory.mktemp("api-t2v")
    root = write_synthetic_t2v(base / "data", "msrvtt", n_train=4, n_test=5, seed=1)
    cfg = load_config("msrvtt", "clip_wti", T2V)
    run = base / "run"
    _write_run(cfg, run, "best", seed=7)
    out = base / "eval"
    _evaluate(["--config", "msrvtt", "--ckpt", str(run), "--data-root", str(root), "--split", "test",
               "--save-scores", str(out)] + _sets(T2V))
    return dict(root=root, run=run, sim=np.load(out / "sim.npy"), ids=json.loads((out / "ids.json").read_text()))


def _t2v_split(t2v, m):
    from jaxprvr.tasks.t2v import T2VSet

    ds = T2VSet(m.config, t2v["root"], "test")
    assert ds.captions == t2v["ids"]["captions"]
    return ds


def test_t2v_similarity_and_readme_are_the_cli_similarity(t2v, loaded, monkeypatch):
    m = loaded(t2v["run"])
    assert isinstance(m, api_tasks.T2VModel)
    ds = _t2v_split(t2v, m)
    t = m.encode_text(ds.captions)
    v = m.encode_video([str(ds.data.video_path(x)) for x in ds.video_ids])  # files, decoded by the API
    sim = m.similarity(t, v)
    cols = [ds.video_ids.index(c) for c in t2v["ids"]["video_ids"]]  # the CLI's columns (pairs protocol)
    np.testing.assert_allclose(sim[:, cols], t2v["sim"], rtol=1e-5, atol=1e-6, equal_nan=False)
    # data.sim_block 2: 3 x 3 calls on blocks of 2 texts x 2 videos (the last ones padded), the same matrix
    import dataclasses

    small = dataclasses.replace(m, config=dataclasses.replace(m.config, data=dataclasses.replace(
        m.config.data, sim_block=2)), _fns={})
    real, calls = jax.jit(lambda p, *a: m.model.apply({"params": p}, *a, method="similarity")), []
    small._fns["similarity"] = lambda p, *a: calls.append(tuple(len(x) for x in a)) or real(p, *a)
    np.testing.assert_allclose(small.similarity(t, v), sim, rtol=1e-6, atol=1e-6, equal_nan=False)
    assert calls == [(2, 2, 2, 2)] * 9
    frames = [ds.video(i)[0][: int(ds.video(i)[1].sum())] for i in range(ds.n_videos)]  # preprocessed frames
    np.testing.assert_allclose(m.similarity(t, m.encode_video(frames))[:, cols], t2v["sim"], rtol=1e-5, atol=1e-6,
                               equal_nan=False)
    # mutant: the frames in reverse order (seqTransf's positions) -> another similarity
    rev = m.similarity(t, m.encode_video([f[::-1] for f in frames]))[:, cols]
    assert not np.allclose(rev, t2v["sim"], rtol=1e-5, atol=1e-6)
    with pytest.raises(JaxprvrError, match="encode_video"):
        m.encode_video([np.zeros((2, 5, 5), np.float32)])
    out = _run_example("Text–video retrieval", {"RUN": str(t2v["run"]), "TEXTS": ds.captions,
                                                "VIDEOS": [str(ds.data.video_path(x)) for x in ds.video_ids]},
                       loaded, monkeypatch)
    cli = t2v["sim"][:, [t2v["ids"]["video_ids"].index(x) for x in ds.video_ids]]  # a column per video
    assert out.splitlines() == [f"{row.argmax()} {row.max():.4f} {text}" for text, row in zip(ds.captions, cli)]
