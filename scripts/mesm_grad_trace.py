"""Where does a float32 MESM gradient leave float64? A diagnostic for ``parity.check --model mesm`` rows that fail
in float32 only (the float64 groups pass).

    python scripts/mesm_grad_trace.py --config qvhighlights [--set K=V ...] [--output neg_saliency_scores]
                                      [--match t2v_encoder,transformer/encoder]

The check's own batch (``parity.mesm.MESMCheck``: seed 0, 3 videos, the official init, dropout off, its injected
negatives and masked words) goes through the Flax model twice, in float32 and in float64 (same weights, x64 on).
The loss is ``sum(W * outputs[--output])`` with a fixed random ``W`` on the real rows (and frames). Every Flax module
output (``flax.linen.intercept_methods``; a module called twice -- the negative branch -- is ``path#2``) gets a zero
perturbation whose gradient is d loss / d (that output): printed in the order the forward calls the modules, with
its float32-vs-float64 relative error. Reading backwards from the loss, the first output whose error jumps is where
float32 loses it. Then every PReLU input is compared in sign between float32 and float64: an element on the other
side of the kink in float32 takes the other slope (1 vs 0.25), a gradient difference that no float32
implementation avoids (``docs/parity.md``, MESM, official size).
"""

from __future__ import annotations

import argparse
import collections
import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _dump(args, path: Path) -> None:
    import jax

    from jaxprvr.config import load_config
    from parity import mesm as pm
    from parity.rows import TOLERANCES

    cfg = load_config(args.config, "mesm", args.overrides)
    chk = pm.MESMCheck(pm.SPEC, cfg, ckpt=None, data_root=None, seed=args.seed, n_videos=3, steps=5, device=None,
                       say=lambda s: None, compiler_options=None, tol=TOLERANCES["float32"], perturb="none")
    neg, mlm = chk.injected(chk.case, chk._grad_key())
    params = chk.params(chk.twin_nd(chk.twin32))
    batch = {k: np.asarray(v) for k, v in chk.case.flax().items()}
    with open(path, "wb") as f:
        pickle.dump(dict(params=jax.device_get(params), batch=batch, neg=np.asarray(neg), mlm=np.asarray(mlm)), f)


def _trace(args, path: Path) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from jaxprvr.config import load_config
    from jaxprvr.models import build_model
    from jaxprvr.models.mesm import PReLU
    from parity import mesm as pm
    from parity.check import cast_batch, with_compute_dtype

    cfg = pm.SPEC.no_dropout(load_config(args.config, "mesm", args.overrides))
    with open(path, "rb") as f:
        D = pickle.load(f)
    b32 = D["batch"]
    real = np.arange(len(b32["row_group"])) < int(b32["num_rows"])
    match = [m for m in (args.match or "").split(",") if m]

    def run(dt, shapes=None, record_prelu=False):
        c = with_compute_dtype(cfg, "float64") if dt == jnp.float64 else cfg
        model = build_model(c.model)
        p = jax.tree.map(lambda x: jnp.asarray(x, dt), D["params"])
        b = cast_batch(b32, "float64") if dt == jnp.float64 else b32

        def f(deltas):
            counts = collections.Counter()
            prelu_in = {}

            def icpt(next_fun, a, kw, context):
                if record_prelu and isinstance(context.module, PReLU):
                    path_ = "/".join(context.module.path)
                    counts["prelu:" + path_] += 1
                    prelu_in[f"{path_}#{counts['prelu:' + path_]}"] = a[0]
                out = next_fun(*a, **kw)
                if context.method_name != "__call__":
                    return out
                path_ = "/".join(context.module.path)
                counts[path_] += 1
                tag = f"{path_}#{counts[path_]}"
                first = out[0] if isinstance(out, tuple) else out
                if not hasattr(first, "ndim") or first.ndim < 2:
                    return out
                if shapes is not None and tag not in shapes and (not match or any(m in tag for m in match)):
                    shapes[tag] = first.shape
                if tag in deltas:
                    first = first + deltas[tag].astype(first.dtype)
                    out = (first,) + tuple(out[1:]) if isinstance(out, tuple) else first
                return out

            with nn.intercept_methods(icpt):
                o, _ = model.apply({"params": p}, b, train=True, with_neg=True, neg_index=D["neg"],
                                   mlm_mask=D["mlm"], rngs={"dropout": jax.random.key(0)})
            if record_prelu:
                return prelu_in
            y = o[args.output]
            w = np.random.default_rng(0).standard_normal(y.shape)
            w = w * real.reshape((-1,) + (1,) * (y.ndim - 1))
            if "video_mask" in b32 and y.shape[:2] == b32["video_mask"].shape:
                w = w * np.asarray(b32["video_mask"], bool).reshape(y.shape[:2] + (1,) * (y.ndim - 2))
            return jnp.sum(y * jnp.asarray(w, y.dtype))

        return f

    shapes: dict = {}
    jax.eval_shape(run(jnp.float32, shapes), {})
    out = {}
    for dt in (jnp.float32, jnp.float64):
        deltas = {t: jnp.zeros(s, dt) for t, s in shapes.items()}
        g = jax.jit(jax.grad(run(dt)))(deltas)
        out[dt] = {k: np.asarray(v, np.float64) for k, v in g.items()}
    rows = []
    for t in shapes:
        a, r = out[jnp.float32][t], out[jnp.float64][t]
        n = float(np.linalg.norm(r))
        if n > 0:
            rows.append((t, float(np.linalg.norm(a - r)) / n, n))
    pre = {dt: {k: np.asarray(v, np.float64) for k, v in jax.jit(run(dt, record_prelu=True))({}).items()}
           for dt in (jnp.float32, jnp.float64)}
    flips = []
    for k, x64 in pre[jnp.float64].items():
        x32 = pre[jnp.float32][k]
        bad = np.sign(x32) != np.sign(x64)
        if bad.any():
            idx = [tuple(int(i) for i in ix) for ix in zip(*np.nonzero(bad))]
            flips.append(dict(module=k, count=int(bad.sum()), max_abs_x64=float(np.abs(x64[bad]).max()),
                              at=idx[:5]))
    return dict(outputs=rows, prelu_flips=flips)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qvhighlights")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="neg_saliency_scores", help="the model output the loss weights")
    p.add_argument("--match", default="", help="comma list: trace only module paths containing one of these")
    p.add_argument("--json", default=None, help="also write the result as JSON")
    p.add_argument("--phase", choices=("dump", "trace"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase == "dump":
        _dump(args, Path(args.file))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "case.pkl"
        # the batch and weights in a float32 process (the check's own), the trace with x64 on
        subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--phase", "dump",
                        "--file", str(f)], check=True)
        res = _trace(args, f)
    for t, r, n in res["outputs"]:
        print(f"{t:80s} rel {r:.2e}  ||d loss/d out|| {n:.2e}")
    print(f"PReLU inputs on the other side of 0 in float32: {sum(x['count'] for x in res['prelu_flips'])}")
    for x in res["prelu_flips"]:
        print(f"  {x['module']}: {x['count']} (|x| <= {x['max_abs_x64']:.1e}) at {x['at']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
