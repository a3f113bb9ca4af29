"""jaxprvr.metrics.t2v against the official functions, transcribed literally in ``torch_ref.t2v_eval`` (BackBone_tvr
``tvr/utils/metrics.py`` L10-26 and L41-78, CLIP4Clip's multi-sentence reshape ``main_task_retrieval.py``
L432-442 = BackBone_tvr ``main_retrieval.py`` L462-471)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxprvr.errors import JaxprvrError
from jaxprvr.metrics.t2v import (chance_t2v_r1, compute_metrics, grouped_t2v_metrics, grouped_t2v_ranks,
                                 grouped_v2t_sim, t2v_metrics)
from torch_ref.t2v_eval import (official_compute_metrics, official_multi_sentence,
                                official_tensor_text_to_video_metrics, official_tensor_video_to_text_sim)


# ------------------------------------------------------------------------------------- helpers

def assert_same_as_official(ours, off):
    for k in ("R1", "R5", "R10", "R50", "MR", "MedianR", "MeanR"):
        assert ours[k] == off[k], k
    np.testing.assert_array_equal(np.sort(ours["ranks"]), np.sort(off["cols"]))
    assert ours["n_ranks"] == len(off["cols"])


def grouped_case(rng, counts, dtype=np.float32, spread=2.0):
    """Captions contiguous per video (CLIP4Clip's order), a boost on each caption's own video."""
    cv = np.repeat(np.arange(len(counts)), counts)
    sim = rng.normal(size=(len(cv), len(counts))).astype(dtype)
    sim[np.arange(len(cv)), cv] += rng.uniform(0, spread, len(cv)).astype(dtype)
    cut_off = (np.cumsum(counts) - 1).tolist()
    return sim, cv, cut_off


# ------------------------------------------------------------------------------------- compute_metrics (pairs)

@pytest.mark.parametrize("n, dtype", [(200, np.float32), (97, np.float64), (60, np.float16)])
def test_compute_metrics_equals_official_on_random(n, dtype):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, n)).astype(dtype)
    x[np.arange(n), np.arange(n)] += rng.uniform(0, 3, n).astype(dtype)
    off = official_compute_metrics(x)
    ours = compute_metrics(x, chunk_rows=7)
    assert_same_as_official(ours, off)
    np.testing.assert_array_equal(ours["ranks"], off["cols"])  # same order too (row-major)
    assert 0 < ours["R1"] < ours["R5"] < ours["R10"] < ours["R50"] <= 100
    assert ours["n_queries"] == n and ours["n_nan"] == ours["n_dropped"] == 0
    assert_same_as_official(compute_metrics(torch.from_numpy(x)), off)  # torch input (the official v2t passes one)


def test_ties_add_every_tied_position():
    """Row 0: the diagonal ties with two others at the top -> ranks 0, 1, 2; row 1: one score above and one tie ->
    ranks 1, 2; row 2: no tie, rank 0. Five ranks for three queries."""
    x = np.array([[5., 5., 5., 1.],
                  [9., 4., 4., 0.],
                  [0., 1., 7., 2.]], np.float32)
    off = official_compute_metrics(x)
    ours = compute_metrics(x)
    assert off["cols"] == [0, 1, 2, 1, 2, 0]
    assert_same_as_official(ours, off)
    assert ours["n_ranks"] == 6 and ours["n_queries"] == 3
    assert ours["R1"] == 200 / 6 and ours["MR"] == 2.0 and ours["MeanR"] == 2.0


@pytest.mark.parametrize("seed", range(4))
def test_many_ties_equal_official(seed):
    rng = np.random.default_rng(seed)
    n = 80
    x = rng.integers(0, 5, size=(n, n)).astype(np.float32)  # heavy ties everywhere
    off = official_compute_metrics(x)
    ours = compute_metrics(x, chunk_rows=13)
    assert len(off["cols"]) > 3 * n  # the optimistic rank and the ones after it
    assert_same_as_official(ours, off)
    np.testing.assert_array_equal(ours["ranks"], off["cols"])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the official inf - inf
def test_nan_and_inf_diagonals_are_dropped_and_counted():
    rng = np.random.default_rng(5)
    n = 50
    x = rng.normal(size=(n, n))
    x[3, 3] = np.nan
    x[10, 10] = np.nan
    x[11, 11] = np.inf  # inf - inf is NaN: dropped officially too
    x[12, 12] = -np.inf
    x[20, 7] = np.nan  # an off-diagonal NaN sorts last: no effect
    x[21, :] = np.nan  # a whole NaN row
    off = official_compute_metrics(x)
    ours = compute_metrics(x)
    assert_same_as_official(ours, off)
    assert len(off["cols"]) == n - 5
    assert (ours["n_nan"], ours["n_dropped"], ours["n_queries"], ours["n_ranks"]) == (3, 5, n, n - 5)
    flat = t2v_metrics(x, "pairs")
    assert flat["t2v/n_nan"] == 3 and flat["t2v/n_dropped"] == 5
    assert flat["v2t/n_nan"] == 3 and flat["t2v/R1"] == off["R1"]


def test_all_nan_is_an_error_not_a_division_by_zero():
    x = np.full((3, 3), np.nan)
    with pytest.raises(ZeroDivisionError):
        official_compute_metrics(x)
    with pytest.raises(JaxprvrError, match="3 with a NaN positive"):
        compute_metrics(x)


def test_one_by_one():
    x = np.array([[0.3]], np.float32)
    off = official_compute_metrics(x)
    assert_same_as_official(compute_metrics(x), off)
    out = t2v_metrics(x)
    assert out["protocol"] == "pairs" and out["n_text"] == out["n_video"] == 1
    assert out["t2v/R1"] == out["v2t/R1"] == 100.0 and out["t2v/MdR"] == out["v2t/MnR"] == 1.0
    out = t2v_metrics(x, "grouped", caption_video=[0])
    assert out["t2v/R1"] == out["v2t/R1"] == 100.0 and out["t2v/MdR"] == 1.0


def test_msvd_pairs_quirk_caps_r1_at_100_over_k():
    """BackBone_tvr scores MSVD as N_caption x N_caption pairs: every video appears once per caption, so each
    row has k identical columns tied with its diagonal and at most one of its k ranks is 0. With perfect
    retrieval R@1 = 100 / k exactly; the grouped protocol on the same scores gives 100."""
    k, n_video = 4, 6
    rng = np.random.default_rng(0)
    cv = np.repeat(np.arange(n_video), k)
    grouped = rng.uniform(0, 1, size=(len(cv), n_video)).astype(np.float32)
    grouped[np.arange(len(cv)), cv] = 2.0  # every caption's own video first: perfect retrieval
    pairs = grouped[:, cv]  # the video of column j is cv[j]: k identical columns per video
    off = official_compute_metrics(pairs)
    ours = compute_metrics(pairs)
    assert_same_as_official(ours, off)
    assert ours["R1"] == 100 / k and ours["n_ranks"] == k * len(cv)
    assert ours["R5"] == 100.0  # ranks 0..k-1 < 5
    assert t2v_metrics(pairs, "pairs")["t2v/R1"] == 100 / k
    g = t2v_metrics(grouped, "grouped", cv)
    assert g["t2v/R1"] == 100.0 and g["v2t/R1"] == 100.0 and g["protocol"] == "grouped"
    assert t2v_metrics(grouped, "auto", cv)["protocol"] == "grouped"


# ------------------------------------------------------------------------------------- grouped (CLIP4Clip)

@pytest.mark.parametrize("seed", range(3))
def test_grouped_equals_clip4clip(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, size=40)
    counts[0] = 5
    sim, cv, cut_off = grouped_case(rng, counts)
    tv, vt, _ = official_multi_sentence(sim, cut_off)
    out = t2v_metrics(sim, "grouped", cv)
    t2v = grouped_t2v_metrics(sim, cv, chunk_rows=17)
    np.testing.assert_array_equal(np.sort(t2v["ranks"]), np.sort(tv["valid_ranks"]))
    for k in (1, 5, 10, 50):  # the official R@K is rounded to float32 (torch's true division)
        assert out[f"t2v/R{k}"] == pytest.approx(tv[f"R{k}"], rel=1e-6, abs=1e-6)
        assert out[f"v2t/R{k}"] == vt[f"R{k}"]
    assert out["t2v/MdR"] == tv["MR"] and out["t2v/MnR"] == tv["MeanR"]
    assert out["v2t/MdR"] == vt["MR"] and out["v2t/MnR"] == vt["MeanR"]
    assert (out["n_text"], out["n_video"], out["t2v/n_ranks"], out["v2t/n_ranks"]) == (len(cv), 40, len(cv), 40)
    # the metrics do not depend on the caption order (the official code needs contiguous captions)
    perm = rng.permutation(len(cv))
    shuffled = t2v_metrics(sim[perm], "grouped", cv[perm])
    assert shuffled == out


def test_grouped_median_is_torch_lower_median():
    """An even number of ranks: torch.median takes the lower middle value, np.median the mean of the two."""
    sim = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]], np.float32)  # ranks 0, 1, 1, 0
    cv = np.array([0, 0, 1, 1])
    tv, _, _ = official_multi_sentence(sim, [1, 3])
    out = t2v_metrics(sim, "grouped", cv)
    np.testing.assert_array_equal(np.sort(tv["valid_ranks"]), [0, 0, 1, 1])
    assert tv["MR"] == 1.0 and out["t2v/MdR"] == 1.0 and np.median([1, 1, 2, 2]) == 1.5


def test_grouped_padding_and_ragged_groups_match_the_reshape():
    """The official [N_video, max_caps, N_video] tensor, -inf padded, holds exactly our rows."""
    rng = np.random.default_rng(3)
    counts = np.array([1, 4, 2, 3])
    sim, cv, cut_off = grouped_case(rng, counts)
    _, _, tensor = official_multi_sentence(sim, cut_off)
    assert tensor.shape == (4, 4, 4)
    for v in range(4):
        rows = sim[cv == v]
        np.testing.assert_array_equal(tensor[v, :len(rows)], rows)
        assert np.all(np.isneginf(tensor[v, len(rows):]))
    np.testing.assert_array_equal(grouped_v2t_sim(sim, cv), official_tensor_video_to_text_sim(tensor).numpy())


def test_grouped_tie_rule_is_the_stable_sort():
    """Ties: torch's CPU argsort is stable up to 16 columns (insertion sort), a quicksort beyond; the port uses
    the stable order (ties to the lower video index) always."""
    rng = np.random.default_rng(7)
    for n_video in (12, 60):
        counts = rng.integers(1, 4, size=n_video)
        cv = np.repeat(np.arange(n_video), counts)
        sim = rng.integers(0, 3, size=(len(cv), n_video)).astype(np.float32)  # many ties with the positive
        cut_off = (np.cumsum(counts) - 1).tolist()
        _, _, tensor = official_multi_sentence(sim, cut_off)
        stable = official_tensor_text_to_video_metrics(tensor.copy(), stable=True)["valid_ranks"]
        default = official_tensor_text_to_video_metrics(tensor.copy())["valid_ranks"]
        ranks, valid = grouped_t2v_ranks(sim, cv)
        assert valid.all()
        # the official flattening is caption-slot-major: map our caption order onto it
        slot = np.concatenate([np.arange(c) for c in counts])
        order = np.lexsort((cv, slot))
        np.testing.assert_array_equal(ranks[order], stable)
        pos = sim[np.arange(len(cv)), cv]
        greater = np.sum(sim > pos[:, None], axis=1)
        ties = np.sum(sim == pos[:, None], axis=1)
        own_first = np.sum((sim == pos[:, None]) & (np.arange(n_video)[None] < cv[:, None]), axis=1)
        np.testing.assert_array_equal(ranks, greater + own_first)
        assert np.all((ranks >= greater) & (ranks <= greater + ties - 1))
        if n_video <= 16:
            np.testing.assert_array_equal(default, stable)
        assert np.all((default[np.argsort(order)] >= greater) & (default[np.argsort(order)] <= greater + ties - 1))
    # a hand example: caption 0's positive (video 2) ties with videos 0 and 3 -> stable rank 1 (after video 0);
    # caption 3's (video 3) ties with all -> rank 3
    sim = np.array([[1.0, 0.5, 1.0, 1.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], np.float32)
    ranks, _ = grouped_t2v_ranks(sim, [2, 1, 0, 3])
    np.testing.assert_array_equal(ranks, [1, 0, 1, 3])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_grouped_nan_and_inf():
    """A caption with a NaN / inf positive is dropped (officially silently; counted here); an off-diagonal NaN
    sorts first in torch's descending sort, so it outranks the positive (kept)."""
    rng = np.random.default_rng(11)
    counts = np.array([3, 2, 4, 1, 2])
    sim, cv, cut_off = grouped_case(rng, counts, dtype=np.float64)
    sim[1, 0] = np.nan  # caption 1 (video 0): NaN positive
    sim[4, 1] = np.inf  # caption 4 (video 1): +inf positive (dropped officially)
    sim[6, 4] = np.nan  # caption 6 (video 2): a NaN at another video -> counted above the positive
    sim[9, :] = np.nan  # caption 9 (the only caption of video 3): all NaN -> video 3 has no v2t positive
    tv, vt, _ = official_multi_sentence(sim.copy(), cut_off)
    out = t2v_metrics(sim, "grouped", cv)
    t2v = grouped_t2v_metrics(sim, cv)
    np.testing.assert_array_equal(np.sort(t2v["ranks"]), np.sort(tv["valid_ranks"]))
    assert (t2v["n_nan"], t2v["n_dropped"], t2v["n_ranks"]) == (2, 3, len(cv) - 3)
    assert out["t2v/MdR"] == tv["MR"] and out["t2v/MnR"] == tv["MeanR"]
    assert out["t2v/R1"] == pytest.approx(tv["R1"], rel=1e-6)
    for ours_key, off_key in (("R1", "R1"), ("R5", "R5"), ("R10", "R10"), ("MdR", "MR"), ("MnR", "MeanR")):
        assert out[f"v2t/{ours_key}"] == vt[off_key]
    # v2t: video 3's captions are all NaN (-> -inf, dropped: counted as NaN), video 1's max is +inf (dropped)
    assert (out["v2t/n_nan"], out["v2t/n_dropped"], out["v2t/n_ranks"]) == (1, 2, 3) and len(vt["cols"]) == 3
    r, _ = grouped_t2v_ranks(sim, cv)
    clean = sim.copy()
    clean[6, 4] = -np.inf
    r_clean, _ = grouped_t2v_ranks(clean, cv)
    assert r[6] == r_clean[6] + 1


# ------------------------------------------------------------------------------------- protocol selection

def test_auto_and_pairs_with_a_permutation():
    rng = np.random.default_rng(2)
    n = 30
    x = rng.normal(size=(n, n)).astype(np.float32)
    x[np.arange(n), np.arange(n)] += 1.5
    base = t2v_metrics(x)
    assert base["protocol"] == "pairs" and base == t2v_metrics(x, "pairs")
    off_t, off_v = official_compute_metrics(x), official_compute_metrics(x.T)
    assert base["t2v/R1"] == off_t["R1"] and base["v2t/MnR"] == off_v["MeanR"] and base["t2v/MdR"] == off_t["MR"]
    assert set(base) == {f"{d}/{k}" for d in ("t2v", "v2t") for k in ("R1", "R5", "R10", "R50", "MdR", "MnR",
                                                                       "n_ranks", "n_nan", "n_dropped")} | {
        "protocol", "n_text", "n_video"}
    # videos in another column order: caption i's video is column perm[i]
    perm = rng.permutation(n)
    y = np.empty_like(x)
    y[:, perm] = x
    assert t2v_metrics(y, "auto", perm) == base
    assert t2v_metrics(y, "pairs", perm) == base
    # one caption per video without ties: grouped gives the same numbers as pairs
    g = t2v_metrics(y, "grouped", perm)
    assert g["protocol"] == "grouped"
    for k in ("R1", "R5", "R10", "R50", "MnR"):
        assert g[f"t2v/{k}"] == pytest.approx(base[f"t2v/{k}"]) and g[f"v2t/{k}"] == base[f"v2t/{k}"]


def test_bad_inputs():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(JaxprvrError, match="square"):
        t2v_metrics(x, "pairs")
    with pytest.raises(JaxprvrError, match="caption_video"):
        t2v_metrics(x, "grouped")
    with pytest.raises(JaxprvrError, match="without a caption"):
        t2v_metrics(x, "grouped", [0, 1, 2])
    with pytest.raises(JaxprvrError, match=r"\[0, 4\)"):
        t2v_metrics(x, "grouped", [0, 1, 4])
    with pytest.raises(JaxprvrError, match="one caption per video"):
        t2v_metrics(np.zeros((3, 3)), "pairs", [0, 0, 1])
    with pytest.raises(JaxprvrError, match="protocol"):
        t2v_metrics(np.zeros((3, 3)), "msvd")
    with pytest.raises(JaxprvrError, match="2-D"):
        compute_metrics(np.zeros(3))
    with pytest.raises(JaxprvrError, match="rows"):
        compute_metrics(np.zeros((4, 3)))


def test_chance():
    assert chance_t2v_r1(1000) == 0.1 and chance_t2v_r1(1) == 100.0
    with pytest.raises(JaxprvrError):
        chance_t2v_r1(0)
    rng = np.random.default_rng(0)
    r1 = np.mean([t2v_metrics(rng.normal(size=(200, 200)))["t2v/R1"] for _ in range(20)])
    assert abs(r1 - chance_t2v_r1(200)) < 0.25
