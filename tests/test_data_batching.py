"""Static-shape batches against a brute-force reconstruction from video_item/query_item; the prefetcher."""

import itertools
import threading
import time

import numpy as np
import pytest

from jaxprvr.data import PRVRDataset, prefetch, query_batches, train_batches, video_batches
from tests.test_data_readers import DQ, DV, cfg_for, write_release

B = 3


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    write_release(root)
    return PRVRDataset(root, cfg_for(), "train")


def official_order(ds, seed, epoch):
    """The video rows of each batch, by brute force: the permutation cut into batches, each sorted as the
    official collate_train does (``list.sort(key=len(frames), reverse=True)``, stable)."""
    perm = np.random.default_rng([seed, epoch]).permutation(ds.num_videos).tolist()
    batches = []
    for start in range(0, len(perm), B):
        rows = perm[start:start + B]
        rows.sort(key=lambda v: len(ds.video_item(v)[1]), reverse=True)
        batches.append(rows)
    return batches


def check_video_rows(batch, ds, rows):
    assert batch["video_index"].tolist() == rows + [-1] * (B - len(rows))
    for b in range(B):
        if b < len(rows):
            clip, frames = ds.video_item(rows[b])
            n = len(frames)
            np.testing.assert_array_equal(batch["clip_feats"][b], clip)
            np.testing.assert_array_equal(batch["frame_feats"][b, :n], frames)
            np.testing.assert_array_equal(batch["frame_mask"][b], np.arange(128) < n)
            assert batch["frame_len"][b] == n and batch["video_valid"][b] == 1
        else:
            n = 0
            assert not batch["clip_feats"][b].any() and batch["video_valid"][b] == 0
            assert batch["frame_len"][b] == 0 and not batch["frame_mask"][b].any()
        assert not batch["frame_feats"][b, n:].any()


def check_query_rows(batch, ds, queries):
    capacity = len(batch["query_index"])
    assert batch["query_index"].tolist() == queries + [-1] * (capacity - len(queries))
    for r in range(capacity):
        if r < len(queries):
            tokens = ds.query_item(queries[r])
            t = len(tokens)
            np.testing.assert_array_equal(batch["query_feats"][r, :t], tokens)
            np.testing.assert_array_equal(batch["query_mask"][r], np.arange(30) < t)
            assert batch["query_valid"][r] == 1
        else:
            t = 0
            assert batch["query_valid"][r] == 0 and not batch["query_mask"][r].any()
        assert not batch["query_feats"][r, t:].any()


TRAIN_SHAPES = dict(clip_feats=((B, 32, DV), np.float32), frame_feats=((B, 128, DV), np.float32),
                    frame_mask=((B, 128), np.float32), frame_len=((B,), np.int32), video_valid=((B,), np.float32),
                    video_index=((B,), np.int32), query_feats=(("Q", 30, DQ), np.float32),
                    query_mask=(("Q", 30), np.float32), query_valid=(("Q",), np.float32),
                    query_labels=(("Q",), np.int32), query_index=(("Q",), np.int32))


@pytest.mark.parametrize("epoch", range(6))
def test_train_batches_match_brute_force(ds, epoch):
    capacity = ds.query_capacity(B, 4)
    batches = list(train_batches(ds, B, epoch=epoch, seed=7, query_capacity=capacity))
    expected = official_order(ds, 7, epoch)
    assert len(batches) == len(expected) == -(-ds.num_videos // B)
    seen = []
    for batch, rows in zip(batches, expected):
        assert set(batch) == set(TRAIN_SHAPES)
        for key, (shape, dtype) in TRAIN_SHAPES.items():
            assert batch[key].shape == tuple(capacity if s == "Q" else s for s in shape), key
            assert batch[key].dtype == dtype, key
        check_video_rows(batch, ds, rows)
        # Queries: each video's, contiguous, in video (row) order then caption order.
        queries = [j for v in rows for j in range(ds.num_queries) if ds.query_video_index[j] == v]
        check_query_rows(batch, ds, queries)
        for r, j in enumerate(queries):
            assert batch["video_index"][batch["query_labels"][r]] == ds.query_video_index[j]
        assert not batch["query_labels"][len(queries):].any()
        seen += rows
    assert sorted(seen) == list(range(ds.num_videos))  # every video exactly once


def test_train_order_is_deterministic_per_seed_and_epoch(ds):
    def order(seed, epoch):
        return [b["video_index"].tolist() for b in train_batches(ds, B, epoch, seed, ds.query_capacity(B, 1))]

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1)
    assert order(3, 0) != order(4, 0)


