"""The CLIP-Refine trainer: builds the model, optimizer and jitted step from a config and runs the loop.

``train(config) -> dict`` runs a config end to end: mesh, sharded model load, teacher copy, AdamW, Orbax
checkpoints (resume from the latest), then ``run_loop``: each step calls the step function
(``jax_refine.step``) and then the hooks (``jax_refine.hooks``: preemption, metrics, evaluation every
``config.eval.every_steps``, checkpoints), then the Hugging Face export to ``workdir/hf``.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from jax_refine import checkpoint as ckpt
from jax_refine import config as config_lib
from jax_refine import distributed, failures, hf, hooks, objectives, outputs, preprocess
from jax_refine import sharding as shd
from jax_refine import step as step_lib
from jax_refine import train_state as ts
from jax_refine import workdir as workdir_lib
from jax_refine.models import registry
from jax_refine.models.interface import Family

log = logging.getLogger(__name__)
PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------- model set-up
def compute_dtype(config: Any) -> Any:
    name = config.model.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype={name!r} is unknown; use float32|bfloat16")
    return DTYPES[name]


def model_options(config: Any) -> dict[str, Any]:
    """``config.model``'s speed/memory switches as model keyword arguments (defaults: xla, none, False)."""
    return {"attention": config.model.get("attention", "xla"), "remat": config.model.get("remat", "none"),
            "scan_layers": bool(config.model.get("scan_layers", False))}


def model_preprocessing(config: Any) -> preprocess.Preprocessing:
    """The input preprocessing ``config.model`` takes (its abstract model's interface attributes; the tokenizer
    from its checkpoint directory, CLIP's packaged BPE for a random-init CLIP)."""
    family, model_config = model_config_of(config)
    return registry.preprocessing(nnx.eval_shape(lambda: family.create(model_config)),
                                  tokenizer_source=_start_checkpoint_dir(config))


def setup_model(config: Any, mesh: Mesh) -> step_lib.ModelSetup:
    """Build the model of any registered family abstractly (``nnx.eval_shape``), derive shardings from the
    logical names and ``config.mesh.rules``, and return a loader that creates/loads the start params into them.

    ``config.model.random_init``: a transformers config dict (its ``model_type`` picks the family, default
    CLIP) drawn at random; else ``config.model.name_or_path``: a checkpoint of any family (``registry.load``).
    """
    dtype = compute_dtype(config)
    family, model_config = model_config_of(config)
    random_init = config.model.get("random_init") is not None
    seed = int(config.seed)
    opts = model_options(config)

    def make():
        return family.create(model_config, seed=seed, dtype=dtype, **opts)

    abstract_model = nnx.eval_shape(make)
    graphdef, abstract_params, rest = ts.split_model(abstract_model)
    params_sh = shd.param_shardings(abstract_params, ts.logical_specs(abstract_model), mesh, config.mesh.rules)

    if random_init:
        def load():
            return jax.jit(lambda: ts.split_model(make())[1], out_shardings=params_sh)()
    else:
        by_path = {ts.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_sh)}

        def load():
            model = registry.load(config.model.name_or_path, dtype, shardings=by_path, **opts)
            return ts.split_model(model)[1]
    return step_lib.ModelSetup(abstract_model, graphdef, rest, abstract_params, params_sh, load, dtype,
                               tuple(config.mesh.rules))


# ---------------------------------------------------------------------------------------------- trainer
@dataclasses.dataclass
class Trainer:
    """Everything built from a config; ``state`` lives in the mesh's shardings."""
    config: Any
    mesh: Mesh
    setup: step_lib.ModelSetup
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    labels: PyTree
    state_sh: ts.TrainState
    step_fn: Callable  # jitted
    total_steps: int
    with_teacher: bool

    def abstract_saved(self) -> ts.TrainState:
        """The restore target: the saved fields as sharded ``ShapeDtypeStruct``s (teacher None)."""
        shapes = jax.eval_shape(lambda p: ts.new_state(p, self.tx, 0, False), self.setup.abstract_params)
        return ts.abstract_state(shapes, self.state_sh)

    def init_state(self) -> ts.TrainState:
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
        jax.eval_shape(lambda: step_lib.step_reference(jax.random.key(0), (2, int(setup.model.feature_dim)),
                                              config.method))
    total_steps = int(total_steps if total_steps is not None else config.train.num_steps)
    labels = ts.freeze_labels(setup.abstract_params, tuple(config.train.get("freeze") or ()), objective.frozen)
    tx, schedule = ts.make_optimizer(config.optimizer, labels, total_steps, config.train.get("clip_norm"))
    state_sh = ts.state_shardings(tx, setup.abstract_params, setup.param_shardings, mesh, objective.needs_teacher)
    step = step_lib.make_train_step(setup, config.method, tx, schedule, labels, mesh, int(config.train.grad_accum))
    return Trainer(config, mesh, setup, tx, schedule, labels, state_sh, step_lib.jit_train_step(step, state_sh, mesh),
                   total_steps, objective.needs_teacher)


