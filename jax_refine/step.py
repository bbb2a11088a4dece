"""The train step: a pure function ``(state, batch, key) -> (state, metrics)`` and its jitted, sharded form.

No I/O here: the model is rebuilt from ``ModelSetup`` inside the step, the loss is the method's objective
(``jax_refine.objectives``), the teacher forward runs inside the step, and gradient accumulation is a
``lax.scan`` over micro-batches. ``jax_refine.train`` builds the pieces and runs the loop.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_refine import metrics, objectives
from jax_refine import sharding as shd
from jax_refine import train_state as ts

PyTree = Any
BATCH_KEYS = ("image", "input_ids", "attention_mask")


@dataclasses.dataclass
class ModelSetup:
    """The model as the step needs it: graph, abstract params and their shardings, and a start-params loader."""
    model: Any  # the abstract model (jax_refine.models.interface.Model: feature_dim, image_size, config, ...)
    graphdef: nnx.GraphDef
    rest: nnx.State  # non-Param model state (empty for CLIP)
    abstract_params: PyTree  # ShapeDtypeStructs (pure dict)
    param_shardings: PyTree
    load: Callable[[], PyTree]  # -> start params, each created/loaded directly into its sharding
    dtype: Any
    rules: Any = ()  # config.mesh.rules: also pins the model's activations (sharding.activation_sharding)


def _split_micro(x: jax.Array, n: int) -> jax.Array:
    """(B, ...) -> (n, B/n, ...); micro-batch i holds rows i, i+n, i+2n, ... (spread over all devices)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


def _merge_micro(x: jax.Array) -> jax.Array:
    """Inverse of ``_split_micro``: (n, B/n, ...) -> (B, ...)."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def step_reference(key: jax.Array, shape: tuple[int, int], method_cfg: Any) -> jax.Array:
    """The RaFA reference z (B, D) the step draws from its ``key`` (for the whole global batch)."""
    return objectives.reference(jax.random.fold_in(key, 0), shape, method_cfg)


def make_train_step(setup: ModelSetup, method_cfg: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, labels: PyTree, mesh: Mesh, grad_accum: int = 1
                    ) -> Callable[[ts.TrainState, dict, jax.Array], tuple[ts.TrainState, dict]]:
    """The pure train step ``(state, batch, key) -> (state, metrics)`` (not yet jitted).

    batch: ``{"image": (B,H,W,3) f32, "input_ids": (B,L) i32, "attention_mask": (B,L) i32}`` global arrays.
    The RaFA reference z (B, D) is drawn here from ``key`` for the global batch, so it does not depend on
    the sharding. With ``grad_accum`` > 1 the batch is split into micro-batches (``lax.scan``) whose mean
    gradient is applied once; batch-coupled losses then see each micro-batch as its own batch.
    """
    objective = objectives.get_objective(method_cfg)
    method_cfg = objectives.resolve_method(method_cfg)  # the preset's weights, alpha, normalize filled in
    proj_dim = int(setup.model.feature_dim)
    micro_sharding = NamedSharding(mesh, P(None, shd.BATCH_AXES))

    def features(params: PyTree, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(setup.graphdef, params, setup.rest)
        with shd.activation_sharding(mesh, setup.rules):
            fi, ft = model(batch["image"], batch["input_ids"], batch["attention_mask"])
        return fi.astype(jnp.float32), ft.astype(jnp.float32)

    def loss_fn(params, teacher, batch, z, key):
        # frozen params get no gradient at all, so XLA drops their backward pass (e.g. a frozen tower)
        params = jax.tree.map(lambda p, lab: p if lab == ts.TRAINABLE else jax.lax.stop_gradient(p), params, labels)
        fi, ft = features(params, batch)
        gi = gt = None
        if objective.needs_teacher:
            gi, gt = jax.lax.stop_gradient(features(teacher, batch))
        out = objectives.Outputs(fi, ft, gi, gt, z, params["logit_scale"], key, params.get("logit_bias"),
                                 None if teacher is None else teacher["logit_scale"])
        loss, parts = objective.fn(out, method_cfg)
        return loss, (parts, jax.lax.stop_gradient(fi), jax.lax.stop_gradient(ft))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: ts.TrainState, batch: dict, key: jax.Array) -> tuple[ts.TrainState, dict]:
        params, teacher = state.params, state.teacher
        batch = {k: batch[k] for k in BATCH_KEYS}
        b = batch["image"].shape[0]
        k_loss = jax.random.fold_in(key, 1)
        z = step_reference(key, (b, proj_dim), method_cfg) if objective.needs_reference else None
        if grad_accum == 1:
            (loss, (parts, fi, ft)), grads = grad_fn(params, teacher, batch, z, k_loss)
        else:
            micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                _split_micro(x, grad_accum), micro_sharding), (batch, z))
            keys = jax.random.split(k_loss, grad_accum)

            def body(acc, xs):
                (mb, mz), k = xs
                (l, (pa, f_i, f_t)), g = grad_fn(params, teacher, mb, mz, k)
                acc = jax.tree.map(jnp.add, acc, (g, l, pa))
                return acc, (f_i, f_t)

            zero_parts = jax.eval_shape(lambda: loss_fn(params, teacher, jax.tree.map(lambda x: x[0], micro[0]),
                                                        None if z is None else micro[1][0], keys[0])[1][0])
            init = jax.tree.map(jnp.zeros_like, (params, jnp.zeros((), jnp.float32), zero_parts))
            (grads, loss, parts), (fis, fts) = jax.lax.scan(body, init, (micro, keys))
            grads, loss, parts = jax.tree.map(lambda x: x / grad_accum, (grads, loss, parts))
            fi, ft = _merge_micro(fis), _merge_micro(fts)
        trainable = jax.tree.map(lambda g, lab: g if lab == ts.TRAINABLE else None, grads, labels)
        grad_norm = optax.global_norm(trainable)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        # replace() keeps the fields a TrainState subclass adds
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(params, updates),
                                  opt_state=opt_state)
        out = {"loss": loss, **parts, "grad_norm": grad_norm, "lr": schedule(state.step),
               "modality_gap": metrics.modality_gap(fi, ft)}
        return new_state, out

    return step


def jit_train_step(step: Callable, state_sh: ts.TrainState, mesh: Mesh) -> Callable:
    """``jax.jit`` with explicit shardings: state as ``state_sh`` (donated), batch over ('data','fsdp')."""
    rep = shd.replicated(mesh)
    batch_sh = {"image": shd.batch_sharding(mesh, 4), "input_ids": shd.batch_sharding(mesh, 2),
                "attention_mask": shd.batch_sharding(mesh, 2)}
    return jax.jit(step, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                   donate_argnums=(0,))
