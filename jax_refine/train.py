"""The CLIP-Refine trainer: ``train(config)`` runs a config end to end.

In call order: ``train`` (the workdir, its lock and run record), ``_run`` (what the run reads, the trainer it builds,
the restore, the hooks, the loop, the export), then each of those. A step is ``jax_refine.step``'s jitted function;
after it the hooks of ``jax_refine.hooks`` run (preemption, metrics, checkpoints, evaluation).
"""
from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from jax_refine import checkpoint as ckpt
from jax_refine import config as config_lib
from jax_refine import distributed, failures, hf, hooks, objectives, outputs, preprocess, profiling
from jax_refine import sharding as shd
from jax_refine import step as step_lib
from jax_refine import train_state as ts
from jax_refine import workdir as workdir_lib
from jax_refine.console import log
from jax_refine.models import registry
from jax_refine.models.interface import Family

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------------ the run
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
    workdir = workdir_lib.check_workdir(config.workdir, contents=False)  # the one epath.Path of the workdir
    workdir_lib.check_bucket(workdir)
    if not distributed.is_main():  # process 0 alone holds the lock and writes the run record
        return _run(config, workdir, data_iter, mesh, return_state)
    workdir_lib.check_ours(workdir)  # not another tool's folder: before anything is written into it
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lib.locked(workdir):
        resuming = bool(ckpt.finished_steps(workdir / ckpt.CHECKPOINT_SUBDIR))
        record = workdir_lib.check_resume(workdir, config, resuming=resuming, allow_change=allow_config_change)
        return _run(config, workdir, data_iter, mesh, return_state, record)


def _run(config: Any, workdir: epath.Path, data_iter: Any, mesh: Mesh | None, return_state: bool,
         record: workdir_lib.RunRecord | None = None) -> dict[str, Any]:
    """The run in ``workdir``; ``record`` (process 0): the workdir's config record, checked against the data read
    and written once the state is restored or initialised."""
    inputs = open_inputs(config, data_iter)
    data_iter = inputs.data
    if record is not None:
        record.check_data(getattr(data_iter, "identity", None))
    trainer = build_trainer(config, mesh, run_length(config, data_iter), inputs.start)
    mngr, state = restore_or_init(trainer, workdir, data_iter)
    if record is not None:
        record.write()  # the restore it describes succeeded (a refused or failed one left the old record)
    start = int(jax.device_get(state.step))
    if distributed.is_main():
        _drop_metrics_after(workdir / "metrics.jsonl", start)

    writer = hooks.MetricWriter(workdir, bool(config.log.get("tensorboard", True)), distributed.is_main())
    preemption = hooks.Preemption(mngr)
    log_metrics = hooks.LogMetrics(writer, int(config.log.every_steps), trainer.total_steps, start)
    meta = ckpt.model_meta(trainer.setup.model, method=config.method.name, dtype=config.model.get("dtype", "float32"))
    eval_every = int(config.eval.get("every_steps", 0) or 0)
    # the step's checkpoint is saved before its evaluation (which may fail or take long), and at each one
    hook_list: list[hooks.Hook] = [preemption, log_metrics,
                                   hooks.SaveCheckpoint(mngr, int(config.checkpoint.every_steps), meta, eval_every)]
    if eval_every > 0:
        hook_list.append(hooks.Evaluate(config.eval, eval_every, trainer.setup.graphdef, trainer.setup.rest,
                                        trainer.mesh, writer, prep=inputs.prep, tasks=inputs.eval_tasks))
    hook_list.append(hooks.FlushMetrics(writer, int(config.checkpoint.every_steps)))
    guard = hooks.DivergenceGuard(float(config.train.get("divergence_factor", 0.0) or 0.0),
                                  int(config.train.get("divergence_window", 1) or 1), lr=float(config.optimizer.lr),
                                  grad_norm_factor=float(config.train.get("divergence_grad_norm_factor", 0.0) or 0.0))
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
        raise ckpt.disk_full_error(err, mngr.directory, ckpt.state_bytes(trainer.abstract_saved())) from None
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
    if preemption.preempted:
        log.info("%s: saved step %d and stopped", preemption.signal_name or "preemption notice", done)

    end = int(jax.device_get(state.step))
    hf_dir = None
    if not preemption.preempted and bool(config.train.get("export_hf", True)) and end > 0:
        model = nnx.merge(trainer.setup.graphdef, state.params, trainer.setup.rest)
        hf_dir = str(export_hf(model, workdir / "hf", tokenizer_dir=inputs.start.directory))
        log.info("exported step %d -> %s: %s", end, hf_dir, outputs.describe(workdir / "hf"))
    out = {"metrics": log_metrics.last, "steps": end, "preempted": preemption.preempted,
           "signal": preemption.signal_name, "workdir": str(workdir),
           "checkpoint_dir": str(workdir / ckpt.CHECKPOINT_SUBDIR), "hf_dir": hf_dir}
    return {**out, "state": state} if return_state else out


