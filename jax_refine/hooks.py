"""What the training loop does after each step, as hooks.

A hook is a callable ``hook(ctx: StepContext) -> None``, called in list order after every step; ``close()``
is called on those that have one when the loop ends. A hook stops the loop by setting ``ctx.stop`` (later
hooks see it); metrics reach the host only when a hook asks (``ctx.values()``). New behaviour (a profiler,
an EMA, an early stop) is a new entry in the list, not an edit of the loop. The hooks here and their order:
docs/architecture.md.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jax_refine import checkpoint as ckpt
from jax_refine import distributed, evaluate, failures
from jax_refine import workdir as workdir_lib
from jax_refine.console import log
from jax_refine.train_state import TrainState


class DivergenceError(failures.RunStopped, FloatingPointError):
    """The loss or gradient norm became non-finite or exploded (``DivergenceGuard``); training stopped without
    saving the bad state. The message names the checkpoint to resume from and how."""


class NonFiniteLossError(DivergenceError):
    """The loss (or gradient norm) became NaN/Inf."""


@dataclasses.dataclass
class StepContext:
    """What a hook sees after one train step. ``state`` is donated to the next step: read it, don't keep it."""
    step: int  # steps done, counting this one (1-based)
    total_steps: int
    state: TrainState
    metrics: Mapping[str, jax.Array]  # this step's metrics, still on device
    data_iter: Any  # the training iterator (``get_state``, optional ``stats``)
    checkpoints: ocp.CheckpointManager
    batch_size: int  # global batch (examples per step)
    stop: bool = False  # set by a hook: the loop ends after this step's hooks
    guard: "DivergenceGuard | None" = None  # None: a plain non-finite-loss check
    _values: dict[str, float] | None = dataclasses.field(default=None, repr=False)

    @property
    def last(self) -> bool:
        """True on the run's final step."""
        return self.step == self.total_steps

    def values(self) -> dict[str, float]:
        """This step's metrics as floats (one device->host copy, cached). A DivergenceError if the guard (or,
        without one, a non-finite loss) says training diverged, naming the checkpoint to resume from (pending
        saves are finished first)."""
        if self._values is None:
            values = {k: float(v) for k, v in jax.device_get(dict(self.metrics)).items()}
            guard = self.guard if self.guard is not None else DivergenceGuard(factor=0.0, window=1)
            reason = guard.reason(self.step, values)
            if reason is not None:
                raise guard.stop(self.step, reason, self.checkpoints)
            self._values = values
        return self._values


# ------------------------------------------------------------------------------------------ divergence
DIVERGED_SUBDIR = "checkpoints.diverged"  # steps whose weights gave a diverged loss are moved here (kept)
# Below these a median counts as zero (a distillation that starts at its teacher has loss and gradient ~0):
# the threshold is factor * max(median, floor), so merely leaving zero is not taken for a blow-up.
GUARD_FLOORS = {"loss": 1e-3, "grad_norm": 1e-3}
# The config key holding each value's factor (0: that value stops only when it is not finite).
GUARD_FACTOR_KEYS = {"loss": "train.divergence_factor", "grad_norm": "train.divergence_grad_norm_factor"}


def _shell_flag(key: str, value: float) -> str:
    return f"--config.{key}={value:.3g}"


