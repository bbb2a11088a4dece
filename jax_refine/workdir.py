"""What a training workdir holds besides checkpoints: the lock of the run using it and the config it ran with.

Every workdir path is an ``etils.epath.Path`` (``as_path``: local or ``gs://``, the path type Orbax uses).
``train.lock`` names the run holding the workdir; ``config.resolved.json`` (``RunRecord``, written once the
restore it describes succeeded) holds the resolved config and the data it reads, and a resume is compared
with it (``check_resume``); ``check_workdir`` says which folders ``train`` may use. The rules, and what is
atomic in a bucket: docs/checkpoints.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from etils import epath

from jax_refine.console import log

LOCK_FILE = "train.lock"
CONFIG_FILE = "config.resolved.json"
REMOTE_LOCK_SETTLE_S = 1.0  # seconds between writing a bucket lock object and reading it back
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # gs://, s3://, ... (and gs:/ as pathlib collapses it)
# Keys (dotted prefixes) a resumed run may change: run length, logging, checkpoints, eval, export, mesh, data speed.
DATA_KEY = "data_identity"  # the top-level key of config.resolved.json with what the run reads (RunRecord)
DATA_PATH_KEYS = ("data.annotations", "data.images", "data.data_dir", "data.manual_dir")  # spellings of paths
RESUMABLE_CHANGES = ("train.epochs", "train.num_steps", "train.export_hf", "log.", "checkpoint.", "eval.",
                     "mesh.", "workdir", "data.num_parallel_calls", "data.prefetch")


class WorkdirError(ValueError):
    """A workdir that cannot be used now (locked, or started with another config); one line."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``gs://bucket/...``) rather than a local path."""
    return bool(_URL.match(os.fspath(path)))


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a URL as is, a local path made absolute (``~`` expanded)."""
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Replace the file ``path`` with ``text`` as a whole: locally through a temporary file and a rename; in a
    bucket by one object write (an upload is all or nothing there)."""
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def upload_tree(local: os.PathLike, dest: epath.Path, *, last: tuple[str, ...] = ()) -> epath.Path:
    """Copy the files under the local directory ``local`` to ``dest`` (a bucket or local directory), overwriting
    files of the same name; the names in ``last`` are copied after all others (readers look for them)."""
    base = epath.Path(os.fspath(local))
    files = [(root / name) for root, _, names in base.walk() for name in names]
    files.sort(key=lambda f: (f.name in last, str(f)))
    for f in files:
        target = dest / str(f.relative_to(base))
        target.parent.mkdir(parents=True, exist_ok=True)
        f.copy(target, overwrite=True)
    return dest


def bucket_of(url: str) -> str:
    """The bucket name of a ``gs://BUCKET/...`` URL."""
    return url[len("gs://"):].split("/", 1)[0]


def get_bucket(name: str):
    """The ``google.cloud.storage`` bucket ``name`` (a network call; the tests' bucket stand-in replaces it)."""
    from google.cloud import storage  # only for gs:// workdirs: the `gcs` extra

    return storage.Client().get_bucket(name)


def check_bucket(workdir: epath.Path) -> None:
    """Fail now (one line) when a ``gs://`` workdir cannot be used by Orbax: it lists and deletes steps through
    ``google-cloud-storage``, asking the bucket for its metadata first. No-op for local paths."""
    if not os.fspath(workdir).startswith("gs://"):
        return
    try:
        get_bucket(bucket_of(os.fspath(workdir)))
    except ImportError:
        raise WorkdirError(f"workdir {workdir}: Orbax needs the google-cloud-storage package for gs:// "
                           "checkpoints (pip install 'jax_refine[gcs]')") from None
    except Exception as e:  # noqa: BLE001 - credentials, a missing bucket, no network: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WorkdirError(f"workdir {workdir}: cannot reach its bucket ({type(e).__name__}: {first})") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: epath.Path) -> tuple[str, int, dict]:
    try:
        holder = json.loads(path.read_text())
        return str(holder["host"]), int(holder["pid"]), holder
    except (OSError, ValueError, KeyError, TypeError):
        raise WorkdirError(f"{path} exists but is unreadable: another run may be starting; delete it if "
                           "no run uses this workdir") from None


