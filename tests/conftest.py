"""Shared fixtures: one tiny synthetic dataset in the official layout, tiny configs, a compile cache."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Identical computations compiled by different tests (or test runs) are compiled once.
_CACHE = os.environ.get("JAXPRVR_TEST_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxprvr", "jit-tests"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

TINY_VISUAL, TINY_QUERY = 16, 12
TINY_OVERRIDES = [
    "model.hidden_size=32", "model.n_heads=2", f"model.q_feat_size={TINY_QUERY}",
    "train.batch_size=16", "train.n_epoch=2", "train.log_every=1", "data.prefetch=1",
    "data.eval_context_bsz=64", "data.eval_query_bsz=64",
]


def tiny_config(model="gmmformer_v2", dataset="tvr", extra=()):
    from configs import load_config

    return load_config(dataset, model, TINY_OVERRIDES + list(extra))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """TVR-format data with tiny dims: 160 train / 120 val / 120 test videos, 5 queries each."""
    from jaxprvr.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("tiny_data")
    write_synthetic(root, "tvr", n_train=160, n_val=120, n_test=120, seed=0,
                    visual_dim=TINY_VISUAL, query_dim=TINY_QUERY)
    return root


# The long tests (whole training runs, the parity suites) go first: with two xdist workers a long test
# collected last leaves one worker idle at the end (about 3 minutes of the suite's wall time).
SLOW_FIRST = ("tests/test_train.py", "tests/test_sharding.py", "tests/test_multihost.py", "tests/test_parity_mtm.py",
              "tests/test_bf16.py", "tests/test_parity_check.py", "tests/test_parity_train.py",
              "tests/test_mtm_model.py", "tests/test_parity_metrics.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order inside each group is kept
