"""Hungarian matching op against scipy and against brute force over permutations."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from jaxprvr.ops import matching as M


def _brute_force_min(cost):
    """Minimum total cost of a maximum matching (min(R, C) pairs), by enumeration."""
    r, c = cost.shape
    if r <= c:
        return min(sum(cost[i, p[i]] for i in range(r)) for p in itertools.permutations(range(c), r))
    return min(sum(cost[p[j], j] for j in range(c)) for p in itertools.permutations(range(r), c))


def _total(cost, assign):
    rows = np.flatnonzero(assign >= 0)
    assert len(set(assign[rows].tolist())) == len(rows), "columns must be distinct"
    return cost[rows, assign[rows]].sum(), len(rows)


@pytest.mark.parametrize("shape", [(1, 4), (2, 5), (3, 3), (4, 6), (5, 3)])
def test_against_brute_force_tiny(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(3):
        cost = rng.normal(size=shape).astype(np.float32)
        assign = np.asarray(jax.jit(M.linear_sum_assignment)(cost))
        total, n = _total(cost, assign)
        assert n == min(shape)
        np.testing.assert_allclose(total, _brute_force_min(cost.astype(np.float64)), rtol=1e-5)


def test_batched_with_padding_against_scipy():
    """Rectangular problems (n_q < 32 clips) padded to static shapes; each solved on its valid part."""
    rng = np.random.default_rng(0)
    n_b, n_r, n_c = 6, 7, 32
    cost = rng.normal(size=(n_b, n_r, n_c)).astype(np.float32)
    n_rows = np.array([7, 2, 0, 5, 1, 3])
    n_cols = np.array([32, 32, 32, 4, 32, 2])  # the last problem has more rows than columns
    # valid rows/columns scattered (not a prefix), so positions and sub-matrix indices differ
    rv = np.stack([rng.permutation(np.arange(n_r) < k) for k in n_rows])
    cv = np.stack([rng.permutation(np.arange(n_c) < k) for k in n_cols])
    got = np.asarray(jax.jit(M.linear_sum_assignment)(cost, rv, cv))
    assert got.shape == (n_b, n_r) and got.dtype == np.int32
    for b in range(n_b):
        want = np.full(n_r, -1)
        rows, cols = np.flatnonzero(rv[b]), np.flatnonzero(cv[b])
        r, c = scipy_lsa(cost[b][np.ix_(rows, cols)].astype(np.float64))
        want[rows[r]] = cols[c]
        np.testing.assert_array_equal(got[b], want)
        assert np.all(got[b][~rv[b]] == -1)


def test_vmap_matches_batched_and_host():
    rng = np.random.default_rng(1)
    cost = rng.normal(size=(4, 3, 6)).astype(np.float32)
    a = np.asarray(jax.vmap(M.linear_sum_assignment)(cost))
    b = np.asarray(M.linear_sum_assignment(cost))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, M.host_batched_assignment(cost))


def test_grouped_against_per_group_scipy_and_single_callback(monkeypatch):
    rng = np.random.default_rng(2)
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 0], np.int32)  # the last row: padding (inactive)
    active = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0], bool)  # group 1 is a single-query video
    cost = rng.normal(size=(len(groups), 32)).astype(np.float32)
    calls = []
    host = M.host_grouped_assignment
    monkeypatch.setattr(M, "host_grouped_assignment", lambda *a: (calls.append(1), host(*a))[1])
    got = np.asarray(jax.jit(M.grouped_linear_sum_assignment)(cost, groups, active))
    assert len(calls) == 1  # one host round trip for all groups
    want = np.full(len(groups), -1)
    for g in np.unique(groups[active]):
        rows = np.flatnonzero(active & (groups == g))
        r, c = scipy_lsa(cost[rows].astype(np.float64))
        want[rows[r]] = c
    np.testing.assert_array_equal(got, want)


def test_gradient_flows_through_gathered_costs_only():
    rng = np.random.default_rng(3)
    cost = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
    rv = jnp.asarray([[1, 1, 1], [1, 1, 0]], bool)

    def f(c):
        assign = M.linear_sum_assignment(c, rv)
        vals, mask = M.gather_assigned(c, assign)
        return jnp.sum(vals * mask)

    g = np.asarray(jax.jit(jax.grad(f))(cost))
    assign = M.host_batched_assignment(np.asarray(cost), np.asarray(rv))
    want = np.zeros(cost.shape, np.float32)
    for b in range(2):
        for i in range(3):
            if assign[b, i] >= 0:
                want[b, i, assign[b, i]] = 1.0
    np.testing.assert_array_equal(g, want)
    assert want.sum() == 5


def test_gather_assigned_masks_unassigned():
    cost = jnp.arange(6.0).reshape(2, 3)
    vals, mask = M.gather_assigned(cost, jnp.asarray([2, -1]))
    np.testing.assert_array_equal(vals, [2.0, 0.0])
    np.testing.assert_array_equal(mask, [1.0, 0.0])
