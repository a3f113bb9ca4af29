"""Run as a script with 8 simulated CPU devices (tests/test_sharding.py starts it in a subprocess).

Compares one mesh of 1 device against a mesh of 8 devices: two training steps of `make_train_step`
(dropout on, hard negatives on, the same keys) and a full gallery evaluation. Prints a JSON line.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402


def main(root, model_name):
    from jaxprvr import sharding as shd
    from jaxprvr.data import PRVRDataset, train_batches
    from jaxprvr.tasks.prvr import TASK, Evaluator
    from jaxprvr.models import build_model
    from jaxprvr.train import config_with_data_dims, init_params, make_train_step, train_keys
    from tests.conftest import tiny_config

    # tests.conftest turns the persistent compilation cache on when imported; JAX 0.10 can deadlock running a
    # multi-device CPU executable loaded from it (jaxprvr.cli.enable_compile_cache skips it for the same reason).
    jax.config.update("jax_enable_compilation_cache", False)
    assert len(jax.devices()) == 8, jax.devices()
    cfg = tiny_config(model_name, extra=["loss.hard_negative_start_epoch=0"])  # hard negatives on
    ds = PRVRDataset(root, cfg, "train")
    val = PRVRDataset(root, cfg, "val")
    cfg = config_with_data_dims(cfg, ds)
    q_cap = shd.round_up(ds.query_capacity(16, 8), 8)
    batches = [{k: b[k] for k in TASK.batch_keys} for b in train_batches(ds, 16, 0, 0, q_cap)][:2]
    model = build_model(cfg.model)
    params = jax.device_get(init_params(model, cfg, jax.random.PRNGKey(0)))
    # The step under test is make_train_step itself; its optimizer here is plain SGD, so a parameter
    # difference is lr x a gradient difference. (BertAdam is elementwise, so sharding reaches it only
    # through the gradients; its normalisation would blow float noise on analytically-zero gradients,
    # e.g. attention key biases, up to a full step of arbitrary sign.)
    tx = optax.sgd(0.05)
    results = {}
    for n in (1, 8):
        mesh = shd.make_mesh(jax.devices()[:n])
        step = make_train_step(model, cfg, tx, mesh, steps_per_epoch=10)
        state = shd.replicate({"params": params, "opt_state": tx.init(params), "step": np.int32(0)}, mesh)
        losses = []
        for b in batches:
            state, m = step(state, shd.shard_batch(b, mesh), train_keys(0))
            losses.append(float(m["loss"]))
        evaluator = Evaluator(model, cfg, mesh)
        ev = evaluator.evaluate(state["params"], val, keep_scores=True)
        # A gallery of 13 videos: 8 devices need 3 padded (invalid) videos, whose columns must not leak.
        gallery = {k: v[:13] for k, v in evaluator.encode_gallery(state["params"], val).items()}
        small = evaluator.score_matrix(state["params"], evaluator.encode_queries(state["params"], val)[:37], gallery)
        results[n] = (jax.device_get(state["params"]), losses, ev["_scores"], ev["sumr"], small["fused"])
    (p1, l1, s1, r1, g1), (p8, l8, s8, r8, g8) = results[1], results[8]
    # Elementwise allclose(rtol=1e-5, atol=1e-6): the largest excess over the tolerance (<= 0: equal).
    excess = max(float(np.max(np.abs(a - b) - 1e-5 * np.abs(a) - 1e-6)) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    print(json.dumps({"param_allclose_excess": excess, "param_max_change": moved, "loss_1": l1, "loss_8": l8,
                      "score_max_abs": float(np.max(np.abs(s1 - s8))), "sumr_1": r1, "sumr_8": r8,
                      "n_val_videos": int(s1.shape[1]), "padded_gallery_shape": list(g8.shape),
                      "padded_gallery_max_abs": float(np.max(np.abs(g1 - g8)))}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
