"""Hungarian (linear-sum-assignment) matching on the host, callable from jitted JAX code.

The assignment itself is a discrete, non-differentiable choice, so it is computed by
``scipy.optimize.linear_sum_assignment`` on the host through one ``jax.pure_callback`` per call (all
problems of a step go to the host together, never one callback per problem). The cost matrix is passed
through ``lax.stop_gradient`` first, so the returned integer indices carry no gradient; a caller gathers
the matched costs in JAX (:func:`gather_assigned`), and gradients flow through those gathered values.
This is the pattern of GMMFormer v2's optimal matching loss
(``GMMFormer_v2/src/Models/gmmformerV2/model.py:110-114``: ``linear_sum_assignment(sim.detach().cpu())``,
then ``sim[q_idx, c_idx]`` kept in the graph).

Result convention: for every row, the index of the column assigned to it, or ``-1`` when the row is
not assigned (padding, an inactive row, or a surplus row of a problem with more rows than columns).

Two layouts:

* :func:`linear_sum_assignment` — a batch of padded problems ``cost (..., R, C)`` with optional row and
  column validity masks; each problem is solved on its valid sub-matrix.
* :func:`grouped_linear_sum_assignment` — a flat ``cost (R, C)`` whose rows are partitioned by an integer
  ``groups (R,)``; the active rows of each group form one problem over all ``C`` columns. This is the
  PRVR layout: rows are the queries of a batch, the group is the query's video, the columns its clips.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment as _scipy_lsa

__all__ = [
    "linear_sum_assignment",
    "grouped_linear_sum_assignment",
    "gather_assigned",
    "host_batched_assignment",
    "host_grouped_assignment",
]


# ----------------------------------------------------------------------------------------------------
# Host (numpy) implementations; also usable directly.
# ----------------------------------------------------------------------------------------------------

def _solve(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy on a float64 copy, as the official code (a float32 torch tensor handed to scipy)."""
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
    return _scipy_lsa(np.asarray(cost, dtype=np.float64))


def host_batched_assignment(cost, row_valid=None, col_valid=None) -> np.ndarray:
    """numpy: ``cost (..., R, C)`` -> ``(..., R)`` int32 assigned column per row, ``-1`` if none."""
    cost = np.asarray(cost)
    *lead, n_rows, n_cols = cost.shape
    flat = cost.reshape((-1, n_rows, n_cols))
    rv = (np.ones(flat.shape[:2], bool) if row_valid is None
          else np.broadcast_to(np.asarray(row_valid), (*lead, n_rows)).reshape((-1, n_rows)).astype(bool))
    cv = (np.ones((flat.shape[0], n_cols), bool) if col_valid is None
          else np.broadcast_to(np.asarray(col_valid), (*lead, n_cols)).reshape((-1, n_cols)).astype(bool))
    out = np.full(flat.shape[:2], -1, np.int32)
    for b in range(flat.shape[0]):
        rows = np.flatnonzero(rv[b])
        cols = np.flatnonzero(cv[b])
        r, c = _solve(flat[b][np.ix_(rows, cols)])
        out[b, rows[r]] = cols[c]
    return out.reshape((*lead, n_rows))


def host_grouped_assignment(cost, groups, row_active) -> np.ndarray:
    """numpy: ``cost (R, C)``, ``groups (R,)``, ``row_active (R,)`` -> ``(R,)`` int32 column or ``-1``.

    The active rows of one group, in increasing row order, form one problem over all columns (the
    official code indexes ``video_query[label_dict[k]]``, i.e. a video's queries in batch order).
    """
    cost = np.asarray(cost)
    groups = np.asarray(groups)
    active = np.asarray(row_active).astype(bool)
    out = np.full(cost.shape[0], -1, np.int32)
    for g in np.unique(groups[active]):
        rows = np.flatnonzero(active & (groups == g))
        r, c = _solve(cost[rows])
        out[rows[r]] = c
    return out


# ----------------------------------------------------------------------------------------------------
# JAX entry points.
# ----------------------------------------------------------------------------------------------------

def linear_sum_assignment(cost: jax.Array, row_valid: jax.Array | None = None,
                          col_valid: jax.Array | None = None) -> jax.Array:
    """Batched Hungarian matching: ``cost (..., R, C)`` -> ``(..., R)`` int32 (``-1`` = unassigned).

    Rows/columns whose mask is 0 take no part. Minimises the total cost of each problem (negate a
    similarity to maximise it). One host callback for the whole batch; works under ``jit``, ``vmap``
    (the callback sees the whole batch at once) and ``grad`` (the indices have zero gradient).
    """
    cost = _stop(cost)
    n_rows, n_cols = cost.shape[-2:]
    lead = cost.shape[:-2]
    rv = jnp.ones((*lead, n_rows), bool) if row_valid is None else jnp.broadcast_to(
        _stop(row_valid).astype(bool), (*lead, n_rows))
    cv = jnp.ones((*lead, n_cols), bool) if col_valid is None else jnp.broadcast_to(
        _stop(col_valid).astype(bool), (*lead, n_cols))
    out_spec = jax.ShapeDtypeStruct((*lead, n_rows), jnp.int32)
    return jax.pure_callback(host_batched_assignment, out_spec, cost, rv, cv, vmap_method="broadcast_all")


def grouped_linear_sum_assignment(cost: jax.Array, groups: jax.Array, row_active: jax.Array) -> jax.Array:
    """Hungarian matching of row groups: ``cost (R, C)`` -> ``(R,)`` int32 (``-1`` = unassigned).

    The active rows sharing a value of ``groups`` form one assignment problem against all ``C``
    columns; all groups are solved in a single host callback.
    """
    cost = _stop(cost)
    out_spec = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
    return jax.pure_callback(host_grouped_assignment, out_spec, cost, _stop(groups).astype(jnp.int32),
                             _stop(row_active).astype(bool), vmap_method="sequential")


def gather_assigned(cost: jax.Array, assignment: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cost (..., R, C)``, ``assignment (..., R)`` -> (matched cost ``(..., R)``, 0/1 mask ``(..., R)``).

    The gather is differentiable w.r.t. ``cost``; unassigned rows give value 0 and mask 0.
    """
    assigned = assignment >= 0
    idx = jnp.where(assigned, assignment, 0)
    vals = jnp.take_along_axis(cost, idx[..., None], axis=-1)[..., 0]
    mask = assigned.astype(cost.dtype)
    return jnp.where(assigned, vals, 0.0), mask


def _stop(x):
    """stop_gradient that also accepts numpy inputs."""
    return jax.lax.stop_gradient(jnp.asarray(x))
