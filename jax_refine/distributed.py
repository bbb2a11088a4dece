"""Multi-process start-up with ``jax.distributed.initialize``.

- TPU pods, SLURM, Open MPI, Kubernetes: call ``initialize()`` with no arguments; JAX detects the cluster.
- Multi-node GPU (or any launcher): set ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` (and optionally ``JAX_LOCAL_DEVICE_IDS``) in each process's environment.
- Local CPU processes (tests): pass ``coordinator="localhost:PORT"``, ``num_processes``, ``process_id``.
- Nothing of the above: a single process, nothing to do.

Call it before anything touches ``jax.devices()``.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> dict[str, int]:
    """Join the JAX distributed runtime if this is a multi-process run; idempotent.

    Returns ``{"process_index", "process_count", "local_devices", "devices"}``.
    """
    if not jax.distributed.is_initialized():
        coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
        num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
        process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
        if coordinator is not None:
            if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
                raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
            jax.distributed.initialize(coordinator, num_processes, process_id)
        elif num_processes not in (None, 1):
            raise ValueError(f"num_processes={num_processes} needs a coordinator address "
                             "(argument or JAX_COORDINATOR_ADDRESS)")
        else:
            try:  # a cluster JAX detects on its own (TPU pod, SLURM, Open MPI, k8s)
                jax.distributed.initialize()
            except ValueError:  # "coordinator_address should be defined": not in a cluster
                log.debug("no cluster detected: single-process run")
            except RuntimeError as e:  # JAX already in use in this process: keep what it has
                log.debug("jax.distributed auto-detection skipped: %s", e)
    info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count()}
    if info["process_index"] == 0:
        log.info("jax.distributed: %s", info)
    return info


def is_main() -> bool:
    """True on process 0 (the one that logs and writes metrics)."""
    return jax.process_index() == 0
