"""Checkpoints: exact round trip, path resolution, and an interrupted save never breaks the previous one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprvr.checkpoint import Checkpoints, abstract_tree, load_params, resolve_params_dir
from jaxprvr.errors import JaxprvrError


def _tree(seed):
    rng = np.random.default_rng(seed)
    return {"enc": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
            "weight_token": jnp.asarray(rng.normal(size=(1, 1, 3)), jnp.float32)}


def test_round_trip_is_exact_and_keeps_one_step(tmp_path):
    ck = Checkpoints(tmp_path / "ckpt")
    p1, p2 = _tree(0), _tree(1)
    opt = {"mu": _tree(2), "count": jnp.asarray(7, jnp.int32)}
    ck.save("latest", 3, p1, opt, {"epoch": 0})
    ck.save("latest", 6, p2, opt, {"epoch": 1, "best_sumr": 12.5})
    params, opt_r, meta = ck.restore("latest", abstract_tree(p1), abstract_tree(opt))
    assert meta == {"epoch": 1, "best_sumr": 12.5}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)
    assert int(opt_r["count"]) == 7
    assert sorted(int(p.name) for p in (tmp_path / "ckpt" / "latest").iterdir() if p.name.isdigit()) == [6]
    ck.close()


def test_resolve_and_load_params(tmp_path):
    ck = Checkpoints(tmp_path / "run" / "ckpt")
    ck.save("latest", 2, _tree(0), None, {"epoch": 0})
    ck.save("best", 1, _tree(1), None, {"epoch": 0, "val": 1.0})
    ck.close()
    # A run folder prefers best; a slot folder gives its newest step; a step folder is taken as is.
    assert resolve_params_dir(tmp_path / "run").parent.name == "best"
    assert resolve_params_dir(tmp_path / "run" / "ckpt" / "latest").name == "2"
    params, meta = load_params(tmp_path / "run", abstract_tree(_tree(5)))
    np.testing.assert_array_equal(params["enc"]["kernel"], _tree(1)["enc"]["kernel"])
    assert meta["val"] == 1.0
    with pytest.raises(JaxprvrError, match="nothing at that path"):
        resolve_params_dir(tmp_path / "missing")
    with pytest.raises(JaxprvrError, match="parameters matching"):
        load_params(tmp_path / "run", abstract_tree({"other": jnp.zeros((2, 2))}))


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    ck = Checkpoints(tmp_path / "ckpt")
    ck.save("latest", 4, _tree(0), None, {"epoch": 0})
    ck.close()
    # What a kill in the middle of writing step 8 leaves behind: orbax's temporary folder, half written.
    tmp = tmp_path / "ckpt" / "latest" / "8.orbax-checkpoint-tmp-1234567890"
    (tmp / "params").mkdir(parents=True)
    (tmp / "params" / "partial").write_bytes(b"\x00" * 10)
    ck = Checkpoints(tmp_path / "ckpt")
    assert ck.latest_step("latest") == 4
    params, _, meta = ck.restore("latest", abstract_tree(_tree(0)))
    np.testing.assert_array_equal(params["weight_token"], _tree(0)["weight_token"])
    assert resolve_params_dir(tmp_path).name == "4"
    ck.close()
