"""Rows of a parity report: one compared stage, its worst differences, its tolerance and PASS/FAIL.

Shared by the generic driver (:mod:`parity.check`) and the families' parity specs (``parity/<family>.py``).

A compared value that holds a NaN or an Inf, in either framework, fails its row, and the note names it
(:func:`nonfinite`); a shape mismatch fails its row for good (no float64 arbiter looks at it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

BLOCK = (1e-5, 1e-6)  # rtol, atol: one block, a loss term (float32)
MODEL = (1e-4, 1e-4)  # a whole model's outputs (float32)
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """The criteria of one precision mode (``python -m parity.check --dtype``).

    ``block``/``model``/``loss``: elementwise ``(rtol, atol)``; ``grad_rel``/``train_rel``: per tensor
    ``||d|| <= rel ||torch||``; ``eps``: the mode's machine epsilon (it scales float32 noise floors)."""

    dtype: str
    eps: float
    block: tuple
    model: tuple
    loss: tuple
    grad_rel: float
    train_rel: float


TOLERANCES = {
    "float32": Tolerances("float32", EPS32, BLOCK, MODEL, BLOCK, 1e-4, 1e-5),
    # float64: both frameworks in double precision agree to rtol 1e-9 everywhere; the atol 1e-12 only covers
    # entries that are ~0 after a cancellation (O(1) activations carry ~1e-16 absolute rounding).
    "float64": Tolerances("float64", EPS64, (1e-9, 1e-12), (1e-9, 1e-12), (1e-9, 1e-12), 1e-9, 1e-9),
}


@dataclasses.dataclass
class Row:
    group: str
    stage: str
    max_abs: float
    max_rel: float
    tolerance: str
    passed: bool
    note: str = ""


def as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def nonfinite(name: str, **arrays) -> str:
    """``""`` when every array is finite, else e.g. ``"x: jax 3 NaN, torch 1 Inf"`` (integers are finite)."""
    parts = []
    for side, x in arrays.items():
        if x is None:
            continue
        a = as_numpy(x)
        if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.complexfloating):
            continue
        n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if n_nan or n_inf:
            parts.append(f"{side} " + ", ".join(f"{n} {w}" for n, w in ((n_nan, "NaN"), (n_inf, "Inf")) if n))
    return f"{name}: {'; '.join(parts)}" if parts else ""


def join_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def close_row(group, stage, jax_value, torch_value, rtol, atol, note="") -> Row:
    """An elementwise ``|jax - torch| <= atol + rtol |torch|`` row (integers must be equal). A NaN/Inf on either
    side or a shape mismatch is a FAIL that the note names."""
    a, t = as_numpy(jax_value), as_numpy(torch_value)
    if a.shape != t.shape:
        return Row(group, stage, float("inf"), float("inf"), "same shape", False,
                   join_notes(f"shapes {a.shape} (jax) vs {t.shape} (torch)", note))
    bad = nonfinite(stage, jax=a, torch=t)
    if bad:
        return Row(group, stage, float("inf"), float("inf"), f"finite; rtol {rtol:g} atol {atol:g}", False,
                   join_notes(f"non-finite {bad}", note))
    if np.issubdtype(t.dtype, np.integer) or np.issubdtype(a.dtype, np.integer):
        d = np.abs(a.astype(np.int64) - t.astype(np.int64))
        m = float(d.max()) if d.size else 0.0
        return Row(group, stage, m, m, "equal", m == 0, note)
    a64, t64 = a.astype(np.float64), t.astype(np.float64)
    d = np.abs(a64 - t64)
    if d.size == 0:
        return Row(group, stage, 0.0, 0.0, f"rtol {rtol:g} atol {atol:g}", True, note)
    ok = bool(np.all(d <= atol + rtol * np.abs(t64)))
    return Row(group, stage, float(d.max()), float((d / (np.abs(t64) + atol)).max()),
               f"rtol {rtol:g} atol {atol:g}", ok, note)


def missing_row(group: str, stage: str) -> Row:
    """A stage one framework has and the other does not: a FAIL."""
    return Row(group, stage, float("inf"), float("inf"), "present in both", False)


def format_table(rows: list[Row], title: str = "") -> str:
    lines = [title] if title else []
    lines += ["| group | stage | max abs | max rel | tolerance | result |", "|---|---|---:|---:|---|---|"]
    for r in rows:
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.group} | {r.stage}{note} | {r.max_abs:.2e} | {r.max_rel:.2e} | {r.tolerance} | "
                     f"{'PASS' if r.passed else 'FAIL'} |")
    n_fail = sum(not r.passed for r in rows)
    lines.append(f"\n{len(rows) - n_fail}/{len(rows)} PASS" + (f", {n_fail} FAIL" if n_fail else ""))
    return "\n".join(lines)
