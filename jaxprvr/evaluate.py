"""Evaluate a checkpoint on a split with its task's protocol: the generic evaluation CLI.

    python -m jaxprvr.evaluate --config tvr --ckpt runs/mtm-tvr --data-root $ROOT --split test

The checkpoint's own model config (saved with it) rebuilds the architecture it was trained with; the task
of the model's registry row opens the split and evaluates (PRVR: :class:`jaxprvr.tasks.prvr.Evaluator`,
R@1/5/10/100, SumR, median and mean rank). A run trained with ``train.use_ema`` is evaluated on its EMA weights,
as its validation was, unless ``--no-ema``. Prints the metrics as JSON.

Several processes (hosts) evaluate together with the flags of ``jaxprvr.train`` (``--coordinator-address``,
``--num-processes``, ``--process-id``; :mod:`jaxprvr.distributed`): the gallery is scored over the devices of all
processes, every process prints the same metrics, and process 0 alone writes ``--save-outputs``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import jax

from jaxprvr.cli import add_compile_cache_args, enable_compile_cache, run_cli
from jaxprvr.errors import JaxprvrError
from jaxprvr.logs import log_file, third_party_output_to


def build_parser() -> argparse.ArgumentParser:
    from jaxprvr import distributed, registry
    from jaxprvr.config import all_datasets

    p = argparse.ArgumentParser(
        prog="python -m jaxprvr.evaluate",
        description="Evaluate a checkpoint on a split with its task's official protocol (PRVR: R@1/5/10/100, "
                    "SumR, median/mean rank); prints JSON.")
    p.add_argument("--config", required=True, help=f"dataset ({'|'.join(all_datasets())}) or <model>/<dataset>")
    p.add_argument("--model", default=None, help=f"{' | '.join(registry.names())} (default: the checkpoint's)")
    p.add_argument("--ckpt", required=True, help="a run folder, a checkpoint slot folder, or a step folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-root", default=None, help="the dataset folder (docs/data.md)")
    src.add_argument("--demo", action="store_true", help="use the built-in synthetic demo dataset")
    p.add_argument("--split", default="test", help="val | test | train (default: test)")
    p.add_argument("--save-outputs", "--save-scores", "--save-predictions", "--out", dest="save_outputs",
                   default=None, metavar="DIR",
                   help="write what the task keeps of the evaluation (PRVR: scores.npy + query/video id lists; "
                        "MRNet: metrics.json, predictions.json, score_maps.npz; MESM: the official "
                        "<dataset>_<split>_submission.jsonl and metrics.json)")
    p.add_argument("--eval-batches", default=None, metavar="FILE",
                   help="replay an evaluation batch composition (JSON: a qid list per batch, in row order) where "
                        "the task's batches depend on it (--set data.eval_batches=FILE)")
    p.add_argument("--save-features", action="store_true",
                   help="text-video retrieval: also write features.npz (text tokens, videos after seqTransf, the "
                        "CLIP frame embeddings, masks) into --save-scores OUT")
    p.add_argument("--save-inputs", action="store_true",
                   help="text-video retrieval: also write inputs.npz (ids, masks, the float32 videos: large) and "
                        "frames.json (each video's sampled frame indices, count, fps) into --save-scores OUT")
    p.add_argument("--topk", type=int, default=None,
                   help="moment retrieval: moments kept per query in predictions.json (--set data.topk=K)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-ema", action="store_true",
                   help="evaluate the raw weights of a run trained with train.use_ema (default: the EMA weights)")
    p.add_argument("--no-progress", action="store_true")
    distributed.add_args(p, "run the same command in every process, with the same coordinator and process count "
                         "and a distinct --process-id: the scoring is split over the devices of all processes, every "
                         "process prints the metrics, process 0 writes --save-outputs. Unset: one process.")
    add_compile_cache_args(p)
    return p


def load_checkpoint_config(args):
    """The config of ``--config``/``--model`` with the checkpoint's model section (the architecture it was
    trained with, e.g. a demo's width), then ``--set``; and the checkpoint's saved config dict."""
    from jaxprvr.checkpoint import check_saved_model
    from jaxprvr.config import apply_overrides, load_config

    saved_cfg = check_saved_model(args.ckpt, args.model, f"a checkpoint of --model {args.model}").get("config", {})
    saved = saved_cfg.get("model")
    model = args.model if args.model is not None or saved is None else saved.get("name")
    cfg = with_checkpoint_model(load_config(args.config, model), saved_cfg, args.ckpt)
    overrides = list(args.overrides) + ([f"data.topk={args.topk}"] if getattr(args, "topk", None) else [])
    overrides += ["data.save_features=true"] if getattr(args, "save_features", False) else []
    overrides += ["data.save_inputs=true"] if getattr(args, "save_inputs", False) else []
    if getattr(args, "eval_batches", None):
        if not hasattr(cfg.data, "eval_batches"):
            raise JaxprvrError(f"--eval-batches {args.eval_batches}", "a model whose evaluation batches are "
                               "replayable (a data.eval_batches field)", f"{cfg.model.name}, which has none")
        overrides.append(f"data.eval_batches={Path(args.eval_batches).expanduser().absolute()}")
    return apply_overrides(cfg, overrides), saved_cfg


def with_checkpoint_model(cfg, saved_cfg: dict, where):
    """``cfg`` with a checkpoint's model section (``saved_cfg["model"]``, the architecture it was trained with) and
    the data fields that fix the model's input (``task.checkpoint_data_fields``, e.g. a feature variant and its
    widths); ``cfg`` itself when the checkpoint saved no model section."""
    from jaxprvr.config import apply_overrides, model_config_from_dict
    from jaxprvr.tasks import task_for

    saved, data = saved_cfg.get("model"), saved_cfg.get("data") or {}
    if saved is None:
        return cfg
    cfg = dataclasses.replace(cfg, model=model_config_from_dict(saved, where=str(where)))
    keep = [f"data.{k}={_literal(data[k])}" for k in task_for(cfg).checkpoint_data_fields if k in data]
    return apply_overrides(cfg, keep) if keep else cfg


def _literal(v) -> str:
    """A saved JSON value as ``--set`` text (lists as tuples)."""
    return repr(tuple(v)) if isinstance(v, list) else str(v)


def run(args) -> dict:
    from jaxprvr import distributed

    enable_compile_cache(args)
    multi = distributed.initialize_from_args(args)  # before any JAX computation; a no-op for one process
    log = _log_path(args)
    quiet = contextlib.nullcontext() if log is None else third_party_output_to(
        log, header=f"jaxprvr.evaluate --ckpt {args.ckpt} --split {args.split}")
    with distributed.exit_on_lost_peer(), quiet:
        res = _evaluate(args, multi)
    distributed.shutdown()
    return res


def _log_path(args) -> Path | None:
    """Where third-party warnings go instead of the terminal (as training's ``<out>/log.txt``): the
    ``--save-outputs`` folder, else the run folder ``--ckpt`` names (the one holding ``config.json``); None (left
    alone) for a bare checkpoint folder, whose layout orbax owns."""
    if args.save_outputs:
        return log_file(args.save_outputs, "evaluate.log", args.process_id)
    ckpt = Path(args.ckpt)
    return log_file(ckpt, "evaluate.log", args.process_id) if (ckpt / "config.json").is_file() else None


def _evaluate(args, multi: bool) -> dict:
    from jaxprvr import sharding as shd
    from jaxprvr.checkpoint import load_ema_params, load_model_state, load_params
    from jaxprvr.models import build_model
    from jaxprvr.tasks import task_for
    from jaxprvr.train import init_variables, resolve_data_root

    cfg, saved_cfg = load_checkpoint_config(args)
    task = task_for(cfg)
    if args.split not in task.splits:
        raise JaxprvrError("--split", f"one of {list(task.splits)}", repr(args.split))
    root = resolve_data_root(cfg, args.data_root, args.demo)
    ds = task.open_split(cfg, root, args.split)
    cfg = task.with_data_dims(cfg, ds)
    model = build_model(cfg.model)
    abstract, abstract_state = jax.eval_shape(lambda: init_variables(model, cfg, jax.random.PRNGKey(0)))
    params, _ = load_params(args.ckpt, abstract)
    kw = {"model_state": load_model_state(args.ckpt, abstract_state)} if abstract_state else {}
    use_ema = bool(saved_cfg.get("train", {}).get("use_ema", False)) and not args.no_ema
    if use_ema:  # as in training: validation, best selection and test all ran on the EMA weights
        params = load_ema_params(args.ckpt, abstract)
    mesh = None
    if multi:  # the restored (host-local) arrays, replicated over the devices of every process
        mesh = shd.make_mesh()
        params, kw = shd.replicate(params, mesh), {k: shd.replicate(v, mesh) for k, v in kw.items()}
    res = task.evaluator(model, cfg, mesh).evaluate(params, ds, progress=not args.no_progress,
                                                    keep_outputs=bool(args.save_outputs), **kw)
    if args.save_outputs and jax.process_index() == 0:
        task.save_outputs(args.save_outputs, res, ds)
    res = {k: v for k, v in res.items() if not k.startswith("_")}
    res.update(split=args.split, model=cfg.model.name, dataset=cfg.data.dataset, ckpt=str(args.ckpt), ema=use_ema)
    return res


def main(argv=None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
