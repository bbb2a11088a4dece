"""Orbax checkpoints of the train state, the data position and the RNG; the one model loader.

Layout: ``WORKDIR/checkpoints/<step>/{params,opt_state,train,data,meta}``
  params, opt_state: ``StandardSave`` pytrees (restored into the current mesh's shardings, so a run on 8
  devices restores on 1 and vice versa); train: every other saved field of the ``TrainState`` (``step``,
  ``rng`` and the fields a subclass adds); data: the data iterators' states (JSON, one per process); meta:
  the model ``family`` and its transformers config dict (``model_config``), the method name and the dtype
  (``load_model`` needs them; older checkpoints hold a ``clip_config`` and no family: CLIP).
The teacher is never saved (``TrainState.NOT_SAVED``): it is the start weights, re-derived on resume.
Orbax writes each step into a temporary directory and renames it when complete, so a save killed half
way is never listed by ``all_steps``/``latest_step`` (and is removed at the next start). In a ``gs://``
bucket (no rename there) it writes the step in place and adds ``commit_success.txt`` last; a step without
it is not listed. Directories are ``etils.epath`` paths (``workdir.as_path``): local and bucket alike.
A local step also holds ``checksums.json`` (``write_manifest``: size and sha256 of each of its files), written
once Orbax has committed the step (``SaveCheckpoint`` in ``jax_refine.hooks``) and verified before a restore,
an export or an evaluation reads it (``check_step``): a file changed since the save (a flipped bit) makes the
step damaged like a truncated one. A step without one (an older version's, or a run that died between the
commit and the manifest: Orbax's commit is a rename, so its files are whole) is read with a line saying so.

``load_model(source)`` is the one way to get a model for evaluation, export and the commands: an in-memory
model, a training workdir, a step directory, a checkpoint directory of any registered family (Hugging Face
CLIP or SigLIP, open_clip's format) or a hub id.
"""
from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from jax_refine import failures
from jax_refine import workdir as workdir_lib
from jax_refine.console import log
from jax_refine.models import registry
from jax_refine.train_state import TrainState, path_str, split_model

PyTree = Any
CHECKPOINT_SUBDIR = "checkpoints"
SKIPPED_SUBDIR = "checkpoints.skipped"  # damaged steps are moved here (kept, never deleted)
# The files every finished step holds, per item (Orbax's StandardSave / JsonSave layouts).
ARRAY_ITEMS, JSON_ITEMS = ("params", "opt_state", "train"), ("data", "meta")
COMMIT_MARKER = "commit_success.txt"  # what Orbax writes last into a step in a bucket (it cannot rename there)
MANIFEST_FILE = "checksums.json"  # size and sha256 of each file of a step, written after Orbax commits it
OWN_ITEMS = ("params", "opt_state")  # state fields saved as items of their own; the others go into "train"


class CheckpointError(ValueError):
    """A damaged or unusable checkpoint; the message names the file and the problem in one line."""


class ModelMismatchError(CheckpointError):
    """A readable checkpoint of another model size / structure (not a damage: no fallback)."""


def _check_json(path: epath.Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    text = path.read_bytes()
    if not text:
        raise CheckpointError(f"{path}: empty (truncated?)")
    try:
        json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON (truncated? {e})") from None


def check_step_files(step_dir: str | Path | epath.Path) -> None:
    """Raise CheckpointError naming the first missing, empty or unparsable file of a step directory.

    Checks ``_CHECKPOINT_METADATA``, each array item's ``_METADATA`` and ``manifest.ocdbt``, each JSON
    item's ``metadata``, and that no file in the step is empty. Truncation inside a data shard is only
    seen when it is read (``restore`` reports it as one line).
    """
    d = workdir_lib.as_path(step_dir)
    _check_json(d / "_CHECKPOINT_METADATA")
    for item in ARRAY_ITEMS + JSON_ITEMS:
        if not (d / item).is_dir():
            raise CheckpointError(f"{d / item}: missing item directory")
    for item in ARRAY_ITEMS:
        _check_json(d / item / "_METADATA")
        if not (d / item / "manifest.ocdbt").is_file():
            raise CheckpointError(f"{d / item / 'manifest.ocdbt'}: missing")
        _check_json(d / item / "_sharding")
        for f in sorted((d / item / "array_metadatas").glob("process_*")):
            _check_json(f)
    for item in JSON_ITEMS:
        _check_json(d / item / "metadata")
    for f in sorted(root / name for root, _, names in d.walk() for name in names):
        if f.name not in (COMMIT_MARKER, MANIFEST_FILE + ".tmp") and f.stat().length == 0:  # empty by design
            raise CheckpointError(f"{f}: empty file (truncated?)")


def _step_files(step_dir: Path) -> list[str]:
    """Every file of a local step directory, relative to it, sorted (the manifest and its temporary excluded)."""
    out = []
    for dirpath, _, names in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(dirpath, n), step_dir) for n in names]
    return sorted(f for f in out if f not in (MANIFEST_FILE, MANIFEST_FILE + ".tmp"))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(step_dir: Path, names: list[str]) -> list[str]:
    """sha256 of each file, several at a time (hashlib releases the GIL: a step's shards hash in parallel)."""
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda n: _sha256(step_dir / n), names))


