"""Gallery evaluation of a PRVR model, as the official ``eval_q2m`` protocol (prvr.md §8).

    python -m jaxprvr.evaluate --config tvr --ckpt runs/gmmformer_v2-tvr --data-root $ROOT --split test

1. The gallery (every video with a query in the split, caption-file order) is encoded in blocks of
   ``eval_context_bsz`` videos, as the official loader does (GMMFormer v1's frame encoding depends on it).
2. Queries are encoded in blocks of ``eval_query_bsz``; each block is scored against the whole gallery
   with the per-branch cosine scores, fused with the official branch weights.
3. R@1/5/10/100, SumR, median and mean rank of the ground-truth video per query.

Blocks are padded to static shapes (one compilation per split) and split over the ``data`` mesh.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprvr import sharding as shd
from jaxprvr.cli import add_compile_cache_args, enable_compile_cache, run_cli
from jaxprvr.errors import JaxprvrError
from jaxprvr.metrics.prvr import eval_q2m
from jaxprvr.models import branch_weights


# One scoring call's (queries x videos-per-device x rows-per-video) similarity tensor: about 256 MiB of float32.
SCORE_ELEMENTS = 1 << 26
MAX_SCORE_ROWS = 1024


class Evaluator:
    """Holds the jitted encode/score functions of one model so repeated evaluations never recompile."""

    def __init__(self, model, cfg, mesh=None):
        self.model = model
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else shd.make_mesh()
        self.weights = branch_weights(cfg.model)
        self._n = shd.n_data_shards(self.mesh)

        def encode_video(params, b):
            return model.apply({"params": params}, b["clip_feats"], b["frame_feats"], b["frame_mask"],
                               b["frame_len"], train=False, method=model.encode_video)

        def encode_query(params, b):
            return model.apply({"params": params}, b["query_feats"], b["query_mask"], train=False,
                               method=model.encode_query)

        def score(params, query, gallery):
            return model.apply({"params": params}, query, gallery, method=model.score)

        data, rep = shd.data_sharding(self.mesh), shd.replicated(self.mesh)
        self._encode_video = jax.jit(encode_video, out_shardings=data)
        self._encode_query = jax.jit(encode_query, out_shardings=data)
        # Scoring: the gallery is split over the devices along its video axis (each device scores every query
        # block against its share of the videos; the (queries, videos) result stays split the same way).
        self._score = jax.jit(score, in_shardings=(rep, rep, data),
                              out_shardings=NamedSharding(self.mesh, P(None, shd.DATA_AXIS)))

    def _encode_blocks(self, fn, params, batches, n_items, block, valid_key, keys, progress, desc):
        """Runs ``fn`` on each block padded to a static, device-divisible size; keeps the valid rows."""
        from jaxprvr.data import prefetch

        size = shd.round_up(block, self._n)
        outs = []
        # The host builds the next blocks on a background thread while the device encodes; outputs stay on the
        # device until every block is dispatched, then come back in one pass (no per-block synchronisation).
        with prefetch(({k: b[k] for k in keys} for b in batches), 2) as blocks:
            for b in _bar(blocks, progress, desc, -(-n_items // block)):
                b = _pad_rows(b, size)
                outs.append((fn(params, shd.shard_batch(b, self.mesh)), np.asarray(b[valid_key]) > 0))
        host = [jax.tree.map(lambda x, v=valid: shd.to_host(x)[v], out) for out, valid in outs]  # to every host
        return jax.tree.map(lambda *xs: np.concatenate(xs, 0), *host)

    def encode_gallery(self, params, ds, progress=False) -> dict:
        """Every gallery video in blocks of ``eval_context_bsz``, caption-file order (as the official loader)."""
        from jaxprvr.data import video_batches

        bsz = self.cfg.data.eval_context_bsz
        return self._encode_blocks(self._encode_video, params, video_batches(ds, bsz), len(ds.video_ids), bsz,
                                   "video_valid", ("clip_feats", "frame_feats", "frame_mask", "frame_len",
                                                   "video_valid"), progress, "gallery")

    def encode_queries(self, params, ds, progress=False) -> np.ndarray:
        from jaxprvr.data import query_batches

        bsz = self.cfg.data.eval_query_bsz
        return self._encode_blocks(self._encode_query, params, query_batches(ds, bsz), len(ds.cap_ids), bsz,
                                   "query_valid", ("query_feats", "query_mask", "query_valid"), progress, "queries")

    def score_rows(self, gallery: dict) -> int:
        """Queries scored per call: a multiple of ``eval_query_bsz`` (at least one block) sized so that one call's
        ``(queries, videos per device, rows per video)`` similarity tensor stays near ``SCORE_ELEMENTS`` floats.
        Rows are independent, so the block size changes only the speed, never a score."""
        q = self.cfg.data.eval_query_bsz
        nv = shd.round_up(len(next(iter(gallery.values()))), self._n) // self._n
        per_video = sum(int(np.prod(v.shape[1:-1])) for v in gallery.values() if np.ndim(v) >= 3) or 1
        rows = (SCORE_ELEMENTS // (nv * per_video)) // q * q
        return shd.round_up(int(min(max(rows, q), MAX_SCORE_ROWS)), self._n)

    def score_matrix(self, params, query: np.ndarray, gallery: dict, progress=False) -> dict:
        """Per-branch cosine score matrices (Nq, Nv) and their fused sum under key ``"fused"``.

        The gallery is padded to a multiple of the device count with videos marked invalid
        (``video_valid``: MTM's refiner attends over the gallery and skips them; their columns are dropped)."""
        nv = len(next(iter(gallery.values())))
        padded = shd.round_up(nv, self._n)
        gallery = {**{k: np.asarray(v) for k, v in gallery.items()}, "video_valid": np.ones((nv,), np.float32)}
        gallery = _pad_rows(gallery, padded)
        gallery_dev = {k: shd.put_global(v, shd.data_sharding(self.mesh)) for k, v in gallery.items()}
        size = self.score_rows(gallery)
        query_sharding = shd.replicated(self.mesh)
        outs = []
        n = len(query)
        for start in _bar(range(0, n, size), progress, "scoring", -(-n // size)):
            blk = query[start:start + size]
            m = len(blk)
            blk = np.concatenate([blk, np.zeros((size - m,) + blk.shape[1:], blk.dtype)]) if m < size else blk
            outs.append((self._score(params, shd.put_global(blk, query_sharding), gallery_dev), m))
        mats = {k: np.concatenate([shd.to_host(out[k])[:m, :nv] for out, m in outs], 0) for k in outs[0][0]}
        mats["fused"] = sum(self.weights[k] * mats[k] for k in self.weights)
        return mats

    def evaluate(self, params, ds, progress=False, keep_scores=False) -> dict:
        t0 = time.perf_counter()
        gallery = self.encode_gallery(params, ds, progress)
        query = self.encode_queries(params, ds, progress)
        mats = self.score_matrix(params, query, gallery, progress)
        gt = np.asarray(ds.query_video_index)
        result = {k: eval_q2m(v, gt) for k, v in mats.items()}
        out = dict(result["fused"])
        out["branches"] = {k: v for k, v in result.items() if k != "fused"}
        out["n_queries"], out["n_videos"] = int(len(ds.cap_ids)), int(len(ds.video_ids))
        out["seconds"] = round(time.perf_counter() - t0, 3)
        if keep_scores:
            out["_scores"] = mats["fused"]
        return out


def _pad_rows(b: dict, size: int) -> dict:
    """Pads every array of a block along axis 0 to ``size`` rows of zeros (marked invalid)."""
    out = {}
    for k, v in b.items():
        v = np.asarray(v)
        n = v.shape[0]
        if n < size:
            v = np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)], 0)
        out[k] = v
    return out