def describe_compiled(compiled: Any, batch_size: int) -> dict[str, float]:
    """Print the compiled step's memory analysis and XLA cost-analysis FLOPs; returns the numbers."""
    info: dict[str, float] = {}
    try:
        mem = compiled.memory_analysis()
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                     "alias_size_in_bytes", "generated_code_size_in_bytes"):
            if hasattr(mem, name):
                info[name] = float(getattr(mem, name))
    except (NotImplementedError, RuntimeError, AttributeError) as e:  # not every backend implements it
        log.warning("memory_analysis unavailable: %s", e)
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info["flops"] = float(cost.get("flops", float("nan")))
    except (NotImplementedError, RuntimeError, AttributeError, TypeError) as e:
        log.warning("cost_analysis unavailable: %s", e)
    if distributed.is_main():
        gib = 2.0**30
        parts = [f"{k.replace('_size_in_bytes', '')}={v / gib:.3f}GiB" for k, v in info.items() if "bytes" in k]
        flops = info.get("flops", float("nan"))
        print(f"[train] compiled step (per device): {' '.join(parts)}; flops={flops:.3e} "
              f"({flops / batch_size:.3e}/example)", flush=True)
    return info


# --------------------------------------------------------------------------------------------- the loop
def model_config_of(config: Any) -> tuple[Family, Any]:
    """The family and transformers config of ``config.model`` (a random-init dict, whose ``model_type`` picks
    the family, default CLIP; or the checkpoint at ``name_or_path``, any registered family)."""
    init = config.model.get("random_init")
    if init is not None:
        init = init.to_dict() if hasattr(init, "to_dict") else dict(init)
        family = registry.family_of_config(init)
        return family, family.config_from(init)
    directory = hf.resolve_checkpoint(config.model.name_or_path)
    family = registry.family_of(directory)
    return family, family.config_from(directory)


def vocab_problem(config: Any, tokenizer: Any) -> str | None:
    """For a random-init text tower: a line when its ``vocab_size`` is below the tokenizer's ids (an id past
    the embedding table reads garbage: NaN at step 1), else None. A checkpoint ships its own tokenizer."""
    if config.model.get("random_init") is None:
        return None
    _, model_config = model_config_of(config)
    vocab = getattr(getattr(model_config, "text_config", None), "vocab_size", None)
    ids = len(tokenizer)
    if vocab is not None and int(vocab) < ids:
        return (f"config.model.random_init.text_config.vocab_size={vocab} is smaller than the tokenizer's {ids} "
                f"token ids: set it to at least {ids}")
    return None


