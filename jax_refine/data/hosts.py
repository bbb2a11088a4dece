"""Multi-host helpers: which slice of a split this process reads, and per-host batches -> global arrays."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def check_process(process_index: int, process_count: int) -> None:
    """Raise ValueError unless 0 <= process_index < process_count."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")


def host_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous slice of `num_examples` (sizes differ by at most 1)."""
    check_process(process_index, process_count)
    bounds = np.linspace(0, num_examples, process_count + 1).round().astype(int)
    return int(bounds[process_index]), int(bounds[process_index + 1])


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
    """Global batch / process count; raises ValueError if it does not divide."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by process_count={process_count}")
    return global_batch_size // process_count


def to_global_batch(batch: dict[str, np.ndarray], mesh: Mesh, pspec: Any = None) -> dict[str, jax.Array]:
    """Per-host numpy batch (b, ...) -> global `jax.Array`s (b * process_count, ...) sharded on `mesh`.

    `pspec`: a `PartitionSpec` for the leading (batch) axis of every leaf, or a dict of them per key;
    default shards the batch axis over all mesh axes. Uses `jax.make_array_from_process_local_data`.
    """
    default = PartitionSpec(tuple(mesh.axis_names))
    out = {}
    for key, value in batch.items():
        spec = pspec.get(key, default) if isinstance(pspec, dict) else (pspec or default)
        out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(value))
    return out