def _stale(path: epath.Path, me: dict) -> bool:
    """True if the lock at ``path`` is this process's or a dead process's on this host (a line says so);
    raises WorkdirError naming the holder otherwise."""
    host, pid, holder = _holder(path)
    if host == me["host"] and (pid == me["pid"] or not _alive(pid)):
        log.info("taking over the stale lock %s of pid %d on %s (that process is gone)", path, pid, host)
        return True
    raise WorkdirError(f"workdir {path.parent} is in use by pid {pid} on host {host} (since "
                       f"{holder.get('started', '?')}); wait for it, or delete {path} if that run is gone")


def _take_local(path: epath.Path, me: dict) -> None:
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _stale(path, me):
                path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        return
    raise WorkdirError(f"could not take the lock {path}")


def _take_remote(path: epath.Path, me: dict) -> None:
    if path.exists():
        _stale(path, me)
    path.write_text(json.dumps(me) + "\n")
    time.sleep(REMOTE_LOCK_SETTLE_S)
    _, _, holder = _holder(path)
    if holder.get("token") != me["token"]:
        raise WorkdirError(f"workdir {path.parent} was locked at the same time by pid {holder.get('pid')} on host "
                           f"{holder.get('host')}; wait for it, or delete {path} if that run is gone")


@contextlib.contextmanager
def locked(workdir: str | os.PathLike) -> Iterator[epath.Path]:
    """Hold ``workdir/train.lock`` for the duration; raises WorkdirError if another live run holds it."""
    path = as_path(workdir) / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if is_remote(path):
        me["token"] = uuid.uuid4().hex
        _take_remote(path, me)
    else:
        _take_local(path, me)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            held = json.loads(path.read_text())
            if held.get("pid") == me["pid"] and held.get("token") == me.get("token"):
                path.unlink()


def resolved_config(config: Any) -> dict[str, Any]:
    """``config`` as plain JSON data (tuples become lists), as it is saved."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(data, default=str))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, Mapping) and v else {key: v})
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, except the resumable ones. A key one side
    lacks counts as None there: a key added to the config since the run started, at its None default (today's
    behaviour, e.g. method.feature_scale), is no change."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    skip = RESUMABLE_CHANGES + (DATA_KEY,)  # the data identity is compared by RunRecord.check_data
    return [k for k in keys if not any(k == p or k.startswith(p) for p in skip)]


def _shown(changes: list[str]) -> str:
    return ", ".join(changes[:4]) + (f" (+{len(changes) - 4} more)" if len(changes) > 4 else "")


def data_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two data identities (``data.training.data_identity``), in words: a path
    (resolved: another spelling of the same path is no change), the caption file's bytes, the photos used."""
    out = []
    for key, value in current.items():
        old = saved.get(key, "<absent>")
        if old == value:
            continue
        if key == "captions_key":
            out.append(f"caption file {current.get('annotations')} changed (content key {old} -> {value})")
        elif key == "photos_key":
            n, m = saved.get("num_photos"), current.get("num_photos")
            out.append(f"photos under {current.get('images')} changed ({n} -> {m} used, key {old} -> {value})"
                       if n != m else f"photos under {current.get('images')} changed (key {old} -> {value})")
        elif key == "files_key":
            out.append(f"files of {current.get('dataset')} changed (key {old} -> {value})")
        elif key != "num_photos":
            out.append(f"data {key}: {old} -> {value}")
    return out


