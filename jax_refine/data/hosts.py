"""Multi-host helpers: which slice of a split this process reads (``sharding.host_to_global`` then assembles
the per-host batches into global arrays)."""
from __future__ import annotations

import numpy as np


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
