"""One process of the multi-host check (tests/test_multihost.py starts it in subprocesses).

    multihost_worker.py process ROOT OUT PORT N_PROCESSES PROCESS_ID [ARGS...]   # the train CLI, jax.distributed
    multihost_worker.py reference ROOT OUT N_SLICES                               # train(), one process, N devices
    multihost_worker.py evaluate ROOT CKPT SAVE PORT N_PROCESSES PROCESS_ID       # the evaluate CLI, jax.distributed

Both train the same tiny MS-SL run (``RUN_SETS``: one epoch of 3 steps with a partial last batch,
hard negatives and dropout on, BertAdam, then validation, the best checkpoint and the test evaluation) and
leave their results in OUT (``metrics.jsonl``, ``ckpt/``, ``test_results.json``); the CLI processes print
their JSON summary (ARGS: more train flags, e.g. ``--resume``). The reference cuts each batch into the same N_SLICES
slices, so it sees the same global batches as the N-process run. ``evaluate`` evaluates CKPT on the test split and
writes the artefacts into SAVE.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# MS-SL: its loss has the most query-by-query cross terms (frame NCE and triplets over the (Q, Q) matrix) and
# its forward gathers each query's video by its global label; its step compiles in a third of GMMFormer v2's
# time (which was also checked by hand, Hungarian host callback included).
MODEL = "ms_sl"
# 160 train videos in batches of 56: 56, 56, 48 (two slices of 28: the last batch has padded videos in
# both slices, so its padding lies between the two processes' rows).
RUN_SETS = ["train.batch_size=56", "train.n_epoch=1", "train.lr=1e-3", "loss.hard_negative_start_epoch=0"]


def _multihost_flags(port, n_processes, process_id):
    return ["--coordinator-address", f"localhost:{port}", "--num-processes", str(n_processes),
            "--process-id", str(process_id), "--no-compile-cache"]


def process(root, out, port, n_processes, process_id, *extra):
    from jaxprvr.train import main
    from tests.conftest import TINY_OVERRIDES

    return main(["--config", "tvr", "--model", MODEL, "--data-root", root, "--out", out, "--no-progress",
                 *[f"--set={o}" for o in TINY_OVERRIDES + RUN_SETS], *_multihost_flags(port, n_processes, process_id),
                 *extra])


def evaluate_args(root, ckpt, save):
    """The evaluate CLI's flags for the test split of a run of this file (the data sizes of TINY_OVERRIDES)."""
    from tests.conftest import TINY_OVERRIDES

    return ["--config", "tvr", "--data-root", str(root), "--ckpt", str(ckpt), "--split", "test", "--no-progress",
            "--save-outputs", str(save), *[f"--set={o}" for o in TINY_OVERRIDES if o.startswith("data.")]]


def evaluate(root, ckpt, save, port, n_processes, process_id):
    from jaxprvr.evaluate import main

    return main(evaluate_args(root, ckpt, save) + _multihost_flags(port, n_processes, process_id))


def reference(root, out, n_slices):
    import jax

    from jaxprvr.train import train
    from tests.conftest import tiny_config

    assert jax.process_count() == 1 and len(jax.devices()) == n_slices, jax.devices()
    train(tiny_config(MODEL, extra=RUN_SETS), root, out, progress=False, batch_slices=n_slices)
    return 0


if __name__ == "__main__":
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    # No persistent compilation cache (tests.conftest turns it on when imported): in jax 0.10.2 a CPU step with
    # cross-device collectives read back from it deadlocks (see jaxprvr/distributed.py).
    jax.config.update("jax_enable_compilation_cache", False)
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "process":
        sys.exit(process(args[0], args[1], int(args[2]), int(args[3]), int(args[4]), *args[5:]))
    if mode == "evaluate":
        sys.exit(evaluate(args[0], args[1], args[2], int(args[3]), int(args[4]), int(args[5])))
    sys.exit(reference(args[0], args[1], int(args[2])))