class DivergenceGuard:
    """Stops training at the first step whose loss or gradient norm is not finite, or is more than its factor
    times the median of its own last ``window`` values (a factor of 0: only non-finite values of it stop).

    The loss is what diverges; its factor (``train.divergence_factor``, 100) is the real test. The gradient
    norm has its own, much larger factor (``train.divergence_grad_norm_factor``, 1e4): under Adam a one-step
    gradient spike at a normal loss moves no weight further than any other step (the update is divided by the
    running second moment), and the demo's pre-training measured such spikes of 101x its median at a normal loss;
    a blow-up (the fault trial's lr 1e3 run: gradient norm 3e17) is orders of magnitude past either.

    Step k's metrics are computed at the weights of step k-1: when step k diverges, the checkpoints of steps
    >= k-1 hold weights that gave the blow-up. They are moved to ``<workdir>/checkpoints.diverged/<step>``
    (kept, but no longer resumed), so a rerun resumes from the newest step before it; the error says which
    and how (a lower ``optimizer.lr`` with ``--allow-config-change``).
    """

    def __init__(self, factor: float, window: int, lr: float | None = None, grad_norm_factor: float = 1e4):
        self.factors = {"loss": float(factor), "grad_norm": float(grad_norm_factor)}
        self.lr = lr
        self.history = {name: collections.deque(maxlen=max(1, int(window))) for name in GUARD_FLOORS}

    def reason(self, step: int, values: Mapping[str, float]) -> str | None:
        """Why step ``step`` diverged (one phrase), or None; a step that passes joins the history."""
        for name, floor in GUARD_FLOORS.items():
            value = values.get(name)
            if value is None:
                continue
            if not math.isfinite(value):
                return f"non-finite {name} ({value}) at step {step}"
            past, factor = self.history[name], self.factors[name]
            if factor > 0 and past:
                median = statistics.median(abs(x) for x in past)
                ref = max(median, floor)
                if abs(value) > factor * ref:
                    return (f"exploding {name} ({value:.3g}, {abs(value) / ref:.3g}x the median {median:.3g} of the "
                            f"last {len(past)} steps; {GUARD_FACTOR_KEYS[name]}={factor:g}) at step {step}")
        for name in GUARD_FLOORS:
            if name in values:
                self.history[name].append(values[name])
        return None

    def stop(self, step: int, reason: str, checkpoints: ocp.CheckpointManager) -> "DivergenceError":
        """Finish pending saves, move the checkpoints of steps >= ``step`` - 1 aside and return the error to
        raise: ``reason``, the checkpoint a rerun resumes from (or none) and the flags to pass."""
        checkpoints.wait_until_finished()
        directory = workdir_lib.as_path(checkpoints.directory)
        steps = sorted(checkpoints.all_steps())
        bad = [s for s in steps if s >= step - 1]
        good = [s for s in steps if s < step - 1]
        moved = directory.parent / DIVERGED_SUBDIR
        if bad and jax.process_index() == 0:
            moved.mkdir(parents=True, exist_ok=True)
            for s in bad:
                dest = moved / str(s)
                if dest.exists():  # an earlier divergence moved the same step: keep both
                    dest = dest.with_name(f"{s}-{len(list(moved.iterdir()))}")
                (directory / str(s)).rename(dest)
        if bad and jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"diverged_{step}")
        aside = (f" (step {', '.join(map(str, bad))} moved to {moved}: its weights gave this loss)" if bad else "")
        lower = "" if self.lr is None else f" {_shell_flag('optimizer.lr', self.lr / 10)} (now {self.lr:.3g})"
        kind = NonFiniteLossError if reason.startswith("non-finite") else DivergenceError
        if good:
            return kind(f"{reason}; training stopped, the last good checkpoint is step {good[-1]} in {directory}"
                        f"{aside}; to resume from it, rerun the same train command with --allow-config-change"
                        f" and a lower learning rate{lower}")
        return kind(f"{reason}; training stopped, no checkpoint from before it{aside}; rerun the same train command "
                    f"with a lower learning rate{lower} to start again")


Hook = Callable[[StepContext], None]


def due(step: int, every: int, last: bool) -> bool:
    """Whether a periodic hook runs at ``step``: every ``every`` steps (0 or less: never) and on the last."""
    return (every > 0 and step % every == 0) or last