def test_skip_resumes_inside_an_epoch(ds):
    """``skip=k`` gives exactly the epoch's batches after the first k (what ``--resume`` relies on)."""
    cap = ds.query_capacity(B, 1)
    full = list(train_batches(ds, B, 3, 5, cap))
    for k in (1, len(full) - 1, len(full)):
        rest = list(train_batches(ds, B, 3, 5, cap, skip=k))
        assert len(rest) == len(full) - k
        for a, b in zip(full[k:], rest):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_workers_give_the_serial_batches(ds, workers):
    """The thread-pool builder yields exactly the serial batches, in order (also with ``skip``), and a
    consumer that stops early leaves no thread behind."""
    import threading

    cap = ds.query_capacity(B, 1)
    for skip in (0, 2):
        serial = list(train_batches(ds, B, 2, 5, cap, skip=skip))
        parallel = list(train_batches(ds, B, 2, 5, cap, skip=skip, workers=workers))
        assert len(parallel) == len(serial)
        for a, b in zip(serial, parallel):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    it = train_batches(ds, B, 2, 5, cap, workers=workers)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("jaxprvr-batch")]


def test_ordered_map_propagates_errors_in_order():
    from jaxprvr.data import ordered_map

    def fn(x):
        if x == 3:
            raise ValueError("item 3")
        return x * x

    got = []
    with pytest.raises(ValueError, match="item 3"):
        for y in ordered_map(fn, range(6), 3):
            got.append(y)
    assert got == [0, 1, 4]


def test_sort_ties_are_exercised(ds):
    """Three videos have 128 frames after sampling; some tested epoch puts two of them in one batch, so the
    stable-sort order is checked by test_train_batches_match_brute_force."""
    lengths = ds.frame_lengths
    assert any(len(rows) - len(set(lengths[rows].tolist())) > 0
               for epoch in range(6) for rows in official_order(ds, 7, epoch))


def test_query_capacity_bounds_every_batch(ds):
    capacity = ds.query_capacity(B, 1)
    counts = [sum(1 for j in range(ds.num_queries) if ds.query_video_index[j] == v) for v in range(ds.num_videos)]
    assert capacity == max(sum(counts[v] for v in rows) for rows in itertools.combinations(range(ds.num_videos), B))
    for epoch in range(30):
        for batch in train_batches(ds, B, epoch, 0, capacity):
            assert batch["query_valid"].sum() <= capacity
    with pytest.raises(AssertionError, match="query capacity"):
        for _ in train_batches(ds, B, 0, 0, query_capacity=1):
            pass


def test_eval_batches_in_caption_order(ds):
    batches = list(video_batches(ds, B))
    assert len(batches) == -(-ds.num_videos // B)
    for k, batch in enumerate(batches):
        assert set(batch) == {"clip_feats", "frame_feats", "frame_mask", "frame_len", "video_valid", "video_index"}
        check_video_rows(batch, ds, list(range(k * B, min((k + 1) * B, ds.num_videos))))
    qb = 4
    batches = list(query_batches(ds, qb))
    assert len(batches) == -(-ds.num_queries // qb)
    for k, batch in enumerate(batches):
        assert set(batch) == {"query_feats", "query_mask", "query_valid", "query_index"}
        assert batch["query_feats"].shape == (qb, 30, DQ)
        check_query_rows(batch, ds, list(range(k * qb, min((k + 1) * qb, ds.num_queries))))


def test_prefetch_keeps_order_and_passthrough():
    assert list(prefetch(iter(range(100)), 2)) == list(range(100))
    assert list(prefetch(range(5), 0)) == list(range(5))
    assert list(prefetch([], 3)) == []


def test_prefetch_propagates_producer_exception():
    def source():
        yield from range(5)
        raise KeyError("broken item")

    got = []
    with pytest.raises(KeyError, match="broken item"):
        for item in prefetch(source(), 2):
            got.append(item)
    assert got == list(range(5))


def test_prefetch_stops_when_consumer_stops_early():
    closed = threading.Event()
    produced = []

    def source():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    before = threading.active_count()
    it = prefetch(source(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert closed.is_set()  # the producer closed its source
    assert len(produced) <= 3 + 2 + 1  # at most size items ahead (plus one in hand)
    assert threading.active_count() == before

    def abandon():  # a consumer that breaks out and drops the iterator
        for _ in prefetch(range(1000), 2):
            break

    abandon()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
