"""The train step: a pure function ``(state, batch, key) -> (state, metrics)`` and its jitted, sharded form.

No I/O here: the model is rebuilt from ``ModelSetup`` inside the step, the loss is the method's objective
(``jax_refine.objectives``), the teacher forward runs inside the step, and gradient accumulation gives the
full batch's gradient exactly (two ``lax.scan`` passes over micro-batches around one whole-batch objective:
``make_train_step``). ``jax_refine.train`` builds the pieces and runs the loop.
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
# parameters the objective reads directly (not through the features): their gradient comes from the loss alone
LOSS_SIDE = ("logit_scale", "logit_bias")


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
    the sharding. ``grad_accum`` = k > 1 computes the same full-batch objective and gradient with the
    activations of only B/k examples alive at a time (GradCache, Gao et al. 2021):
      1. the student's and teacher's (B, D) features, micro-batch by micro-batch, no gradient kept;
      2. the objective on the whole batch, and its gradient w.r.t. those features and the loss-side
         parameters (logit scale, bias), once;
      3. each micro-batch's forward again, its slice of the feature gradient pulled back through it (vjp),
         the parameter gradients summed in fp32.
    It costs one more student forward per step (about 5/4 of the FLOPs at k = 1 with a teacher).
    """
    objective = objectives.get_objective(method_cfg)
    method_cfg = objectives.resolve_method(method_cfg)  # the preset's weights, alpha, normalize filled in
    proj_dim = int(setup.model.feature_dim)
    micro_sharding = NamedSharding(mesh, P(None, shd.BATCH_AXES))

    def trainable_only(params: PyTree, labs: PyTree = labels) -> PyTree:
        # frozen params get no gradient at all, so XLA drops their backward pass (e.g. a frozen tower)
        return jax.tree.map(lambda p, lab: p if lab == ts.TRAINABLE else jax.lax.stop_gradient(p), params, labs)

    def features(params: PyTree, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(setup.graphdef, params, setup.rest)
        with shd.activation_sharding(mesh, setup.rules):
            fi, ft = model(batch["image"], batch["input_ids"], batch["attention_mask"])
        return fi.astype(jnp.float32), ft.astype(jnp.float32)

    def teacher_features(teacher: PyTree | None, batch: Mapping[str, jax.Array]) -> tuple[Any, Any]:
        if not objective.needs_teacher:
            return None, None
        return jax.lax.stop_gradient(features(teacher, batch))

    def objective_fn(params: PyTree, teacher: PyTree | None, fi: jax.Array, ft: jax.Array, gi: Any, gt: Any,
                     z: jax.Array | None, key: jax.Array) -> tuple[jax.Array, dict]:
        """The method's loss on whole-batch (B, D) features; ``params`` needs only the loss-side entries."""
        out = objectives.Outputs(fi, ft, gi, gt, z, params["logit_scale"], key, params.get("logit_bias"),
                                 None if teacher is None else teacher["logit_scale"])  # feature_scale="teacher"
        return objective.fn(out, method_cfg)

    def loss_fn(params, teacher, batch, z, key):
        params = trainable_only(params)
        fi, ft = features(params, batch)
        gi, gt = teacher_features(teacher, batch)
        loss, parts = objective_fn(params, teacher, fi, ft, gi, gt, z, key)
        return loss, (parts, jax.lax.stop_gradient(fi), jax.lax.stop_gradient(ft))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def split(x: jax.Array) -> jax.Array:
        """(B, ...) -> (k, B/k, ...), each micro-batch spread over every batch device."""
        return jax.lax.with_sharding_constraint(_split_micro(x, grad_accum), micro_sharding)

    def accumulated_grad(params, teacher, batch, z, key):
        """``grad_fn``'s result for the whole batch, with one micro-batch's activations alive at a time."""
        micro = jax.tree.map(split, batch)

        def forward(_, mb):  # pass 1: features only; nothing is differentiated, so no activations are kept
            return None, (features(params, mb), teacher_features(teacher, mb))

        _, ((fis, fts), (gis, gts)) = jax.lax.scan(forward, None, micro)
        fi, ft, gi, gt = (None if x is None else _merge_micro(x) for x in (fis, fts, gis, gts))
        # the loss-side parameters (logit scale, bias) enter the objective only, and so are counted once
        names = [n for n in LOSS_SIDE if n in params]
        loss_side = trainable_only({n: params[n] for n in names}, {n: labels[n] for n in names})
        (loss, parts), (g_side, d_fi, d_ft) = jax.value_and_grad(
            lambda side, a, b: objective_fn(side, teacher, a, b, gi, gt, z, key), argnums=(0, 1, 2),
            has_aux=True)(loss_side, fi, ft)

        def backward(acc, xs):  # pass 2: the micro-batch's forward again, and its feature gradient pulled back
            mb, cot = xs
            _, pull = jax.vjp(lambda p: features(trainable_only(p), mb), params)
            (g,) = pull(cot)
            return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        grads, _ = jax.lax.scan(backward, zeros, (micro, (split(d_fi), split(d_ft))))
        grads = {**grads, **{n: grads[n] + g_side[n] for n in g_side}}
        return (loss, (parts, fi, ft)), grads

    def step(state: ts.TrainState, batch: dict, key: jax.Array) -> tuple[ts.TrainState, dict]:
        params, teacher = state.params, state.teacher
        batch = {k: batch[k] for k in BATCH_KEYS}
        b = batch["image"].shape[0]
        k_loss = jax.random.fold_in(key, 1)  # the same key (m2-mix) whatever grad_accum is
        z = step_reference(key, (b, proj_dim), method_cfg) if objective.needs_reference else None
        value_and_grad = grad_fn if grad_accum == 1 else accumulated_grad
        (loss, (parts, fi, ft)), grads = value_and_grad(params, teacher, batch, z, k_loss)
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