# ------------------------------------------------------------------------------------------ preemption
class Preemption:
    """Stops the loop on SIGTERM or SIGINT (Ctrl-C) (one process) or Orbax's preemption notice (several
    processes); the checkpoint hook after it saves that step. A second SIGINT ends the process at once (exit
    130; a save under way is left unfinished, and Orbax never lists it). Use as a context manager around the
    loop (installs the handlers; outside the main thread none is installed)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoints: ocp.CheckpointManager):
        self.checkpoints = checkpoints
        self.flag = False  # a signal was received
        self.signum: int | None = None  # the first signal received
        self.preempted = False  # the loop was stopped by this hook
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "Preemption":
        try:
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._old = {}
        return self

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:  # the user insists: no save, no waiting
            print(f"\n[train] second {signal.Signals(signum).name}: stopped at once, nothing saved (the newest "
                  f"finished checkpoint in {self.checkpoints.directory} is where a rerun resumes)", flush=True)
            os._exit(128 + signum)
        self.flag = True
        self.signum = self.signum or signum

    @property
    def signal_name(self) -> str | None:
        """"SIGTERM" / "SIGINT" once one was received, else None."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def __call__(self, ctx: StepContext) -> None:
        stop = self.flag if jax.process_count() == 1 else self.checkpoints.reached_preemption(ctx.step)
        if stop:
            ctx.stop = self.preempted = True


# -------------------------------------------------------------------------------------------- logging
def strict_number(value: Any) -> Any:
    """``value``, or None for a NaN/infinite float: JSON has no NaN or Infinity (``json.dumps`` would write the
    bare tokens ``NaN``/``Infinity``, which strict readers refuse)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricWriter:
    """``metrics.jsonl`` rows and TensorBoard scalars on process 0 (silent elsewhere).

    A row is ``{"step": N, "kind": KIND, name: value, ...}``, strict JSON: a NaN or infinite value is written
    as ``null`` (TensorBoard gets the float as it is); TensorBoard tags are ``KIND/name``.
    A local workdir gets each row appended and flushed at once. A bucket cannot append and allows about one
    write per second to an object, so for a ``gs://`` workdir both files are written in a local staging
    directory (``metrics.jsonl`` starting from the bucket's copy) and ``flush()`` uploads them whole: the
    ``FlushMetrics`` hook calls it at each checkpoint, ``close()`` at the end. Rows after the last flush are
    lost if the process dies -- the steps they describe come after the last checkpoint and are redone.
    """

    def __init__(self, workdir: str | Path, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.jsonl = self.tb = self.staging = None
        if not enabled:
            return
        self.workdir = workdir_lib.as_path(workdir)
        local = self.workdir
        if workdir_lib.is_remote(self.workdir):
            self.staging = Path(tempfile.mkdtemp(prefix="jax_refine-metrics-"))
            local = self.staging
            remote_rows = self.workdir / "metrics.jsonl"
            if remote_rows.exists():
                (local / "metrics.jsonl").write_bytes(remote_rows.read_bytes())
        self.jsonl = open(local / "metrics.jsonl", "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # optional: only when TensorBoard logging is on

            self.tb = SummaryWriter(str(local / "tensorboard"))

    def write(self, step: int, kind: str, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, **{k: strict_number(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def flush(self) -> None:
        """Make the files in the workdir complete: TensorBoard's buffer written, and for a bucket workdir the
        staged ``metrics.jsonl`` and event files uploaded (each replaced whole)."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.flush()
        if self.staging is not None:
            workdir_lib.upload_tree(self.staging, self.workdir)

    def close(self) -> None:
        for obj in (self.jsonl, self.tb):
            if obj is not None:
                obj.close()
        if self.staging is not None:
            workdir_lib.upload_tree(self.staging, self.workdir)
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


def metric_rows(path: Any, text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(line, row)`` for each row of ``metrics.jsonl`` (``text``, read from ``path``), each line ending in a
    newline. A last line that does not parse is a row cut by a crash mid-append: dropped with one warning
    naming the file. Any other line that does not parse is a WorkdirError naming the file and line."""
    lines = [ln for ln in text.splitlines(keepends=True) if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                log.warning("%s: its last line is cut (%d characters, %s): a crash mid-append; removed, the rows "
                            "before it kept", path, len(ln.rstrip()), e)
                break
            raise workdir_lib.WorkdirError(f"{path}: line {i + 1} is not a JSON row ({e}); repair or delete "
                                           "that line to resume") from None
        rows.append((ln if ln.endswith("\n") else ln + "\n", row))
    return rows


class LogMetrics:
    """Every ``every`` steps and at the end: the step's metrics, ``examples_per_sec`` since the last row and
    the data iterator's ``stats()`` (skipped examples, epoch) as a ``kind: "train"`` row; a tqdm bar."""

    def __init__(self, writer: MetricWriter, every: int, total: int, start: int):
        self.writer, self.every = writer, max(1, every)
        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True) if writer.enabled else None
        self.t0, self.seen = time.perf_counter(), 0
        self.last: dict[str, float] = {}  # the last row written

    def __call__(self, ctx: StepContext) -> None:
        self.seen += ctx.batch_size
        if self.bar is not None:
            self.bar.update(1)
        if not due(ctx.step, self.every, ctx.last):
            return
        values = dict(ctx.values())
        dt = time.perf_counter() - self.t0
        values["examples_per_sec"] = self.seen / dt if dt > 0 else 0.0
        if hasattr(ctx.data_iter, "stats"):  # skipped (bad image / no caption) counts, epoch
            values.update({f"data/{k}": float(v) for k, v in ctx.data_iter.stats().items()})
        self.t0, self.seen, self.last = time.perf_counter(), 0, values
        self.writer.write(ctx.step, "train", values)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values['loss']:.4g}", gap=f"{values.get('modality_gap', float('nan')):.3f}",
                                 ex_s=f"{values['examples_per_sec']:.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------- evaluation
