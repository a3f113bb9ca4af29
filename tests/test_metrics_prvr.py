"""eval_q2m against brute-force argsort ranks and the official loop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprvr.errors import JaxprvrError
from jaxprvr.metrics.prvr import chance_sumr, eval_q2m, gt_ranks


def official_eval_q2m(errors, gts):
    """ms-sl method/eval.py eval_q2m, transcribed (one gt per query); a stable argsort for determinism."""
    n_q, n_m = errors.shape
    ranks = np.zeros(n_q, np.int32)
    for i in range(n_q):
        sorted_idxs = np.argsort(errors[i], kind="stable")
        ranks[i] = np.where(sorted_idxs == gts[i])[0][0] + 1
    r = [100.0 * len(np.where(ranks <= k)[0]) / n_q for k in (1, 5, 10, 100)]
    return (*r, np.median(ranks), ranks.mean()), ranks


def test_matches_official_loop_on_random_scores():
    rng = np.random.default_rng(0)
    n_q, n_v = 300, 150
    gt = rng.integers(0, n_v, n_q)
    scores = rng.normal(size=(n_q, n_v)).astype(np.float32)
    scores[np.arange(n_q), gt] += rng.uniform(0, 3, n_q)  # spread the ranks over 1..n_v
    (r1, r5, r10, r100, medr, meanr), ranks = official_eval_q2m(-scores, gt)
    out = eval_q2m(scores, gt, chunk_rows=64)
    assert 0 < r1 < r5 < r10 < r100 < 100
    assert (out["r1"], out["r5"], out["r10"], out["r100"], out["medr"], out["meanr"]) == (
        r1, r5, r10, r100, medr, meanr)
    assert out["sumr"] == r1 + r5 + r10 + r100
    np.testing.assert_allclose(out["map"], np.mean(1.0 / ranks))
    np.testing.assert_array_equal(gt_ranks(jnp.asarray(scores), gt), ranks)  # jax input


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_tie_rules_against_brute_force(chunk):
    rng = np.random.default_rng(1)
    n_q, n_v = 60, 12
    scores = rng.integers(0, 4, size=(n_q, n_v)).astype(np.float32)  # many ties
    gt = rng.integers(0, n_v, n_q)
    stable = np.array([np.flatnonzero(np.argsort(-scores[i], kind="stable") == gt[i])[0] + 1 for i in range(n_q)])
    optimistic = np.array([1 + np.sum(scores[i] > scores[i, gt[i]]) for i in range(n_q)])
    pessimistic = np.array([np.sum(scores[i] >= scores[i, gt[i]]) for i in range(n_q)])
    assert np.any(optimistic != pessimistic)
    np.testing.assert_array_equal(gt_ranks(scores, gt, chunk_rows=chunk), stable)
    np.testing.assert_array_equal(gt_ranks(scores, gt, ties="optimistic", chunk_rows=chunk), optimistic)
    np.testing.assert_array_equal(gt_ranks(scores, gt, ties="pessimistic", chunk_rows=chunk), pessimistic)


def test_all_equal_scores_are_not_optimistic():
    scores = np.zeros((5, 200), np.float32)
    gt = np.array([0, 50, 120, 199, 3])
    out = eval_q2m(scores, gt)
    np.testing.assert_array_equal(gt_ranks(scores, gt), gt + 1)
    assert out["r1"] == 20.0 and out["r100"] == 60.0


def test_chance_sumr_exact_and_monte_carlo():
    for n_v in (1, 3, 10, 57, 100, 2179):
        # independent: average SumR over every possible gt rank 1..n_v
        ranks = np.arange(1, n_v + 1)
        want = np.mean([sum(100.0 * (r <= k) for k in (1, 5, 10, 100)) for r in ranks])
        np.testing.assert_allclose(chance_sumr(n_v), want, rtol=1e-12)
    rng = np.random.default_rng(2)
    n_q, n_v = 4000, 40
    out = eval_q2m(rng.normal(size=(n_q, n_v)), rng.integers(0, n_v, n_q))
    assert abs(out["sumr"] - chance_sumr(n_v)) < 4.0


def test_bad_inputs_raise():
    with pytest.raises(JaxprvrError):
        eval_q2m(np.zeros((3, 4)), np.array([0, 1]))
    with pytest.raises(JaxprvrError):
        eval_q2m(np.zeros((2, 4)), np.array([0, 4]))
    with pytest.raises(JaxprvrError):
        eval_q2m(np.array([[0.0, np.nan]]), np.array([0]))
    with pytest.raises(JaxprvrError):
        chance_sumr(0)
