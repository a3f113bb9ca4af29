"""Shared fixtures: one tiny synthetic dataset in the official layout, tiny configs, a compile cache."""

import contextlib
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound on tiny shapes: LLVM's -O0 backend compiles XLA:CPU programs about 25% faster
# (tests/test_bf16.py's MTM case: 66 -> 47 s) and the tiny programs hardly run slower. Subprocesses started by
# the tests inherit the flag, so one-process / multi-process / resumed runs still compile the same code.
# JAXPRVR_TEST_FULL_OPT=1 keeps XLA's default optimisation level.
_FLAGS = os.environ.get("XLA_FLAGS", "")
if os.environ.get("JAXPRVR_TEST_FULL_OPT") != "1" and "xla_backend_optimization_level" not in _FLAGS:
    os.environ["XLA_FLAGS"] = (_FLAGS + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Identical computations compiled by different tests (or test runs) are compiled once.
_CACHE = os.environ.get("JAXPRVR_TEST_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxprvr", "jit-tests"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# ... and by the CLI subprocesses the tests start (a killed and resumed run, the terminal and CLI checks): they
# read the programs the test process wrote instead of compiling them again (jaxprvr.cli.enable_compile_cache;
# runs on several simulated devices or processes keep their cache off).
os.environ.setdefault("JAXPRVR_COMPILE_CACHE", _CACHE)

# The parity checks' compiler options for their tiny programs (XLA -O0, no expensive LLVM passes).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@contextlib.contextmanager
def x64(on: bool = True):
    """``jax_enable_x64`` set to ``on`` inside the block, restored after (float64 parity checks)."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", on)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


TINY_VISUAL, TINY_QUERY = 16, 12
TINY_OVERRIDES = [
    "model.hidden_size=32", "model.n_heads=2", f"model.q_feat_size={TINY_QUERY}",
    "train.batch_size=16", "train.n_epoch=2", "train.log_every=1", "data.prefetch=1",
    "data.eval_context_bsz=64", "data.eval_query_bsz=64",
]


def tiny_config(model="gmmformer_v2", dataset="tvr", extra=()):
    from jaxprvr.config import load_config

    return load_config(dataset, model, TINY_OVERRIDES + list(extra))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """TVR-format data with tiny dims: 160 train / 120 val / 120 test videos, 5 queries each."""
    from jaxprvr.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("tiny_data")
    write_synthetic(root, "tvr", n_train=160, n_val=120, n_test=120, seed=0,
                    visual_dim=TINY_VISUAL, query_dim=TINY_QUERY)
    return root


# The long tests (whole training runs, the parity suites, the 8-device and 2-process checks) start first on
# both workers. pytest-xdist's worksteal scheduler hands each of the 2 workers a contiguous half of the list
# and later moves tests from the tail of a busy worker's queue: the long tests therefore alternate between the
# heads of the two halves. (All at the front of the list, they all went to the first worker and the last of
# them started 13 minutes into the run.) Tests that share a module-scoped fixture (a parity check's rows, a
# trained run) alternate as one unit: split over the two workers, each worker computed the fixture (77 s for
# test_parity_mesm's, 67 s for test_mesm_task's).
SLOW_FIRST = ("tests/test_train.py", "tests/test_sharding.py", "tests/test_multihost.py", "tests/test_parity_mtm.py",
              "tests/test_bf16.py", "tests/test_parity_check.py", "tests/test_parity_mutants.py",
              "tests/test_parity_train.py", "tests/test_mtm_model.py", "tests/test_parity_metrics.py",
              "tests/test_mesm_task.py", "tests/test_mesm_model.py", "tests/test_parity_mesm.py")


def _module(item) -> str:
    return item.nodeid.split("::", 1)[0]


def _unit(item) -> str:
    """The test's module when it uses a module-scoped fixture or a session-scoped one defined in its module (a
    trained run, a parity check), else the test itself."""
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for fd in info.name2fixturedefs.get(name, ()) if info is not None else ():
            if fd.scope == "module" or (fd.scope == "session" and fd.baseid == _module(item)):
                return _module(item)
    return item.nodeid


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = _module(item)
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    ordered = sorted(items, key=rank)  # stable: the order inside each group is kept
    slow = [it for it in ordered if rank(it) < len(SLOW_FIRST)]
    rest = ordered[len(slow):]
    units: dict[str, list] = {}
    for it in slow:
        units.setdefault(_unit(it), []).append(it)
    heads: tuple[list, list] = ([], [])
    singles = shared = 0  # single tests and fixture-sharing units alternate separately
    for key, unit in units.items():
        if len(unit) > 1 or key != unit[0].nodeid:
            heads[shared % 2].extend(unit)
            shared += 1
        else:
            heads[singles % 2].extend(unit)
            singles += 1
    head0, head1 = heads
    cut = max(len(items) // 2 - len(head0), 0)  # the first worker's half: head0 and the first fast tests
    while 0 < cut < len(rest) and _unit(rest[cut]) == _unit(rest[cut - 1]) != rest[cut].nodeid:
        cut += 1  # a module whose tests share a fixture stays on one side of the cut
    items[:] = head0 + rest[:cut] + head1 + rest[cut:]