def open_inputs(config: Any, data_iter: Any = None
                ) -> tuple[preprocess.Preprocessing, Any, tuple[list, list] | None]:
    """Everything the run will read, opened before anything is built: the start checkpoint and its tokenizer
    (with the random-init vocabulary checked against it), the training data (``make_data_iterator``, unless
    ``data_iter`` is given) and every evaluation set of ``config.eval`` when ``eval.every_steps`` > 0.

    Returns ``(preprocessing, data iterator, eval tasks or None)``; raises ``failures.MissingInputs`` with one
    line per piece that is missing or unreadable (all of them, not the first).
    """
    problems: list[str] = []
    prep = None
    try:
        prep = model_preprocessing(config)
        problem = vocab_problem(config, prep.get_tokenizer())
        if problem:
            problems.append(problem)
    except (ValueError, OSError) as e:  # the checkpoint's or tokenizer's own one-line errors
        where = "random_init" if config.model.get("random_init") is not None else \
            f"name_or_path={config.model.name_or_path!r}"
        problems.append(f"start checkpoint / tokenizer (config.model.{where}): {failures.first_line(e)}")
    if data_iter is None:
        try:  # without the model's preprocessing (unreadable above) CLIP's still finds the data's own faults
            data_iter = make_data_iterator(config, prep or preprocess.Preprocessing())
        except (ValueError, OSError) as e:
            problems.append(f"training data (config.data.source={config.data.source!r}): {failures.first_line(e)}")
    tasks = None
    every = int(config.eval.get("every_steps", 0) or 0)
    if every > 0:
        eval_config = {**config.eval.to_dict(), "cache_dir": None}
        tasks, eval_problems = hooks.load_eval_sets(eval_config)
        problems += [f"{line} (eval.every_steps={every})" for line in eval_problems]
    if problems:
        raise failures.MissingInputs(problems)
    return prep, data_iter, tasks


def make_data_iterator(config: Any, prep: preprocess.Preprocessing) -> Iterator:
    """This process's slice of the training data (the data package's resumable ``TrainIterator``), prepared
    as the model takes it (``prep``: ``model_preprocessing(config)``)."""
    from jax_refine import data  # imports TensorFlow: only when the config's own data is read

    return data.make_train_iterator(
        config.data, global_batch_size=int(config.train.batch_size), prep=prep, seed=int(config.seed),
        process_index=jax.process_index(), process_count=jax.process_count())


def train(config: Any, *, data_iter: Any = None, mesh: Mesh | None = None, return_state: bool = False,
          allow_config_change: bool = False) -> dict[str, Any]:
    """Run ``config`` end to end; resumes from ``workdir/checkpoints`` when a checkpoint exists.

    ``data_iter``: optional iterator of per-host numpy batches with ``get_state``/``set_state`` (default:
    the data package's ``make_train_iterator(config)``). Returns the last logged metrics and the paths
    (``workdir``, ``checkpoint_dir``, ``hf_dir``), ``steps``, ``preempted`` (and ``state`` if ``return_state``).
    The workdir is locked for the run (``workdir.locked``); its resolved config is saved, and a resume with a
    changed config is refused unless ``allow_config_change`` (see ``jax_refine.workdir``). ``config.workdir``
    may be a ``gs://`` URL: every workdir file goes through ``etils.epath`` (as Orbax's do).
    """
    distributed.initialize()
    config_lib.check_values(config)
    objectives.get_objective(config.method)
    workdir = workdir_lib.check_workdir(config.workdir, contents=False)
    workdir_lib.check_bucket(workdir)
    if not distributed.is_main():
        return _train(config, workdir, data_iter, mesh, return_state)
    workdir_lib.check_workdir(config.workdir)  # not another tool's folder: before anything is written into it
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lib.locked(workdir):
        ckpt_dir = workdir / ckpt.CHECKPOINT_SUBDIR
        # in a bucket a step dir exists from the start of its save: only a committed one (marker) is a resume
        remote = workdir_lib.is_remote(workdir)
        resuming = ckpt_dir.is_dir() and any(
            d.name.isdigit() and (not remote or (d / "commit_success.txt").exists()) for d in ckpt_dir.iterdir())
        record = workdir_lib.check_resume(workdir, config, resuming=resuming, allow_change=allow_config_change)
        return _train(config, workdir, data_iter, mesh, return_state, record)


def _drop_metrics_after(path: epath.Path, step: int) -> None:
    """Remove ``metrics.jsonl`` lines of steps after ``step`` (a resume redoes them); counts them in the log.
    A torn last line (a crash mid-append) is cut with a warning (``hooks.metric_rows``)."""
    if not path.is_file():
        return
    text = path.read_text()
    rows = hooks.metric_rows(path, text)
    keep = [ln for ln, row in rows if row.get("step", 0) <= step]
    if len(keep) != len(rows) or "".join(keep) != text:
        workdir_lib.write_text_atomic(path, "".join(keep))
    if len(keep) != len(rows):
        print(f"[train] {path}: dropped {len(rows) - len(keep)} lines of steps after {step} (redone now)", flush=True)


