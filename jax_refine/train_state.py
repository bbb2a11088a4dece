"""Train state, optimizer and sharded initialisation.

The state is a plain dict (a pytree) with explicit shardings:
  ``{"step": int32 (), "params": student params, "opt_state": optax state, "rng": uint32 (2,) key data,
     "teacher": frozen start params or None}``
Params are the model's ``nnx.Param`` values as a pure nested dict (``nnx.State.to_pure_dict``); the model
is rebuilt inside the step with ``nnx.merge(graphdef, params)``. The teacher is a copy of the starting
weights; checkpoints leave it out (it is re-derived from the start weights on resume).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jax_refine import sharding as shd

PyTree = Any
TRAINABLE, FROZEN = "trainable", "frozen"


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
                    with_teacher: bool) -> dict:
    """Shardings of the train state: optimizer moments follow their params, everything else replicated."""
    rep = shd.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    masked = optax.transforms.MaskedNode
    opt_sh = optax.tree_map_params(tx, lambda v, s: v if isinstance(v, masked) else s, abstract_opt, params_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, (NamedSharding, masked)))
    return {"step": rep, "params": params_sh, "opt_state": opt_sh, "rng": rep,
            "teacher": params_sh if with_teacher else None}


def init_state(params: PyTree, tx: optax.GradientTransformation, shardings: dict, seed: int,
               with_teacher: bool) -> dict:
    """Build the train state from start params already placed in their shardings (jitted, sharded outputs).

    The teacher is a fresh copy of ``params`` (params are donated to the step, so they must not alias).
    """
    def make(p):
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p),
                "rng": jax.random.key_data(jax.random.key(seed)),
                "teacher": jax.tree.map(jnp.copy, p) if with_teacher else None}

    return jax.jit(make, out_shardings=shardings)(params)


def abstract_state(shardings: dict, tx: optax.GradientTransformation, abstract_params: PyTree) -> dict:
    """``ShapeDtypeStruct``s with shardings for the saved part of the state (restore targets)."""
    def sds(a, s):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    shapes = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p),
                                       "rng": jax.random.key_data(jax.random.key(0))}, abstract_params)
    return jax.tree.map(sds, shapes, {k: shardings[k] for k in shapes})
