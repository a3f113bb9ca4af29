"""Analytic FLOP counts of a traced JAX computation: the matrix work of its jaxpr.

``count_flops(fn, *args)`` traces ``fn`` (no compilation, no execution) and adds up, over every equation of
the jaxpr and of every jaxpr nested in it (jit, custom_vjp/jvp, remat, scan bodies times their length, the
largest branch of a cond):

* ``dot_general``: ``2 * prod(batch dims) * prod(lhs free dims) * prod(rhs free dims) * prod(contracting dims)``;
* ``conv_general_dilated``: ``2 * prod(output shape) * (input features / feature groups) * prod(kernel window)``.

Elementwise work (softmax, norms, the selective scan's recurrence) is not counted: on every model here it
is a small fraction of the matmul work, and leaving it out makes "achieved FLOP/s" a conservative figure
against a dense-matmul ceiling. A ``while`` loop has no static trip count; its body is counted once and
reported in ``unbounded_loops``. The traced function of a training step holds the forward *and* the
backward pass (``jax.value_and_grad``), so its count is the whole step, optimizer included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax


@dataclass
class FlopCount:
    flops: float = 0.0
    matmuls: int = 0
    unbounded_loops: int = 0

    def add(self, other: "FlopCount", times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.matmuls += int(times) * other.matmuls
        self.unbounded_loops += other.unbounded_loops


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    batch = math.prod(lhs[d] for d in lb)
    contract = math.prod(lhs[d] for d in lc)
    lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
    rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
    return 2.0 * batch * contract * lhs_free * rhs_free


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, *spatial dims)
    in_feat = rhs[rhs_spec[1]]
    window = math.prod(rhs[d] for d in rhs_spec[2:])
    return 2.0 * math.prod(out) * in_feat * window


def _sub_jaxprs(eqn):
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(name)
        if j is not None:
            yield getattr(j, "jaxpr", j)


def jaxpr_flops(jaxpr) -> FlopCount:
    total = FlopCount()
    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        if prim == "dot_general":
            total.flops += _dot_flops(eqn)
            total.matmuls += 1
        elif prim == "conv_general_dilated":
            total.flops += _conv_flops(eqn)
            total.matmuls += 1
        elif prim == "scan":
            total.add(jaxpr_flops(eqn.params["jaxpr"].jaxpr), eqn.params["length"])
        elif prim == "while":
            total.add(jaxpr_flops(eqn.params["body_jaxpr"].jaxpr))
            total.unbounded_loops += 1
        elif prim == "cond":
            branches = [jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]]
            total.add(max(branches, key=lambda c: c.flops))
        else:
            for sub in _sub_jaxprs(eqn):
                total.add(jaxpr_flops(sub))
    return total


def count_flops(fn, *args, **kwargs) -> FlopCount:
    """The matmul FLOPs of one call of ``fn(*args, **kwargs)`` (traced, not run)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
