"""The CLIP-Refine trainer: one jitted, sharded train step and the loop around it.

``train(config) -> dict`` runs a config end to end: mesh, sharded model load, teacher copy, AdamW, Orbax
checkpoints (resume from the latest), metrics (tqdm, JSON lines, TensorBoard; process 0 only), SIGTERM
handling and the Hugging Face export to ``workdir/hf``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_refine import checkpoint as ckpt
from jax_refine import distributed, objectives
from jax_refine import sharding as shd
from jax_refine import train_state as ts

log = logging.getLogger(__name__)
PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BATCH_KEYS = ("image", "input_ids", "attention_mask")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; training stopped without saving the bad state."""


# ----------------------------------------------------------------------------------------- model set-up
@dataclasses.dataclass
class ModelSetup:
    clip_config: Any  # transformers.CLIPConfig
    graphdef: nnx.GraphDef
    rest: nnx.State  # non-Param model state (empty for CLIP)
    abstract_params: PyTree  # ShapeDtypeStructs (pure dict)
    param_shardings: PyTree
    load: Callable[[], PyTree]  # -> start params, each created/loaded directly into its sharding
    dtype: Any
    rules: Any = ()  # config.mesh.rules: also pins the model's activations (sharding.activation_sharding)


def compute_dtype(config: Any) -> Any:
    name = config.model.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype={name!r} is unknown; use float32|bfloat16")
    return DTYPES[name]


def model_options(config: Any) -> dict[str, Any]:
    """``config.model``'s speed/memory switches as ``CLIP`` keyword arguments (defaults: xla, none, False)."""
    return {"attention": config.model.get("attention", "xla"), "remat": config.model.get("remat", "none"),
            "scan_layers": bool(config.model.get("scan_layers", False))}


def setup_model(config: Any, mesh: Mesh) -> ModelSetup:
    """Build the model abstractly (``nnx.eval_shape``), derive shardings from the logical names and
    ``config.mesh.rules``, and return a loader that creates/loads the start params into them."""
    from jax_refine import hf, model as model_lib

    dtype = compute_dtype(config)
    clip_config = clip_config_of(config)
    random_init = config.model.get("random_init") is not None
    seed = int(config.seed)

    opts = model_options(config)

    def make():
        if random_init:
            return model_lib.create_clip(clip_config, seed=seed, dtype=dtype, **opts)
        return model_lib.CLIP(clip_config, dtype=dtype, rngs=nnx.Rngs(0), **opts)

    abstract_model = nnx.eval_shape(make)
    graphdef, abstract_params, rest = ts.split_model(abstract_model)
    params_sh = shd.param_shardings(abstract_params, ts.logical_specs(abstract_model), mesh, config.mesh.rules)

    if random_init:
        def load():
            return jax.jit(lambda: ts.split_model(make())[1], out_shardings=params_sh)()
    else:
        by_path = {ts.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_sh)}

        def load():
            model = hf.load_pretrained(config.model.name_or_path, dtype, shardings=by_path)
            return ts.split_model(model)[1]
    return ModelSetup(clip_config, graphdef, rest, abstract_params, params_sh, load, dtype, tuple(config.mesh.rules))


# ------------------------------------------------------------------------------------------ train step
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
                    ) -> Callable[[dict, dict, jax.Array], tuple[dict, dict]]:
    """The pure train step ``(state, batch, key) -> (state, metrics)`` (not yet jitted).

    batch: ``{"image": (B,H,W,3) f32, "input_ids": (B,L) i32, "attention_mask": (B,L) i32}`` global arrays.
    The RaFA reference z (B, D) is drawn here from ``key`` for the global batch, so it does not depend on
    the sharding. With ``grad_accum`` > 1 the batch is split into micro-batches (``lax.scan``) whose mean
    gradient is applied once; batch-coupled losses then see each micro-batch as its own batch.
    """
    from jax_refine import metrics

    objective = objectives.get_objective(method_cfg)
    method_cfg = objectives.resolve_method(method_cfg)  # the preset's weights, alpha, normalize filled in
    proj_dim = int(setup.clip_config.projection_dim)
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
        out = objectives.Outputs(fi, ft, gi, gt, z, params["logit_scale"], key)
        loss, parts = objective.fn(out, method_cfg)
        return loss, (parts, jax.lax.stop_gradient(fi), jax.lax.stop_gradient(ft))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: dict, batch: dict, key: jax.Array) -> tuple[dict, dict]:
        params, teacher = state["params"], state["teacher"]
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
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state, "rng": state["rng"], "teacher": teacher}
        out = {"loss": loss, **parts, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "modality_gap": metrics.modality_gap(fi, ft)}
        return new_state, out

    return step