def _bar(it, progress, desc, total=None):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)


def format_metrics(m: dict) -> str:
    return " ".join(f"{k}={m[k]:.2f}" for k in ("r1", "r5", "r10", "r100", "sumr") if k in m)


def save_scores(directory: str | Path, scores: np.ndarray, ds) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "scores.npy", scores.astype(np.float32))
    (d / "query_ids.txt").write_text("\n".join(ds.cap_ids) + "\n")
    (d / "video_ids.txt").write_text("\n".join(ds.video_ids) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxprvr.evaluate",
        description="Evaluate a PRVR checkpoint on a split (R@1/5/10/100, SumR, median/mean rank); prints JSON.")
    p.add_argument("--config", required=True, help="dataset (tvr|act|cha) or <model>/<dataset>")
    p.add_argument("--model", default=None, help="ms_sl | gmmformer | gmmformer_v2 | mtm (default: the config's)")
    p.add_argument("--ckpt", required=True, help="a run folder, a checkpoint slot folder, or a step folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-root", default=None, help="folder holding <collection>/TextData and FeatureData")
    src.add_argument("--demo", action="store_true", help="use the built-in synthetic demo dataset")
    p.add_argument("--split", default="test", choices=["val", "test", "train"])
    p.add_argument("--save-scores", default=None, metavar="DIR", help="write scores.npy + query/video id lists")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-ema", action="store_true",
                   help="evaluate the raw weights of a run trained with train.use_ema (default: the EMA weights)")
    p.add_argument("--no-progress", action="store_true")
    add_compile_cache_args(p)
    return p


def run(args) -> dict:
    from configs import load_config
    from configs.base import apply_overrides, model_config_from_dict
    from jaxprvr.checkpoint import load_ema_params, load_params, read_meta
    from jaxprvr.data import PRVRDataset
    from jaxprvr.train import config_with_data_dims, init_params, resolve_data_root

    enable_compile_cache(args)
    cfg = load_config(args.config, args.model)
    saved_cfg = read_meta(args.ckpt).get("config", {})
    saved = saved_cfg.get("model")
    if saved is not None:  # the architecture the checkpoint was trained with (e.g. a demo's width)
        if args.model is not None and saved.get("name") != args.model:
            raise JaxprvrError(args.ckpt, f"a checkpoint of --model {args.model}", f"one of {saved.get('name')}")
        cfg = dataclasses.replace(cfg, model=model_config_from_dict(saved))
    cfg = apply_overrides(cfg, args.overrides)
    root = resolve_data_root(cfg, args.data_root, args.demo)
    ds = PRVRDataset(root, cfg, args.split)
    cfg = config_with_data_dims(cfg, ds)
    from jaxprvr.models import build_model

    model = build_model(cfg.model)
    abstract = jax.eval_shape(lambda: init_params(model, cfg, jax.random.PRNGKey(0)))
    params, meta = load_params(args.ckpt, abstract)
    use_ema = bool(saved_cfg.get("train", {}).get("use_ema", False)) and not args.no_ema
    if use_ema:  # as in training: validation, best selection and test all ran on the EMA weights
        params = load_ema_params(args.ckpt, abstract)
    ev = Evaluator(model, cfg)
    res = ev.evaluate(params, ds, progress=not args.no_progress, keep_scores=bool(args.save_scores))
    if args.save_scores:
        save_scores(args.save_scores, res.pop("_scores"), ds)
    res.update(split=args.split, model=cfg.model.name, dataset=cfg.data.dataset, ckpt=str(args.ckpt), ema=use_ema)
    return res


def main(argv=None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