def export_hf(model: nnx.Module, out: epath.Path, tokenizer_dir: Any = None, overwrite: bool = False) -> epath.Path:
    """``registry.save(model, out, tokenizer_dir=, overwrite=)``; for a bucket ``out``, written to a local
    directory first and then uploaded file by file, ``config.json`` last (a reader that finds it finds the weights;
    same-named files are replaced). Not atomic in a bucket: a cut-short upload leaves some files, and a rerun
    replaces them. All processes call it."""
    if not workdir_lib.is_remote(out):
        return epath.Path(registry.save(model, out, tokenizer_dir=tokenizer_dir, overwrite=overwrite))
    with tempfile.TemporaryDirectory(prefix="jax_refine-export-") as local:
        staged = registry.save(model, Path(local) / "hf", tokenizer_dir=tokenizer_dir)
        if distributed.is_main():
            workdir_lib.upload_tree(staged, out, last=("config.json",))
    return out


def run_loop(trainer: Trainer, state: ts.TrainState, data_iter: Iterator, checkpoints: Any, start: int,
             hook_list: Sequence[hooks.Hook], guard: hooks.DivergenceGuard | None = None
             ) -> tuple[ts.TrainState, int]:
    """Steps ``start`` .. ``trainer.total_steps`` (fewer if the data ends or a hook stops the loop); after each
    step the hooks run in order. Each step's loss and gradient norm are checked (``guard``; None: a non-finite
    loss only) one step late (the host does not wait for the device), or earlier when a hook reads them (a
    checkpoint save does, first), the last one at the end. Returns the final state and the number of steps done."""
    rng = np.asarray(jax.device_get(state.rng))
    batch_size = int(trainer.config.train.batch_size)
    compiled, ctx = None, None
    for step in range(start, trainer.total_steps):
        try:
            local = next(data_iter)
        except StopIteration:
            break
        batch = shd.host_to_global({k: local[k] for k in step_lib.BATCH_KEYS}, trainer.mesh)
        if batch["image"].shape[0] != batch_size:
            raise ValueError(f"the data iterator gave a global batch of {batch['image'].shape[0]}, "
                             f"config.train.batch_size={batch_size}")
        key = trainer.step_key(rng, step)
        if compiled is None:
            compiled = trainer.step_fn.lower(state, batch, key).compile()
            describe_compiled(compiled, batch_size)
        state, metrics = compiled(state, batch, key)
        if ctx is not None:
            ctx.values()
        ctx = hooks.StepContext(step + 1, trainer.total_steps, state, metrics, data_iter, checkpoints, batch_size,
                                guard=guard)
        for hook in hook_list:
            hook(ctx)
        if ctx.stop:
            break
    if ctx is not None:
        ctx.values()
    return state, start if ctx is None else ctx.step


