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
    """Puts each array of a host batch on the mesh, split along its leading axis (scalars replicated)."""
    shard, rep = data_sharding(mesh), replicated(mesh)
    return {k: jax.device_put(v, shard if np.ndim(v) >= 1 else rep) for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))