def write_manifest(step_dir: str | Path | epath.Path) -> bool:
    """Write ``step_dir/MANIFEST_FILE``: size and sha256 of every file of a finished (committed) step, atomically
    (a temporary file renamed in). Returns False (nothing written) for a step in a bucket, whose objects
    carry the CRC32C the storage client checks on every download."""
    if workdir_lib.is_remote(step_dir):
        return False
    d = Path(os.fspath(step_dir))
    names = _step_files(d)
    files = {n: [(d / n).stat().st_size, h] for n, h in zip(names, _digests(d, names))}
    tmp = d / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"algorithm": "sha256", "files": files}, f)
        f.flush()
        os.fsync(f.fileno())  # the manifest is whole on disk before it is named: a crash leaves none or this one
    os.replace(tmp, d / MANIFEST_FILE)
    return True


def verify_manifest(step_dir: str | Path | epath.Path) -> bool:
    """Check every file listed in ``step_dir/MANIFEST_FILE`` (size, then sha256); CheckpointError naming the
    first file that differs or is missing. Returns False when the step has no manifest (a bucket step; a
    step of an older version; or a run that stopped between Orbax's commit and the manifest)."""
    if workdir_lib.is_remote(step_dir):
        return False
    d = Path(os.fspath(step_dir))
    path = d / MANIFEST_FILE
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: not a valid checksum manifest") from None
    names = sorted(files)
    for n in names:
        if not (d / n).is_file():
            raise CheckpointError(f"{d / n}: missing (listed in {MANIFEST_FILE} at save)")
        if (d / n).stat().st_size != files[n][0]:
            raise CheckpointError(f"{d / n}: {(d / n).stat().st_size} bytes, {files[n][0]} at save ({MANIFEST_FILE})")
    for n, digest in zip(names, _digests(d, names)):
        if digest != files[n][1]:
            raise CheckpointError(f"{d / n}: checksum differs from the one written at save ({MANIFEST_FILE}): "
                                  "the file changed after the save")
    return True


def check_step(step_dir: str | Path | epath.Path) -> bool:
    """``check_step_files`` then ``verify_manifest``: CheckpointError naming the first damaged file; returns
    whether the contents were verified against a manifest."""
    check_step_files(step_dir)
    return verify_manifest(step_dir)


def one_line(err: BaseException, where: str | Path | None = None, limit: int = 300) -> str:
    """One line for ``err``: the first line of it (or of its causes) that names a file under ``where``,
    else ``Type: first line (reading where)``; cut to ``limit`` characters."""
    if isinstance(err, CheckpointError):
        text = str(err).strip().splitlines()[0]
    else:
        text = ""
        chain, e = [], err
        while e is not None and len(chain) < 6:
            chain.append(e)
            e = e.__cause__ or e.__context__
        if where is not None:  # prefer an error line naming a file of the step (TensorStore's cause has it)
            lines = [ln.strip() for e in chain for ln in str(e).splitlines() if str(where) in ln]
            text = next((ln for ln in lines if "rror" in ln), "")
        if not text:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            text = f"{type(err).__name__}: {first}" + (f" (reading {where})" if where is not None else "")
    return text if len(text) <= limit else text[:limit] + "..."