def flatten_result(result: Mapping[str, Any]) -> dict[str, float]:
    """``evaluate.run_suite``'s result -> ``{"zero_shot/<set>/top1": %, "zero_shot_mean/top1": %,
    "retrieval/<set>/i2t/R@1": %, "features/<set>/modality_gap": ..., ...}`` (numbers only)."""
    out: dict[str, float] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[prefix] = float(node)

    for section in ("zero_shot", "zero_shot_mean", "retrieval", "features"):
        walk(section, result.get(section) or {})
    return out


def load_eval_sets(eval_config: Mapping[str, Any]) -> tuple[tuple[list, list], list[str]]:
    """Read every set of ``eval_config`` (``zero_shot`` and ``retrieval`` specs): ``((zero-shot tasks, retrieval
    tasks), problems)``, one line in ``problems`` per set that cannot be read (the data package's one-line
    input errors; anything else is a bug and raises)."""
    tasks: tuple[list, list] = ([], [])
    problems = []
    for key, make, out in (("zero_shot", evaluate.zero_shot_task, tasks[0]),
                           ("retrieval", evaluate.retrieval_task, tasks[1])):
        for spec in eval_config.get(key) or ():
            try:
                out.append(make(spec, eval_config))
            except (ValueError, OSError) as e:
                problems.append(f"evaluation set {spec!r} of config.eval.{key}: {failures.first_line(e)}")
    return tasks, problems