# ---------------------------------------------------------------------------------- what the run reads
@dataclasses.dataclass(frozen=True)
class StartModel:
    """``config.model`` resolved once: the family, its transformers config and the checkpoint directory the run
    starts from (None for a random init: no checkpoint, CLIP's packaged tokenizer)."""
    family: Family
    model_config: Any
    directory: Path | None

    def preprocessing(self) -> preprocess.Preprocessing:
        """The input preprocessing the model takes: its abstract model's interface attributes and the tokenizer
        of its checkpoint directory."""
        abstract = nnx.eval_shape(lambda: self.family.create(self.model_config))
        return registry.preprocessing(abstract, tokenizer_source=self.directory)


@dataclasses.dataclass
class Inputs:
    """What ``open_inputs`` opened: the start model, its preprocessing, the training data and the evaluation
    sets (``(zero-shot, retrieval)`` task lists, or None when the run does not evaluate)."""
    start: StartModel
    prep: preprocess.Preprocessing
    data: Any
    eval_tasks: tuple[list, list] | None


def open_inputs(config: Any, data_iter: Any = None) -> Inputs:
    """Everything the run will read, opened before anything is built: the start checkpoint and its tokenizer
    (with the random-init vocabulary checked against it), the training data (``make_data_iterator``, unless
    ``data_iter`` is given) and every evaluation set of ``config.eval`` when ``eval.every_steps`` > 0.

    Raises ``failures.MissingInputs`` with one line per piece that is missing or unreadable (all of them, not
    the first).
    """
    problems: list[str] = []
    start = prep = None
    try:
        start = start_model(config)
        prep = start.preprocessing()
        problem = vocab_problem(start, prep.get_tokenizer())
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
    return Inputs(start, prep, data_iter, tasks)


def start_model(config: Any) -> StartModel:
    """``config.model`` as a ``StartModel``: a random-init dict (its ``model_type`` picks the family, default CLIP)
    or the checkpoint at ``name_or_path`` (any registered family)."""
    init = config.model.get("random_init")
    if init is not None:
        init = init.to_dict() if hasattr(init, "to_dict") else dict(init)
        family = registry.family_of_config(init)
        return StartModel(family, family.config_from(init), None)
    directory = hf.resolve_checkpoint(config.model.name_or_path)
    family = registry.family_of(directory)
    return StartModel(family, family.config_from(directory), directory)


def model_preprocessing(config: Any) -> preprocess.Preprocessing:
    """The input preprocessing ``config.model`` takes (``start_model(config).preprocessing()``)."""
    return start_model(config).preprocessing()


def vocab_problem(start: StartModel, tokenizer: Any) -> str | None:
    """For a random-init text tower: a line when its ``vocab_size`` is below the tokenizer's ids (an id past
    the embedding table reads garbage: NaN at step 1), else None. A checkpoint ships its own tokenizer."""
    if start.directory is not None:
        return None
    vocab = getattr(getattr(start.model_config, "text_config", None), "vocab_size", None)
    ids = len(tokenizer)
    if vocab is not None and int(vocab) < ids:
        return (f"config.model.random_init.text_config.vocab_size={vocab} is smaller than the tokenizer's {ids} "
                f"token ids: set it to at least {ids}")
    return None


def make_data_iterator(config: Any, prep: preprocess.Preprocessing) -> Iterator:
    """This process's slice of the training data (the data package's resumable ``TrainIterator``), prepared
    as the model takes it (``prep``: ``StartModel.preprocessing``)."""
    from jax_refine import data  # imports TensorFlow: only when the config's own data is read

    return data.make_train_iterator(
        config.data, global_batch_size=int(config.train.batch_size), prep=prep, seed=int(config.seed),
        process_index=jax.process_index(), process_count=jax.process_count())