def _train(config: Any, workdir: epath.Path, data_iter: Any, mesh: Mesh | None, return_state: bool,
           record: workdir_lib.RunRecord | None = None) -> dict[str, Any]:
    """The run; ``record`` (process 0): the workdir's config record, checked against the data read and written
    once the state is restored or initialised."""
    prep, data_iter, eval_tasks = open_inputs(config, data_iter)
    if record is not None:
        record.check_data(getattr(data_iter, "identity", None))
    num_steps = config.train.get("num_steps")
    if num_steps is None:
        per_epoch = getattr(data_iter, "steps_per_epoch", None)
        if per_epoch is None:
            raise ValueError("config.train.num_steps is not set and the data iterator has no steps_per_epoch")
        num_steps = int(per_epoch) * int(config.train.epochs)
    trainer = build_trainer(config, mesh, int(num_steps))

    def make_manager(directory: epath.Path):
        return ckpt.make_manager(directory, max_to_keep=int(config.checkpoint.max_to_keep),
                                 async_save=bool(config.checkpoint.async_save))

    meta = {**ckpt.model_meta(trainer.setup.model), "method": config.method.name,
            "dtype": config.model.get("dtype", "float32")}
    mngr, latest, saved, data_state = ckpt.restore_latest_good(workdir / ckpt.CHECKPOINT_SUBDIR,
                                                               trainer.abstract_saved(), make_manager)
    if latest is not None:
        teacher = trainer.teacher_from_start()
        state = saved.replace(teacher=None if teacher is None else jax.device_put(teacher, trainer.state_sh.teacher))
        data_iter.set_state(data_state)
        if distributed.is_main():
            print(f"[train] resumed from {mngr.directory}/{latest}", flush=True)
    else:
        state = trainer.init_state()
    if record is not None:
        record.write()  # the restore it describes succeeded (a refused or failed one left the old record)
    start = int(jax.device_get(state.step))
    if distributed.is_main():
        _drop_metrics_after(workdir / "metrics.jsonl", start)

    writer = hooks.MetricWriter(workdir, bool(config.log.get("tensorboard", True)), distributed.is_main())
    preemption = hooks.Preemption(mngr)
    log_metrics = hooks.LogMetrics(writer, int(config.log.every_steps), trainer.total_steps, start)
    eval_every = int(config.eval.get("every_steps", 0) or 0)
    # the step's checkpoint is saved before its evaluation (which may fail or take long), and at each one
    hook_list: list[hooks.Hook] = [preemption, log_metrics,
                                   hooks.SaveCheckpoint(mngr, int(config.checkpoint.every_steps), meta, eval_every)]
    if eval_every > 0:
        hook_list.append(hooks.Evaluate(config.eval, eval_every, trainer.setup.graphdef, trainer.setup.rest,
                                        trainer.mesh, writer, prep=prep, tasks=eval_tasks))
    hook_list.append(hooks.FlushMetrics(writer, int(config.checkpoint.every_steps)))
    guard = hooks.DivergenceGuard(float(config.train.get("divergence_factor", 0.0) or 0.0),
                                  int(config.train.get("divergence_window", 1) or 1), lr=float(config.optimizer.lr))
    ckpt.quiet_disk_full_logs()
    failed = False
    try:
        with preemption:  # over the last save too: a second Ctrl-C while it is written still stops at once
            state, done = run_loop(trainer, state, data_iter, mngr, start, hook_list, guard)
            mngr.wait_until_finished()
    except Exception as err:
        failed = True
        if not ckpt.is_disk_full(err):
            raise
        raise ckpt.disk_full_error(err, mngr.directory, ckpt.state_bytes(trainer.abstract_saved()),
                                   _newest_finished(mngr)) from None
    finally:
        for hook in hook_list:
            if hasattr(hook, "close"):
                hook.close()
        for close in (writer.close, mngr.close):
            try:
                close()
            except Exception:  # a failed write raises again here (a full disk): the error in flight says it
                if not failed:
                    raise
        if hasattr(data_iter, "close"):  # its tf.data threads end with the run, however it ends
            data_iter.close()
    if preemption.preempted and distributed.is_main():
        print(f"[train] {preemption.signal_name or 'preemption notice'}: saved step {done} and stopped", flush=True)
    end = int(jax.device_get(state.step))
    hf_dir = None
    if not preemption.preempted and bool(config.train.get("export_hf", True)) and end > 0:
        model = nnx.merge(trainer.setup.graphdef, state.params, trainer.setup.rest)
        hf_dir = str(export_hf(model, workdir / "hf", tokenizer_dir=_start_checkpoint_dir(config)))
        if distributed.is_main():
            print(f"[train] exported step {end} -> {hf_dir}: {outputs.describe(workdir / 'hf')}", flush=True)
    out = {"metrics": log_metrics.last, "steps": end, "preempted": preemption.preempted,
           "signal": preemption.signal_name, "workdir": str(workdir),
           "checkpoint_dir": str(workdir / ckpt.CHECKPOINT_SUBDIR), "hf_dir": hf_dir}
    return {**out, "state": state} if return_state else out


def _newest_finished(mngr: Any) -> int | None:
    """The newest step of ``mngr`` on disk under its final name (a failed save's step is not one)."""
    directory = workdir_lib.as_path(mngr.directory)
    steps = [int(d.name) for d in directory.iterdir() if d.name.isdigit()] if directory.is_dir() else []
    return max(steps, default=None)


def _start_checkpoint_dir(config: Any) -> Path | None:
    """The directory of the start checkpoint (its tokenizer files go into the export); None for a random init."""
    if config.model.get("random_init") is not None:
        return None
    return hf.resolve_checkpoint(config.model.name_or_path)