class Evaluate:
    """Every ``every`` steps (and at the end) the evaluation suite (``evaluate.run_suite``: zero-shot,
    retrieval, modality gap on ``config.eval``'s sets) on the current student, as a ``kind: "eval"`` row.

    The sets are read once: ``tasks`` (``load_eval_sets``, which the trainer calls before the first step, so a
    missing set is found at the start), else at the first evaluation. The embedding cache is off (each step is
    a new model). A set that fails stops the run (``failures.EvaluationFailed``, one line); the step's checkpoint
    is saved before (``SaveCheckpoint`` runs first, and saves at every evaluated step).
    All processes run it (the embeddings are gathered across them); process 0 writes the row.
    """

    def __init__(self, eval_config: Any, every: int, graphdef: nnx.GraphDef, rest: nnx.State, mesh: Mesh,
                 writer: MetricWriter, prep: Any = None, tasks: tuple[list, list] | None = None):
        settings = eval_config.to_dict() if hasattr(eval_config, "to_dict") else dict(eval_config)
        self.eval_config = {**settings, "cache_dir": None}
        self.every, self.graphdef, self.rest, self.mesh, self.writer = every, graphdef, rest, mesh, writer
        self.prep = prep  # the training pipeline's preprocessing (the model's size, resize, tokenizer)
        self.tasks = tasks  # (zero-shot tasks, retrieval tasks); None: read at the first evaluation
        self.rows: list[tuple[int, dict[str, float]]] = []  # (step, row) of this run's evaluations

    def __call__(self, ctx: StepContext) -> None:
        if ctx.stop or not due(ctx.step, self.every, ctx.last):
            return
        if self.tasks is None:
            self.tasks, problems = load_eval_sets(self.eval_config)
            if problems:
                raise self._failed(ctx, "; ".join(problems))
        model = nnx.merge(self.graphdef, ctx.state.params, self.rest)
        try:
            result, _ = evaluate.run_suite(model, self.eval_config, name=f"step {ctx.step}", mesh=self.mesh,
                                           prep=self.prep, zero_shot=self.tasks[0], retrieval=self.tasks[1])
        except (ValueError, OSError) as e:  # a set that became unreadable since the start (the rest is a bug)
            raise self._failed(ctx, failures.first_line(e)) from e
        row = flatten_result(result)
        self.rows.append((ctx.step, row))
        self.writer.write(ctx.step, "eval", row)
        mean = (result.get("zero_shot_mean") or {}).get("top1")
        log.info("eval at step %d%s", ctx.step, f": zero-shot top-1 {mean:.2f}" if mean is not None else "")

    @staticmethod
    def _failed(ctx: StepContext, why: str) -> failures.EvaluationFailed:
        """The error that stops the run; the step's checkpoint (saved before the evaluation) is finished first."""
        ctx.checkpoints.wait_until_finished()
        saved = ctx.checkpoints.latest_step()
        where = (f"checkpoint step {saved} in {ctx.checkpoints.directory} is saved (a rerun resumes there)"
                 if saved is not None else "no checkpoint saved yet")
        return failures.EvaluationFailed(f"evaluation at step {ctx.step} failed: {why}; training stopped, {where}")


# ---------------------------------------------------------------------------------------- checkpoints
class SaveCheckpoint:
    """Every ``every`` steps, every ``also_every`` steps (the evaluation's: each evaluated step has its
    checkpoint, saved before the evaluation runs), at the end and when a hook stopped the loop: an async Orbax
    save of the state and the data position (never of a state whose metrics the divergence guard refuses).
    Once Orbax has committed a step (the first step after its save finished, or ``close``), its checksum
    manifest is written (``checkpoint.write_manifest``, process 0)."""

    def __init__(self, checkpoints: ocp.CheckpointManager, every: int, meta: Mapping[str, Any], also_every: int = 0):
        self.checkpoints, self.every, self.meta, self.also_every = checkpoints, max(1, every), dict(meta), also_every
        self.pending: list[int] = []  # steps saved by this run whose manifest is not written yet

    def __call__(self, ctx: StepContext) -> None:
        if self.pending and not self.checkpoints.is_saving_in_progress():
            self._manifests()
        if due(ctx.step, self.every, ctx.last) or due(ctx.step, self.also_every, False) or ctx.stop:
            ctx.values()
            ckpt.save(self.checkpoints, ctx.step, ctx.state, ctx.data_iter.get_state(), self.meta, force=True)
            self.pending.append(ctx.step)

    def _manifests(self) -> None:
        """The manifests of the pending steps that Orbax committed (a failed or deleted save has none to write)."""
        for step in self.pending:
            step_dir = self.checkpoints.directory / str(step)
            if distributed.is_main() and ckpt.finished(step_dir):
                ckpt.write_manifest(step_dir)
        self.pending = []

    def close(self) -> None:
        """Wait for the last save to be committed, then write the manifests still due."""
        if self.pending:
            try:
                self.checkpoints.wait_until_finished()
            except Exception:  # noqa: BLE001 - a failed save has no manifest; the manager's close() raises it
                return
            self._manifests()


class FlushMetrics:
    """With each checkpoint (every ``every`` steps, at the end, when stopping): ``writer.flush()``, so a
    bucket workdir holds the metric rows of every step up to its newest checkpoint."""

    def __init__(self, writer: MetricWriter, every: int):
        self.writer, self.every = writer, max(1, every)

    def __call__(self, ctx: StepContext) -> None:
        if due(ctx.step, self.every, ctx.last) or ctx.stop:
            self.writer.flush()
