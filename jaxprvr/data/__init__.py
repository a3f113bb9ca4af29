"""Data: the generic pipeline (:mod:`jaxprvr.data.pipeline`), readers for the MS-SL release layout, official
sampling, static-shape batching, synthetic writers.

See docs/data.md for the on-disk layout and how batches are built.
"""

from jaxprvr.data.dataset import PRVRDataset, open_splits, query_batches, train_batches, video_batches
from jaxprvr.data.pipeline import batch_workers, ordered_map, prefetch
from jaxprvr.data.msl_format import (BigFile, QueryFeatures, ReleasePaths, VideoFeatures, read_captions,
                                     read_video2frames, release_paths, video_id_of)
from jaxprvr.data.sampling import average_to_fixed_length, bin_edges, l2_normalize_rows, uniform_feature_sampling

__all__ = [
    "PRVRDataset", "open_splits", "train_batches", "ordered_map", "video_batches", "query_batches", "prefetch",
    "batch_workers",
    "BigFile", "QueryFeatures", "VideoFeatures", "ReleasePaths", "release_paths", "read_captions",
    "read_video2frames", "video_id_of",
    "average_to_fixed_length", "uniform_feature_sampling", "l2_normalize_rows", "bin_edges",
    "write_synthetic", "demo_root",
]


def __getattr__(name):
    # The synthetic writers load lazily, so `python -m jaxprvr.data.synthetic` does not import itself twice.
    if name in ("write_synthetic", "demo_root"):
        from jaxprvr.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