def make_manager(directory: str | Path | epath.Path, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` over ``directory`` (made absolute; a ``gs://`` URL as is), keep-N, async;
    stale tmp dirs cleaned."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=not read_only, read_only=read_only,
                                           create=not read_only)
    handlers = {name: ocp.StandardCheckpointHandler() for name in ("params", "opt_state", "train")}
    handlers.update(data=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
    return ocp.CheckpointManager(workdir_lib.as_path(directory), options=options, item_handlers=handlers)


def _gather_json(obj: Mapping[str, Any]) -> list[Any]:
    """Every process's JSON-able ``obj``, in process order (all processes must call it)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(r[:int(n)]).decode()) for r, n in zip(np.asarray(rows), np.asarray(sizes).ravel())]


def _split_items(state: TrainState) -> dict[str, Any]:
    """``state``'s saved fields as checkpoint items: params, opt_state, and the rest together as train."""
    fields = state.saved()
    return {**{k: fields.pop(k) for k in OWN_ITEMS}, "train": fields}


def save(mngr: ocp.CheckpointManager, step: int, state: TrainState, data_state: Mapping[str, Any],
         meta: Mapping[str, Any], *, force: bool = False) -> bool:
    """Start an (async) save of ``state``'s saved fields at ``step``; all processes call it."""
    data = {"processes": _gather_json(dict(data_state))}
    items = {k: ocp.args.StandardSave(v) for k, v in _split_items(state).items()}
    args = ocp.args.Composite(**items, data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(dict(meta)))
    return mngr.save(step, args=args, force=force)


def _shape_of(meta: Any) -> tuple[int, ...] | None:
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(shape)


def check_compatible(mngr: ocp.CheckpointManager, step: int, abstract_params: PyTree) -> None:
    """One-line ValueError when the checkpoint's params differ in structure or shape from the model's."""
    where = f"{mngr.directory}/{step}"
    saved = mngr.item_metadata(step)["params"]  # orbax stores int keys (layer indices) as strings
    saved_flat = {path_str(p): _shape_of(m) for p, m in jax.tree_util.tree_leaves_with_path(saved)}
    ours = {path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract_params)}
    missing = sorted(set(ours) - set(saved_flat))
    extra = sorted(set(saved_flat) - set(ours))
    bad = [f"{k} {saved_flat[k]} vs {ours[k]}" for k in ours if k in saved_flat and saved_flat[k] != ours[k]]
    if missing or extra or bad:
        detail = (f"shape {bad[0]}" if bad else f"missing {missing[:1]}" if missing else f"unexpected {extra[:1]}")
        n = len(bad) + len(missing) + len(extra)
        raise ModelMismatchError(f"checkpoint {where} is from another model size ({n} params differ, e.g. {detail}; "
                         "checkpoint vs model)")


def restore(mngr: ocp.CheckpointManager, step: int, abstract: TrainState) -> tuple[TrainState, dict]:
    """Restore the saved fields of ``abstract`` (a ``TrainState``, or a subclass, of ``ShapeDtypeStruct``s
    with shardings; ``NOT_SAVED`` fields None) into those shardings, and this process's data state."""
    check_compatible(mngr, step, abstract.params)
    items = {k: ocp.args.StandardRestore(v) for k, v in _split_items(abstract).items()}
    out = mngr.restore(step, args=ocp.args.Composite(**items, data=ocp.args.JsonRestore()))
    states = out["data"]["processes"]
    if len(states) != jax.process_count():
        raise ValueError(f"checkpoint {mngr.directory}/{step} holds data positions of {len(states)} processes, "
                         f"this run has {jax.process_count()}")
    state = abstract.replace(**{k: out[k] for k in OWN_ITEMS}, **out["train"])
    return state, states[jax.process_index()]


def restore_latest_good(directory: Path | epath.Path, abstract: TrainState, make: Any
                        ) -> tuple[ocp.CheckpointManager, int | None, TrainState | None, dict | None]:
    """Restore the newest step of ``directory`` that is intact, moving damaged newer ones aside.

    ``make(directory) -> CheckpointManager``. Each step that fails (``check_step``: its files and its checksum
    manifest; or the restore
    itself) is moved to ``<workdir>/checkpoints.skipped/<step>`` (kept) with one printed line saying
    why, and the next older step is tried. The move is epath's rename: one rename locally, a copy and delete
    of each object in a bucket (not atomic: a move cut short leaves the rest of the step in place, unlisted
    without its commit marker or skipped again at the next start). Returns ``(manager, step, state,
    data_state)``; step is None when there is no checkpoint. A checkpoint of another model size raises
    ModelMismatchError (no fallback); when every step is damaged, CheckpointError names them.
    """
    mngr = make(directory)
    skipped = []
    while True:
        steps = sorted(mngr.all_steps(), reverse=True)
        if not steps:
            if skipped:
                raise CheckpointError(f"no intact checkpoint in {directory}: " + "; ".join(skipped)
                                      + f" (moved to {directory.parent / SKIPPED_SUBDIR})")
            return mngr, None, None, None
        step = steps[0]
        try:
            verified = check_step(directory / str(step))
            state, data_state = restore(mngr, step, abstract)
            if skipped:
                log.info("resuming from step %d (the newest intact checkpoint)", step)
            if not verified and not workdir_lib.is_remote(directory):
                log.info("checkpoint step %d has no %s (saved by an older version, or the run stopped between the "
                         "save and its manifest): checked by its files' structure only", step, MANIFEST_FILE)
            return mngr, step, state, data_state
        except ModelMismatchError:
            mngr.close()
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read this step: try the one before
            reason = one_line(e, directory / str(step))
            skipped.append(f"step {step}: {reason}")
            log.info("skipping damaged checkpoint step %d: %s", step, reason)
            mngr.close()
            if jax.process_index() == 0:
                dest = directory.parent / SKIPPED_SUBDIR / str(step)
                if dest.exists():
                    dest = dest.with_name(f"{step}-{len(list(dest.parent.iterdir()))}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                (directory / str(step)).rename(dest)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices(f"skip_checkpoint_{step}")
            mngr = make(directory)


def finished(step_dir: Path | epath.Path) -> bool:
    """Whether ``step_dir`` is a step Orbax finished: locally any step directory under its final name (Orbax
    renames it in when done); in a bucket (no rename there) only one holding its ``commit_success.txt``."""
    if not (step_dir / "params").is_dir():
        return False
    return not workdir_lib.is_remote(step_dir) or (step_dir / COMMIT_MARKER).is_file()


def finished_steps(directory: Path | epath.Path) -> list[int]:
    """The steps of a checkpoints ``directory`` that Orbax finished (``finished``), ascending; [] when the
    directory does not exist."""
    if not directory.is_dir():
        return []
    return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit() and finished(d))


def _resolve(path: str | Path | epath.Path) -> tuple[epath.Path, int]:
    """A training workdir, its ``checkpoints`` dir or one step dir, local or ``gs://`` -> (checkpoints dir, step)."""
    p = workdir_lib.as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint directory")
    if p.name.isdigit() and (p / "params").is_dir():
        if not finished(p):
            raise CheckpointError(f"{p}: an unfinished checkpoint step (no {COMMIT_MARKER}: its save was cut short)")
        check_step(p)
        return p.parent, int(p.name)
    root = p / CHECKPOINT_SUBDIR if (p / CHECKPOINT_SUBDIR).is_dir() else p
    steps = finished_steps(root)
    if not steps:
        raise FileNotFoundError(f"{p}: no finished Orbax checkpoint (expected {CHECKPOINT_SUBDIR}/<step>/params)")
    for step in reversed(steps):  # the newest intact step; damaged newer ones are named and skipped
        try:
            check_step(root / str(step))
            return root, step
        except CheckpointError as e:
            print(f"skipping damaged checkpoint step {step}: {e}", flush=True)
    raise CheckpointError(f"{root}: every checkpoint step is damaged ({', '.join(map(str, steps))})")


def _as_local_or_remote(source: str | Path) -> Path | epath.Path:
    """``source`` as a path: a ``gs://`` URL as an ``epath.Path`` (never a local ``gs:`` directory), a local
    path with ``~`` expanded (relative: kept relative, so a hub id ``org/name`` stays recognisable)."""
    if workdir_lib.is_remote(source):
        return workdir_lib.as_path(source)
    return Path(str(source)).expanduser()


def load_model(source: str | Path | nnx.Module, *, dtype: Any = None, shardings: Any = None) -> nnx.Module:
    """The one model loader: a model (`jax_refine.models.interface.Model`) from ``source``.

    ``source``: an in-memory ``nnx.Module`` (returned as is); a training workdir (its newest intact step), its
    ``checkpoints`` dir or one step dir, local or ``gs://bucket/...`` (the student params, built as the family
    the run recorded; in a bucket only committed steps count, as for Orbax); a local checkpoint
    directory of any registered family (``models.registry.load``; an unknown one is a one-line error naming what
    it holds); or a hub id ``org/name``. ``dtype``: compute dtype (default: the checkpoint's ``meta`` dtype,
    float32 for Hugging Face weights). ``shardings``: optional ``(path, logical_names) -> Sharding`` callable
    (default one device).
    """
    if isinstance(source, nnx.Module):
        return source
    path = _as_local_or_remote(source)
    remote = workdir_lib.is_remote(path)
    if remote:
        workdir_lib.check_bucket(path)  # no google-cloud-storage or no access: one line now
    if path.exists():
        if path.is_dir() and _is_orbax(path):
            return _load_checkpoint(path, dtype, shardings)
        if remote:
            raise ValueError(f"model {path}: not a training workdir or checkpoint step; a model directory in a "
                             "bucket is not read in place: copy it down (gcloud storage cp -r) and pass the copy")
        if path.is_dir():
            return registry.load(path, jnp.dtype(dtype or "float32"), shardings=shardings)
        raise ValueError(f"model {source}: a file, not a model checkpoint directory or a training workdir")
    if remote:
        raise FileNotFoundError(f"model {path}: no such training workdir or checkpoint step in the bucket")
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"model {source}: no such directory (and not a hub id of the form org/name)")
    return registry.load(source, jnp.dtype(dtype or "float32"), shardings=shardings)


def tokenizer_source(source: Any) -> str | None:
    """Where the tokenizer of ``source`` (as ``load_model`` takes it) is read from: a checkpoint directory or
    hub id is its own source; for a training workdir (local or ``gs://``), its ``checkpoints`` dir or a step dir,
    the run's start checkpoint as ``config.resolved.json`` records it (its SigLIP ``spiece.model`` or CLIP BPE
    files). None for an in-memory model or a run from a random init (CLIP's packaged BPE then)."""
    if not isinstance(source, (str, Path)):
        return None
    path = _as_local_or_remote(source)
    if not (path.is_dir() and _is_orbax(path)):
        return str(source)
    for d in (path, path.parent, path.parent.parent):  # workdir, workdir/checkpoints, workdir/checkpoints/<step>
        record = d / workdir_lib.CONFIG_FILE
        if record.is_file():
            model = json.loads(record.read_text()).get("model") or {}
            return None if model.get("random_init") is not None else model.get("name_or_path")
    return None


def _is_orbax(path: Path | epath.Path) -> bool:
    """A training workdir, its checkpoints dir or a step dir (an Orbax layout, not a model checkpoint)."""
    if (path / CHECKPOINT_SUBDIR).is_dir() or (path / "params").is_dir():
        return True
    return any(d.name.isdigit() and (d / "params").is_dir() for d in path.iterdir())


def model_meta(model: nnx.Module, *, method: str, dtype: str) -> dict[str, Any]:
    """A step's ``meta`` item, what ``load_model`` rebuilds the model from: its family, its transformers config
    dict, the training method's name and the compute dtype."""
    return {"family": model.family, "model_config": model.config.to_dict(), "method": method, "dtype": dtype}


def _load_checkpoint(workdir_or_step_dir: Path | epath.Path, dtype: Any, shardings: Any) -> nnx.Module:
    """The student model of an Orbax checkpoint (a workdir -> its newest intact step, or a step dir)."""
    root, step = _resolve(workdir_or_step_dir)  # checked there (files and checksums)
    mngr = make_manager(root, read_only=True, async_save=False)
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        family = registry.family_named(meta.get("family", "clip"))
        config = family.config_from(meta["model_config"] if "model_config" in meta else meta["clip_config"])
        dtype = jnp.dtype(dtype or meta.get("dtype", "float32"))
        abstract_model = nnx.eval_shape(lambda: family.create(config, dtype=dtype))
        graphdef, abstract_params, rest = split_model(abstract_model)
        specs = nnx.get_partition_spec(nnx.state(abstract_model, nnx.Param)).to_pure_dict()
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def target(path, a, spec):
            sh = shardings(path_str(path), tuple(spec)) if shardings is not None else None
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh or default)

        abstract = jax.tree_util.tree_map_with_path(target, abstract_params, specs)
        check_compatible(mngr, step, abstract)
        params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged step: one line naming it, the cause chained below
        raise CheckpointError(f"checkpoint {root}/{step} cannot be read: {one_line(e, root / str(step))}") from e
    finally:
        mngr.close()
    return nnx.merge(graphdef, params, rest)


# ------------------------------------------------------------------------------------------ full disk
_ENOSPC_MARKS = ("No space left on device", "os_error_code='28'", "[Errno 28]")  # TensorStore's and the OS's words


def _chain(err: BaseException) -> list[BaseException]:
    out, e = [], err
    while e is not None and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or one of its causes) is ENOSPC: the OS's OSError, or TensorStore's error text."""
    return any(getattr(e, "errno", None) == errno.ENOSPC or any(m in str(e) for m in _ENOSPC_MARKS)
               for e in _chain(err))


def state_bytes(abstract: TrainState) -> int:
    """Bytes of the arrays a checkpoint of ``abstract`` (``ShapeDtypeStruct``s or arrays) holds."""
    leaves = jax.tree_util.tree_leaves(abstract.saved())
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in leaves))


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def disk_full_error(err: BaseException, directory: epath.Path, needed: int) -> "failures.DiskFull":
    """The one-line error for a run that ran out of space (``is_disk_full(err)``: a checkpoint save, or another
    write of the run while a save fills the disk, e.g. ``metrics.jsonl``): the checkpoints ``directory``, the
    bytes one step needs (``needed``: ``state_bytes``) and the space free there, and the step that is kept
    (the newest finished one). The unfinished step's temporary directory is removed (ours, and it holds the
    space the rerun needs)."""
    kept = max(finished_steps(directory), default=None)
    step = next((m.group(1) for e in _chain(err) for m in [re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(e))] if m),
                None)
    if not workdir_lib.is_remote(directory) and directory.is_dir():
        for tmp in directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
    free, size = "", f"{_megabytes(needed)} of arrays"
    if not workdir_lib.is_remote(directory):
        free = f", {_megabytes(shutil.disk_usage(str(directory)).free)} free there"
        if kept is not None:  # what a step really takes on disk (compressed; Adam moments of unused rows are 0)
            needed = sum(f.stat().st_size for f in Path(directory / str(kept)).rglob("*") if f.is_file())
            size = f"{_megabytes(needed)}, the size of step {kept}"
    # which file: Orbax's errors name the step's temporary directory; the OS's name the file (metrics.jsonl, say)
    filename = next((e.filename for e in _chain(err) if getattr(e, "filename", None)), None)
    what = (f"checkpoint step {step} to {directory}" if step else
            f"{filename} (checkpoints in {directory})" if filename else f"to {directory}")
    keep = (f"the last intact checkpoint, step {kept}, is kept" if kept is not None else "no checkpoint was finished")
    return failures.DiskFull(f"no space left on device writing {what}: a checkpoint step needs about "
                             f"{needed} bytes ({size}){free}; {keep}: free space (or lower "
                             "checkpoint.max_to_keep) and rerun the same command to resume")


class _DropDiskFullLogs(logging.Filter):
    """Drops Orbax's log records of a disk-full save (each a traceback, several per save; the trainer reports
    the fault in one line instead: ``disk_full_error``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            return not is_disk_full(record.exc_info[1]) and not any(m in text for m in _ENOSPC_MARKS)
        return not any(m in text for m in _ENOSPC_MARKS)


def quiet_disk_full_logs() -> None:
    """Install ``_DropDiskFullLogs`` on Orbax's (absl's) logger and on asyncio's (its "exception never retrieved"
    of the same failed writes, when their futures are collected), once each."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropDiskFullLogs) for f in logger.filters):
            logger.addFilter(_DropDiskFullLogs())
