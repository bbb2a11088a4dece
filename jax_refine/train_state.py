"""Train state, optimizer and sharded initialisation.

The state is a ``TrainState`` dataclass pytree: ``step`` int32 (), ``params`` (the student's ``nnx.Param``
values as a pure nested dict, ``nnx.State.to_pure_dict``; the model is rebuilt inside the step with
``nnx.merge(graphdef, params)``), ``opt_state`` (optax), ``rng`` uint32 (2,) key data and ``teacher`` (the
frozen start params, or None). Its shardings are a ``TrainState`` of ``NamedSharding``s. A method that needs
more state subclasses it and adds fields; checkpoints save every field except those in ``NOT_SAVED``
(the teacher, re-derived from the start weights on resume).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from jax_refine import sharding as shd

PyTree = Any
TRAINABLE, FROZEN = "trainable", "frozen"


@struct.dataclass
class TrainState:
    """The train state (a pytree). Subclass it to add fields (each needs a default, e.g. None); the step
    carries extra fields through unchanged and checkpoints save and restore them like the others."""
    step: jax.Array  # int32 (): optimizer steps done
    params: PyTree  # the student's params (pure nested dict)
    opt_state: PyTree  # optax state
    rng: jax.Array  # uint32 (2,): key data of the run's base key (fold in the step for a per-step key)
    teacher: PyTree = None  # frozen start params, None when the method needs no teacher

    NOT_SAVED: ClassVar[tuple[str, ...]] = ("teacher",)

    def saved(self) -> dict[str, Any]:
        """The fields a checkpoint holds, by name (every field but ``NOT_SAVED``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.NOT_SAVED}

    def without_unsaved(self) -> "TrainState":
        """This state with the ``NOT_SAVED`` fields set to None (what a restore gives back)."""
        return self.replace(**{name: None for name in self.NOT_SAVED})


def path_str(path: Sequence[Any]) -> str:
    """``(DictKey('vision'), DictKey('layers'), DictKey(0), ...)`` -> ``'vision/layers/0/...'``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_paths(params: PyTree) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def freeze_labels(params: PyTree, patterns: Sequence[str], always_frozen: Sequence[str] = ()) -> PyTree:
    """``'frozen'`` for params whose path matches any regex in ``patterns`` (``re.search``), else ``'trainable'``.

    ``always_frozen``: extra regexes that need not match anything (e.g. an unused ``logit_scale``).
    A user pattern that matches no parameter is an error (a typo would otherwise train everything).
    """
    paths = param_paths(params)
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"config.train.freeze: invalid regex {p!r}: {e}") from e
    for p, rx in zip(patterns, compiled):
        if not any(rx.search(s) for s in paths):
            raise ValueError(f"config.train.freeze: {p!r} matches no parameter (paths look like {paths[0]!r})")
    compiled += [re.compile(p) for p in always_frozen]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: FROZEN if any(rx.search(path_str(path)) for rx in compiled) else TRAINABLE, params)


def make_schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
    """``constant`` (with optional linear warmup) or ``warmup_cosine`` (to 0 at ``total_steps``)."""
    lr, warmup = float(opt_cfg.lr), int(opt_cfg.get("warmup_steps", 0) or 0)
    if opt_cfg.schedule == "constant":
        if warmup <= 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                    [warmup])
    if opt_cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
    raise ValueError(f"config.optimizer.schedule={opt_cfg.schedule!r} is unknown; use constant|warmup_cosine")


def make_optimizer(opt_cfg: Any, labels: PyTree, total_steps: int, clip_norm: float | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with torch defaults (decoupled weight decay on every trainable param), optional global-norm
    clipping before it, and ``set_to_zero`` for frozen params (no update, no weight decay)."""
    schedule = make_schedule(opt_cfg, total_steps)
    parts = []
    if clip_norm is not None:
        if clip_norm <= 0:
            raise ValueError(f"config.train.clip_norm={clip_norm} must be positive")
        parts.append(optax.clip_by_global_norm(float(clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps),
                             weight_decay=float(opt_cfg.weight_decay)))
    tx = optax.multi_transform({TRAINABLE: optax.chain(*parts), FROZEN: optax.set_to_zero()}, labels)
    return tx, schedule


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """``model`` -> ``(graphdef, params as a pure dict, other state)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), rest


def logical_specs(abstract_model: nnx.Module) -> dict:
    """The params' logical ``PartitionSpec``s as a pure dict (same structure as ``split_model``'s params)."""
    return nnx.get_partition_spec(nnx.state(abstract_model, nnx.Param)).to_pure_dict()


def state_shardings(tx: optax.GradientTransformation, abstract_params: PyTree, params_sh: PyTree, mesh: Mesh,
                    with_teacher: bool) -> TrainState:
    """Shardings of the train state: optimizer moments follow their params, everything else replicated."""
    rep = shd.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    masked = optax.transforms.MaskedNode
    opt_sh = optax.tree_map_params(tx, lambda v, s: v if isinstance(v, masked) else s, abstract_opt, params_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, (NamedSharding, masked)))
    return TrainState(step=rep, params=params_sh, opt_state=opt_sh, rng=rep,
                      teacher=params_sh if with_teacher else None)


def new_state(params: PyTree, tx: optax.GradientTransformation, seed: int, with_teacher: bool) -> TrainState:
    """The state at step 0 (traceable: ``jax.jit`` or ``jax.eval_shape`` it). The teacher is a fresh copy of
    ``params`` (params are donated to the step, so they must not alias)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)),
                      teacher=jax.tree.map(jnp.copy, params) if with_teacher else None)


def init_state(params: PyTree, tx: optax.GradientTransformation, shardings: TrainState, seed: int,
               with_teacher: bool) -> TrainState:
    """Build the train state from start params already placed in their shardings (jitted, sharded outputs)."""
    return jax.jit(lambda p: new_state(p, tx, seed, with_teacher), out_shardings=shardings)(params)


def abstract_state(shapes: TrainState, shardings: TrainState) -> TrainState:
    """``ShapeDtypeStruct``s with shardings for the saved fields of ``shapes`` (a state or its
    ``jax.eval_shape``), the ``NOT_SAVED`` ones None: the restore target. ``shardings``: the same class."""
    shapes, shardings = shapes.without_unsaved(), shardings.without_unsaved()
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