def run_length(config: Any, data_iter: Any) -> int:
    """The number of steps: ``config.train.num_steps``, else ``train.epochs`` passes over the data (its
    ``steps_per_epoch``)."""
    num_steps = config.train.get("num_steps")
    if num_steps is not None:
        return int(num_steps)
    per_epoch = getattr(data_iter, "steps_per_epoch", None)
    if per_epoch is None:
        raise ValueError("config.train.num_steps is not set and the data iterator has no steps_per_epoch")
    return int(per_epoch) * int(config.train.epochs)


# --------------------------------------------------------------------------------- what the run builds
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


def build_trainer(config: Any, mesh: Mesh | None = None, total_steps: int | None = None,
                  start: StartModel | None = None) -> Trainer:
    """Mesh, shardings, optimizer and the jitted step for ``config`` (no state yet); ``start``: the run's
    ``StartModel`` (default: ``start_model(config)``)."""
    objective = objectives.get_objective(config.method)
    mesh = mesh if mesh is not None else shd.make_mesh(config.mesh.shape)
    shd.check_batch_size(int(config.train.batch_size), mesh, int(config.train.grad_accum))
    setup = setup_model(config, mesh, start)
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


def setup_model(config: Any, mesh: Mesh, start: StartModel | None = None) -> step_lib.ModelSetup:
    """Build the model of any registered family abstractly (``nnx.eval_shape``), derive shardings from the
    logical names and ``config.mesh.rules``, and return a loader that creates/loads the start params into them.

    ``start`` (default: ``start_model(config)``): a random init (``config.model.random_init``, drawn with
    ``config.seed``) or the checkpoint at ``config.model.name_or_path`` (``registry.load``).
    """
    start = start if start is not None else start_model(config)
    dtype = compute_dtype(config)
    seed = int(config.seed)
    opts = model_options(config)

    def make():
        return start.family.create(start.model_config, seed=seed, dtype=dtype, **opts)

    abstract_model = nnx.eval_shape(make)
    graphdef, abstract_params, rest = ts.split_model(abstract_model)
    params_sh = shd.param_shardings(abstract_params, ts.logical_specs(abstract_model), mesh, config.mesh.rules)

    if start.directory is None:
        def load():
            return jax.jit(lambda: ts.split_model(make())[1], out_shardings=params_sh)()
    else:
        by_path = {ts.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_sh)}

        def load():
            model = registry.load(start.directory, dtype, shardings=by_path, **opts)  # resolved once, in start_model
            return ts.split_model(model)[1]
    return step_lib.ModelSetup(abstract_model, graphdef, rest, abstract_params, params_sh, load, dtype,
                               tuple(config.mesh.rules))


def compute_dtype(config: Any) -> Any:
    name = config.model.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype={name!r} is unknown; use float32|bfloat16")
    return DTYPES[name]


def model_options(config: Any) -> dict[str, Any]:
    """``config.model``'s speed/memory switches as model keyword arguments (defaults: xla, none, False)."""
    return {"attention": config.model.get("attention", "xla"), "remat": config.model.get("remat", "none"),
            "scan_layers": bool(config.model.get("scan_layers", False))}


def restore_or_init(trainer: Trainer, workdir: epath.Path, data_iter: Any
                    ) -> tuple[ocp.CheckpointManager, ts.TrainState]:
    """The run's checkpoint manager and its start state: the newest intact checkpoint of ``workdir`` (the
    teacher loaded again, ``data_iter`` set to the saved position), or the start weights when there is none."""
    config = trainer.config

    def make_manager(directory: epath.Path) -> ocp.CheckpointManager:
        return ckpt.make_manager(directory, max_to_keep=int(config.checkpoint.max_to_keep),
                                 async_save=bool(config.checkpoint.async_save))

    mngr, latest, saved, data_state = ckpt.restore_latest_good(workdir / ckpt.CHECKPOINT_SUBDIR,
                                                               trainer.abstract_saved(), make_manager)
    if latest is None:
        return mngr, trainer.init_state()
    teacher = trainer.teacher_from_start()
    state = saved.replace(teacher=None if teacher is None else jax.device_put(teacher, trainer.state_sh.teacher))
    data_iter.set_state(data_state)
    log.info("resumed from %s/%d", mngr.directory, latest)
    return mngr, state


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
        log.info("%s: dropped %d lines of steps after %d (redone now)", path, len(rows) - len(keep), step)


# --------------------------------------------------------------------------------------------- the loop
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
            profiling.describe_compiled(compiled, batch_size)
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


# ------------------------------------------------------------------------------------------- the export
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