@dataclasses.dataclass
class RunRecord:
    """A run's ``config.resolved.json``: the config it was started with (``saved``, None for a new run) and
    this start's (``current``, with its data identity under ``DATA_KEY`` once known). ``write()`` it only
    after the restore it describes succeeded: a refused start leaves the workdir's record as it was."""
    workdir: epath.Path
    current: dict[str, Any]
    saved: dict[str, Any] | None
    allow_change: bool = False

    @property
    def path(self) -> epath.Path:
        return self.workdir / CONFIG_FILE

    def check_data(self, identity: Mapping[str, Any] | None) -> None:
        """Record what the run reads; on a resume, refuse (one line) data other than the run started with:
        another caption file or photo set, or the same ones changed in place (unless ``allow_change``)."""
        if identity is None:  # a caller's own iterator: config.data is not what it reads
            return
        self.current[DATA_KEY] = dict(identity)
        before = (self.saved or {}).get(DATA_KEY)
        if before is None:
            if self.saved is not None:
                log.info("%s records no data identity (an older version's): the data from now on is recorded, not "
                         "compared", self.path)
            return
        changed = data_changes(before, identity)
        if changed and not self.allow_change:
            raise WorkdirError(f"resume of {self.workdir} with other data: {_shown(changed)}; use the data it started "
                               "with, another workdir, or --allow-config-change")
        if changed:
            log.info("resuming with other data (allowed): %s", _shown(changed))

    def write(self) -> epath.Path:
        """Replace ``config.resolved.json`` with this start's config, as a whole (``write_text_atomic``)."""
        write_text_atomic(self.path, json.dumps(self.current, indent=1, sort_keys=True) + "\n")
        return self.path


def check_resume(workdir: str | os.PathLike, config: Any, *, resuming: bool, allow_change: bool = False
                 ) -> RunRecord:
    """The run's record; when ``resuming``, first refuse a changed config (WorkdirError naming the keys).
    Writes nothing: ``RunRecord.write`` does, once the restore succeeded."""
    workdir = as_path(workdir)
    path = workdir / CONFIG_FILE
    current = resolved_config(config)
    saved = None
    if resuming and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise WorkdirError(f"{path} is not valid JSON; repair or delete it to resume") from None
        # with a recorded data identity the resolved paths and contents are compared (check_data), not spellings
        changed = [k for k in config_changes(saved, current)
                   if not (DATA_KEY in saved and k in DATA_PATH_KEYS)]
        if changed and not allow_change:
            a, b = _flatten(saved), _flatten(current)
            shown = _shown([f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in changed])
            raise WorkdirError(f"resume of {workdir} with a changed config: {shown}; use the saved "
                               f"config ({path}), another workdir, or --allow-config-change")
        if changed:
            log.info("resuming with a changed config (allowed): %s", ", ".join(changed))
    return RunRecord(workdir, current, saved, allow_change)


def check_workdir(value: Any, *, contents: bool = True) -> epath.Path:
    """``config.workdir`` as a path, if a run may use it: WorkdirError (one line) for an empty value (it would
    be the current directory) and, unless ``contents=False``, for a folder that is not ours (``check_ours``)."""
    if value is None or not str(value).strip():
        raise WorkdirError(f"config.workdir is empty ({value!r}): give the run its own directory "
                           "(--workdir DIR or --config.workdir=DIR)")
    path = as_path(str(value))
    if contents:
        check_ours(path)
    return path


def check_ours(path: epath.Path) -> None:
    """WorkdirError (one line) for a folder that holds files but is not a jax_refine workdir (no
    ``config.resolved.json``; a run stopped before writing it leaves only its lock and an empty checkpoints
    folder, which are ours). A new or empty folder is fine."""
    if not path.is_dir() or (path / CONFIG_FILE).exists():
        return
    entries = sorted(p.name for p in path.iterdir())
    ckpts = path / "checkpoints"
    foreign = [n for n in entries if not (n == LOCK_FILE or (n == ckpts.name and not any(ckpts.iterdir())))]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
        raise WorkdirError(f"workdir {path} is not empty and is not a jax_refine workdir (it holds {shown}; no "
                           f"{CONFIG_FILE}): give the run a new or empty directory")