def jit_train_step(step: Callable, state_sh: dict, mesh: Mesh) -> Callable:
    """``jax.jit`` with explicit shardings: state as ``state_sh`` (donated), batch over ('data','fsdp')."""
    rep = shd.replicated(mesh)
    batch_sh = {"image": shd.batch_sharding(mesh, 4), "input_ids": shd.batch_sharding(mesh, 2),
                "attention_mask": shd.batch_sharding(mesh, 2)}
    return jax.jit(step, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                   donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------- trainer
@dataclasses.dataclass
class Trainer:
    """Everything built from a config; ``state`` lives in the mesh's shardings."""
    config: Any
    mesh: Mesh
    setup: ModelSetup
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    labels: PyTree
    state_sh: dict
    step_fn: Callable  # jitted
    total_steps: int
    with_teacher: bool

    def abstract_saved(self) -> dict:
        return ts.abstract_state(self.state_sh, self.tx, self.setup.abstract_params)

    def init_state(self) -> dict:
        return ts.init_state(self.setup.load(), self.tx, self.state_sh, int(self.config.seed), self.with_teacher)

    def teacher_from_start(self) -> PyTree | None:
        """The frozen teacher: the start weights, loaded again (it is never checkpointed)."""
        return self.setup.load() if self.with_teacher else None

    def step_key(self, rng: np.ndarray, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(rng)), step)


def build_trainer(config: Any, mesh: Mesh | None = None, total_steps: int | None = None) -> Trainer:
    """Mesh, shardings, optimizer and the jitted step for ``config`` (no state yet)."""
    objective = objectives.get_objective(config.method)
    mesh = mesh if mesh is not None else shd.make_mesh(config.mesh.shape)
    shd.check_batch_size(int(config.train.batch_size), mesh, int(config.train.grad_accum))
    setup = setup_model(config, mesh)
    if objective.needs_reference:  # a bad RaFA prior fails here, not at the first step's trace
        jax.eval_shape(lambda: step_reference(jax.random.key(0), (2, int(setup.clip_config.projection_dim)),
                                              config.method))
    total_steps = int(total_steps if total_steps is not None else config.train.num_steps)
    frozen_extra = () if objective.uses_logit_scale else ("^logit_scale$",)
    labels = ts.freeze_labels(setup.abstract_params, tuple(config.train.get("freeze") or ()), frozen_extra)
    tx, schedule = ts.make_optimizer(config.optimizer, labels, total_steps, config.train.get("clip_norm"))
    state_sh = ts.state_shardings(tx, setup.abstract_params, setup.param_shardings, mesh, objective.needs_teacher)
    step = make_train_step(setup, config.method, tx, schedule, labels, mesh, int(config.train.grad_accum))
    return Trainer(config, mesh, setup, tx, schedule, labels, state_sh, jit_train_step(step, state_sh, mesh),
                   total_steps, objective.needs_teacher)


