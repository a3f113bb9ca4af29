"""A 1-D ``data`` mesh, used from day one: the same code runs on 1 device, on 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on a GPU, and on several hosts.

Parameters and optimizer state are replicated; every batch array is split along its leading axis
(videos for video-side arrays, queries for query-side arrays). ``jax.jit`` keeps global semantics, so
cross-video terms of the losses are exact on any number of devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def n_data_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Puts each array of a host batch on the mesh, split along its leading axis (scalars replicated).
    With several processes, each holds the same whole batch and places only its devices' rows."""
    shard, rep = data_sharding(mesh), replicated(mesh)
    return {k: put_global(v, shard if np.ndim(v) >= 1 else rep) for k, v in batch.items()}


def shard_local_batch(batch: dict, mesh: Mesh) -> dict:
    """The global batch from each process's own rows: every array of ``batch`` holds this process's
    consecutive part of the leading axis (all processes the same number of rows); the global arrays are
    the concatenation over processes, in process order (``jax.make_array_from_process_local_data``)."""
    if jax.process_count() == 1:
        return shard_batch(batch, mesh)
    shard = data_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(shard, np.asarray(v)) for k, v in batch.items()}


def put_global(x, sharding: NamedSharding):
    """``jax.device_put(x, sharding)`` of a host array that every process holds whole. With several
    processes, each places only the parts of its own devices (no cross-process check or transfer)."""
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    # A host-local value (numpy, or an array on this process's devices: jax 0.10's device_put of one to a
    # multi-process sharding builds a broken array), placed from its host copy.
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy on this host; with several processes
    a sharded array is gathered from all of them (every process must call this)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicate(tree, mesh: Mesh):
    if jax.process_count() > 1:
        return jax.tree.map(lambda x: put_global(x, replicated(mesh)), tree)
    return jax.device_put(tree, replicated(mesh))
