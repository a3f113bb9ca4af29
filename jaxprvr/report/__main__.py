"""``python -m jaxprvr.report RUN [RUN ...] --out DIR [--eval DIR ...] [--samples N] [--seed S]
[--data-root DIR | --demo]``: the report of :mod:`jaxprvr.report`; prints a JSON summary."""

from __future__ import annotations

import argparse
import shlex
import sys

from jaxprvr.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxprvr.report",
        description="Write a self-contained HTML report with plots (DIR/index.html and its PNGs) of training runs "
                    "and of saved evaluation outputs (needs matplotlib: pip install jaxprvr[report]).")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders of python -m jaxprvr.train (config.json, "
                                                         "metrics.jsonl, test_results.json); several are overlaid")
    p.add_argument("--out", required=True, metavar="DIR", help="the report folder (index.html + PNGs)")
    p.add_argument("--eval", dest="evals", action="append", default=[], metavar="DIR",
                   help="a folder of python -m jaxprvr.evaluate --save-outputs (repeatable); those inside a RUN "
                        "(the run folder or a sub-folder) are found without it")
    p.add_argument("--samples", type=int, default=8, metavar="N",
                   help="queries / captions drawn for the moment timelines and the top-5 videos (default 8)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the seed of that sample (default 0)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-root", default=None, metavar="DIR",
                     help="the dataset folder: text-video frames (the video files), MESM's ground truth")
    src.add_argument("--demo", action="store_true", help="the built-in demo dataset of the run's config instead")
    return p


def run(args) -> dict:
    from jaxprvr.report import build_report

    command = "python -m jaxprvr.report " + " ".join(shlex.quote(a) for a in (args.argv or []))
    return build_report(args.runs, args.out, evals=args.evals, samples=args.samples, seed=args.seed,
                        data_root=args.data_root, demo=args.demo, command=command)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.set_defaults(argv=argv)
    return run_cli(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