# ---------------------------------------------------------------------------------------------- logging
class MetricLogger:
    """tqdm bar, JSON lines and TensorBoard on process 0; silent elsewhere."""

    def __init__(self, workdir: Path, total: int, start: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.bar = self.jsonl = self.tb = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
        self.jsonl = open(workdir / "metrics.jsonl", "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        self.bar.set_postfix(loss=f"{values['loss']:.4g}", gap=f"{values.get('modality_gap', float('nan')):.3f}",
                             ex_s=f"{values.get('examples_per_sec', 0.0):.1f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        for obj in (self.bar, self.jsonl, self.tb):
            if obj is not None:
                obj.close()


def describe_compiled(compiled: Any, batch_size: int) -> dict[str, float]:
    """Print the compiled step's memory analysis and XLA cost-analysis FLOPs; returns the numbers."""
    info: dict[str, float] = {}
    try:
        mem = compiled.memory_analysis()
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                     "alias_size_in_bytes", "generated_code_size_in_bytes"):
            if hasattr(mem, name):
                info[name] = float(getattr(mem, name))
    except Exception as e:  # not every backend implements it
        log.warning("memory_analysis unavailable: %s", e)
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info["flops"] = float(cost.get("flops", float("nan")))
    except Exception as e:
        log.warning("cost_analysis unavailable: %s", e)
    if distributed.is_main():
        gib = 2.0**30
        parts = [f"{k.replace('_size_in_bytes', '')}={v / gib:.3f}GiB" for k, v in info.items() if "bytes" in k]
        flops = info.get("flops", float("nan"))
        print(f"[train] compiled step (per device): {' '.join(parts)}; flops={flops:.3e} "
              f"({flops / batch_size:.3e}/example)", flush=True)
    return info


# --------------------------------------------------------------------------------------------- the loop
class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and returns at the next step."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _host(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def clip_config_of(config: Any) -> Any:
    """The ``transformers.CLIPConfig`` of ``config.model`` (random-init dict or checkpoint's config.json)."""
    from jax_refine import hf

    init = config.model.get("random_init")
    if init is not None:
        return hf.clip_config_from(init.to_dict() if hasattr(init, "to_dict") else dict(init))
    return hf.clip_config_from(hf.resolve_checkpoint(config.model.name_or_path))


def make_data_iterator(config: Any, clip_config: Any) -> Iterator:
    """This process's slice of the training data (the data package's resumable ``TrainIterator``)."""
    from jax_refine import data

    return data.make_train_iterator(
        config.data, global_batch_size=int(config.train.batch_size),
        image_size=int(clip_config.vision_config.image_size),
        max_length=min(77, int(clip_config.text_config.max_position_embeddings)), seed=int(config.seed),
        process_index=jax.process_index(), process_count=jax.process_count())


def train(config: Any, *, data_iter: Any = None, mesh: Mesh | None = None, return_state: bool = False,
          allow_config_change: bool = False) -> dict[str, Any]:
    """Run ``config`` end to end; resumes from ``workdir/checkpoints`` when a checkpoint exists.

    ``data_iter``: optional iterator of per-host numpy batches with ``get_state``/``set_state`` (default:
    the data package's ``make_train_iterator(config)``). Returns the last logged metrics and the paths
    (``workdir``, ``checkpoint_dir``, ``hf_dir``), ``steps``, ``preempted`` (and ``state`` if ``return_state``).
    The workdir is locked for the run (``workdir.locked``); its resolved config is saved, and a resume with a
    changed config is refused unless ``allow_config_change`` (see ``jax_refine.workdir``).
    """
    from jax_refine import config as config_lib, workdir as workdir_lib

    distributed.initialize()
    config_lib.check_values(config)
    objectives.get_objective(config.method)
    workdir = Path(config.workdir).expanduser().absolute()
    if not distributed.is_main():
        return _train(config, workdir, data_iter, mesh, return_state)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lib.locked(workdir):
        ckpt_dir = workdir / ckpt.CHECKPOINT_SUBDIR
        resuming = ckpt_dir.is_dir() and any(d.name.isdigit() for d in ckpt_dir.iterdir())
        workdir_lib.record_config(workdir, config, resuming=resuming, allow_change=allow_config_change)
        return _train(config, workdir, data_iter, mesh, return_state)


def _drop_metrics_after(path: Path, step: int) -> None:
    """Remove ``metrics.jsonl`` lines of steps after ``step`` (a resume redoes them); counts them in the log."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if not ln.strip() or json.loads(ln).get("step", 0) <= step]
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
        print(f"[train] {path}: dropped {len(lines) - len(keep)} lines of steps after {step} (redone now)", flush=True)


def _train(config: Any, workdir: Path, data_iter: Any, mesh: Mesh | None, return_state: bool) -> dict[str, Any]:
    if data_iter is None:
        data_iter = make_data_iterator(config, clip_config_of(config))
    num_steps = config.train.get("num_steps")
    if num_steps is None:
        per_epoch = getattr(data_iter, "steps_per_epoch", None)
        if per_epoch is None:
            raise ValueError("config.train.num_steps is not set and the data iterator has no steps_per_epoch")
        num_steps = int(per_epoch) * int(config.train.epochs)
    trainer = build_trainer(config, mesh, int(num_steps))
    mesh = trainer.mesh
    def make_manager(directory: Path):
        return ckpt.make_manager(directory, max_to_keep=int(config.checkpoint.max_to_keep),
                                 async_save=bool(config.checkpoint.async_save))

    meta = {"clip_config": trainer.setup.clip_config.to_dict(), "method": config.method.name,
            "dtype": config.model.get("dtype", "float32")}
    mngr, latest, saved, data_state = ckpt.restore_latest_good(workdir / ckpt.CHECKPOINT_SUBDIR,
                                                               trainer.abstract_saved(), make_manager)
    if latest is not None:
        state = {**saved, "teacher": jax.device_put(trainer.teacher_from_start(), trainer.state_sh["teacher"])
                 if trainer.with_teacher else None}
        data_iter.set_state(data_state)
        if distributed.is_main():
            print(f"[train] resumed from {mngr.directory}/{latest}", flush=True)
    else:
        state = trainer.init_state()
    start = int(jax.device_get(state["step"]))
    if distributed.is_main():
        _drop_metrics_after(workdir / "metrics.jsonl", start)
    rng = np.asarray(jax.device_get(state["rng"]))
    batch_size = int(config.train.batch_size)
    logger = MetricLogger(workdir, trainer.total_steps, start, bool(config.log.get("tensorboard", True)),
                          distributed.is_main())
    every_log, every_ckpt = max(1, int(config.log.every_steps)), max(1, int(config.checkpoint.every_steps))
    compiled, last, preempted = None, {}, False
    pending: tuple[int, dict] | None = None  # (step, device metrics) checked one step late

    def check(step: int, metrics: Mapping[str, jax.Array]) -> dict[str, float]:
        values = _host(metrics)
        if not math.isfinite(values["loss"]):
            mngr.wait_until_finished()
            good = mngr.latest_step()
            raise NonFiniteLossError(f"non-finite loss ({values['loss']}) at step {step}; training stopped, the "
                                     f"last good checkpoint is step {good} in {mngr.directory}")
        return values

    try:
        with _Preemption() as preemption:
            t0, seen = time.perf_counter(), 0
            for step in range(start, trainer.total_steps):
                try:
                    local = next(data_iter)
                except StopIteration:
                    break
                batch = shd.host_to_global({k: local[k] for k in BATCH_KEYS}, mesh)
                if batch["image"].shape[0] != batch_size:
                    raise ValueError(f"the data iterator gave a global batch of {batch['image'].shape[0]}, "
                                     f"config.train.batch_size={batch_size}")
                key = trainer.step_key(rng, step)
                if compiled is None:
                    compiled = trainer.step_fn.lower(state, batch, key).compile()
                    describe_compiled(compiled, batch_size)
                state, metrics = compiled(state, batch, key)
                if pending is not None:
                    check(*pending)
                pending = (step + 1, metrics)
                seen += batch_size
                logger.advance()
                done = step + 1
                if done % every_log == 0 or done == trainer.total_steps:
                    values = check(*pending)
                    dt = time.perf_counter() - t0
                    values["examples_per_sec"] = seen / dt if dt > 0 else 0.0
                    if hasattr(data_iter, "stats"):  # skipped (bad image / no caption) counts, epoch
                        values.update({f"data/{k}": float(v) for k, v in data_iter.stats().items()})
                    t0, seen, last = time.perf_counter(), 0, values
                    logger.write(done, values)
                stop = preemption.flag if jax.process_count() == 1 else mngr.reached_preemption(done)
                if done % every_ckpt == 0 or done == trainer.total_steps or stop:
                    check(*pending)
                    ckpt.save(mngr, done, state, data_iter.get_state(), meta, force=True)
                if stop:
                    preempted = True
                    if distributed.is_main():
                        print(f"[train] SIGTERM: saved step {done} and stopped", flush=True)
                    break
            if pending is not None:
                check(*pending)
        mngr.wait_until_finished()
    finally:
        logger.close()
        mngr.close()
    end = int(jax.device_get(state["step"]))
    hf_dir = None
    if not preempted and bool(config.train.get("export_hf", True)) and end > 0:
        from jax_refine import hf

        model = nnx.merge(trainer.setup.graphdef, state["params"], trainer.setup.rest)
        hf_dir = str(hf.save_pretrained(model, workdir / "hf"))
    out = {"metrics": last, "steps": end, "preempted": preempted, "workdir": str(workdir),
           "checkpoint_dir": str(workdir / ckpt.CHECKPOINT_SUBDIR), "hf_dir": hf_dir}
    return {**out, "state": state} if return_state else out
