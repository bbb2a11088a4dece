"""Device mesh and sharding rules for the trainer.

One table (``config.mesh.rules``) maps the model's logical axis names (``embed``, ``mlp``, ``heads``,
``vocab``, ...; see docs/architecture.md) to mesh axes; parameters and batches get their
``NamedSharding`` from it. The mesh uses Auto axis types (GSPMD-style sharding annotations).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over both data-parallel axes

Rules = Sequence[tuple[str, Any]]


def mesh_shape(shape_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolve ``{"data": -1, "fsdp": 2, "tensor": 1}`` (one -1 allowed) against ``num_devices``."""
    shape = {k: int(v) for k, v in dict(shape_cfg).items()}
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config.mesh.shape: unknown axis {unknown[0]!r}; allowed: {', '.join(MESH_AXES)}")
    shape = {a: shape.get(a, 1) for a in MESH_AXES}
    free = [a for a, v in shape.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in shape.values()):
        raise ValueError(f"config.mesh.shape={shape}: sizes must be positive with at most one -1")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh.shape={shape}: {num_devices} devices not divisible by {fixed}")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ValueError(f"config.mesh.shape={shape} needs {math.prod(shape.values())} devices, "
                         f"have {num_devices}")
    return shape


def make_mesh(shape_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axis types over ``devices`` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(shape_cfg, len(devices))
    return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical: Sequence[str | None] | None, rules: Rules, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """Map logical names to a mesh ``PartitionSpec`` with ``rules``.

    A mesh axis is used at most once per array (flax's rule semantics). With ``shape`` and ``mesh``,
    a dimension whose size does not divide its mesh axes is replicated instead (tiny test models).
    """
    if logical is None:
        return P()
    known = {name for name, _ in rules}
    for name in logical:
        if name is not None and name not in known:
            raise ValueError(f"logical axis {name!r} has no entry in config.mesh.rules ({sorted(known)})")
    spec = nn.logical_to_mesh_axes(tuple(logical), tuple(rules))
    spec = tuple(spec) + (None,) * (len(logical) - len(spec))
    if shape is not None and mesh is not None:
        spec = tuple(ax if dim % _axis_size(mesh, ax) == 0 else None for dim, ax in zip(shape, spec))
    return P(*spec)


def logical_to_sharding(logical_spec: Sequence[str | None] | None, mesh: Mesh, rules: Rules,
                        shape: Sequence[int] | None = None) -> NamedSharding:
    """``NamedSharding`` on ``mesh`` for an array with logical axis names ``logical_spec``."""
    return NamedSharding(mesh, logical_to_spec(logical_spec, rules, shape, mesh))


def param_shardings(abstract_params: Any, logical_specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for a params pytree from its abstract values (B, ...) and logical ``PartitionSpec``s."""
    return jax.tree.map(lambda a, s: logical_to_sharding(tuple(s) if s is not None else None, mesh, rules,
                                                          a.shape),
                        abstract_params, logical_specs, is_leaf=lambda x: isinstance(x, P) or x is None)


def sharding_fn(mesh: Mesh, rules: Rules) -> Callable[[Any, Any], NamedSharding]:
    """The ``(path, logical_names) -> Sharding`` callable ``models.registry.load(shardings=)`` takes.

    Divisibility is not known here, so rules must fit the model (the trainer passes explicit trees).
    """
    def fn(path: Any, logical_names: Sequence[str | None] | None) -> NamedSharding:
        del path
        return logical_to_sharding(logical_names, mesh, rules)
    return fn


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension over ``('data', 'fsdp')``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def check_batch_size(global_batch: int, mesh: Mesh, grad_accum: int = 1) -> None:
    """One-line error when the global batch cannot be split into ``grad_accum`` equal micro-batches, each
    spread evenly over the batch devices (``data`` x ``fsdp``), or over the processes."""
    div = batch_divisor(mesh)
    if global_batch % grad_accum:
        raise ValueError(f"config.train.batch_size={global_batch} is not divisible by "
                         f"config.train.grad_accum={grad_accum}: micro-batches must be equal "
                         f"({global_batch}/{grad_accum} = {global_batch / grad_accum:.3g} examples)")
    micro = global_batch // grad_accum
    if micro % div:
        raise ValueError(f"config.train.batch_size={global_batch} (micro-batch {micro}) is not divisible by the data "
                         f"axes data*fsdp={div}: config.train.grad_accum={grad_accum} makes micro-batches of {micro} "
                         f"examples, each spread over {div} devices; make batch_size / grad_accum a multiple of {div}")
    if global_batch % jax.process_count():
        raise ValueError(f"config.train.batch_size={global_batch} is not divisible by "
                         f"{jax.process_count()} processes")


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's local batch slice into global arrays sharded over ``('data','fsdp')``."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}


# ------------------------------------------------------------------------------------ activations
# The model marks its activations with logical names (`("batch", None, None)` for the (B, T, D) residual
# stream); inside `activation_sharding(mesh, rules)` they become sharding constraints, elsewhere no-ops.
# Without them GSPMD may follow the FSDP-sharded weights and replicate the batch on every device.
_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("activations", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this context, `constrain(x, names)` pins activations to ``mesh`` by ``rules``."""
    token = _ACTIVATIONS.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to its logical names under `activation_sharding`; else ``x``."""
    ctx = _ACTIVATIONS.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(tuple(logical), mesh, rules, x.shape))
