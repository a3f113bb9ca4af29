"""``python -m jaxprvr.data.frames``: decode a text-video split's videos once into a frame store.

    python -m jaxprvr.data.frames --config msrvtt --data-root $ROOT --split train --out $CACHE

Every video of the split is probed (decord's frame count and fps), its ``max_frames`` indices sampled as the
official loader samples them (``data.video_framerate``), and those frames decoded and written losslessly at their
native size to ``OUT`` (:class:`jaxprvr.data.video.FrameStore`: one ``.npz`` per video with the frames, indices,
frame count and fps; atomic writes, so an interrupted run resumes where it stopped). Training and evaluation then
read frames from the store (``--set data.frame_cache=OUT``) and only augment and preprocess them. Videos already in
the store are skipped and counted; a bad video is an error naming the file, or with ``--on-bad-video zeros`` it is
recorded as bad (a zero video at training time), counted and listed.
"""

from __future__ import annotations

import argparse
import time

from jaxprvr.errors import JaxprvrError


def build_parser() -> argparse.ArgumentParser:
    from jaxprvr.config import all_datasets

    p = argparse.ArgumentParser(prog="python -m jaxprvr.data.frames", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split(
                                    "\n\n", 1)[1])
    p.add_argument("--config", required=True, help=f"a text-video config ({'|'.join(all_datasets())})")
    p.add_argument("--model", default=None, help="default: the config's default model")
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", default="train", help="train | val | test (default: train)")
    p.add_argument("--out", default=None, help="the frame store (default: data.frame_cache, or "
                                                "<data-root>/.jaxprvr_frames/<dataset>-f<T>-r<R>)")
    p.add_argument("--on-bad-video", choices=("error", "zeros"), default=None,
                   help="default: the config's data.on_bad_video")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> dict:
    from jaxprvr.config import load_config
    from jaxprvr.train import task_for

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"data.frame_cache={args.out}")
    if args.on_bad_video:
        overrides.append(f"data.on_bad_video={args.on_bad_video}")
    task = task_for(load_config(args.config, args.model))
    if task.name != "t2v":
        raise JaxprvrError("--config", "a text-video retrieval config (msrvtt, msvd, lsmdc)", repr(args.config))
    cfg = load_config(args.config, args.model, overrides)
    ds = task.open_split(cfg, args.data_root, args.split)
    store, t0 = ds.store, time.perf_counter()
    done, present, frames, bad = 0, 0, 0, []
    it = ds.video_ids
    bar = None
    if not args.no_progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(it), desc=f"{cfg.data.dataset} {args.split}", unit="video", file=sys.stderr,
                   dynamic_ncols=True)
    for vid in it:
        if vid in store:
            present += 1
            rec = store.get(vid)
        else:
            rec = store.put(vid, ds.data.video_path(vid), cfg.data.on_bad_video)
            done += 1
            frames += len(rec.frames)
        if not rec.ok:
            bad.append(vid)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(frames_per_s=f"{frames / max(time.perf_counter() - t0, 1e-9):.0f}")
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t0
    return {"store": str(store.root), "dataset": cfg.data.dataset, "split": args.split, "videos": len(it),
            "decoded": done, "already_stored": present, "frames_decoded": frames, "bad_videos": len(bad),
            "bad_ids": bad[:20], "seconds": round(secs, 2), "frames_per_s": round(frames / max(secs, 1e-9), 1)}


def main(argv=None) -> int:
    from jaxprvr.cli import run_cli

    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
