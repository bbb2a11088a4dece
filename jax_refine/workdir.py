"""What a training workdir holds besides checkpoints: the lock of the run using it and the config it ran with.

``WORKDIR/train.lock``: JSON ``{"host", "pid", "started"}`` of the run holding the workdir. A second run
fails fast naming the holder; a lock whose holder process is dead (same host) is taken over with a message.
``WORKDIR/config.resolved.json``: the resolved config of the run, written at start. A resume compares the
new config with it and refuses changes of anything but the run length, logging, checkpoint cadence,
evaluation, export and mesh settings (``allow_change`` overrides), naming the keys that differ.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

LOCK_FILE = "train.lock"
CONFIG_FILE = "config.resolved.json"
# Keys (dotted prefixes) a resumed run may change: run length, logging, checkpoints, eval, export, mesh, data speed.
RESUMABLE_CHANGES = ("train.epochs", "train.num_steps", "train.export_hf", "log.", "checkpoint.", "eval.",
                     "mesh.", "workdir", "data.num_parallel_calls", "data.prefetch")


class WorkdirError(ValueError):
    """A workdir that cannot be used now (locked, or started with another config); one line."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def locked(workdir: str | Path) -> Iterator[Path]:
    """Hold ``workdir/train.lock`` for the duration; raises WorkdirError if another live run holds it."""
    path = Path(workdir) / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                host, pid = str(holder["host"]), int(holder["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                raise WorkdirError(f"{path} exists but is unreadable: another run may be starting; delete it if "
                                   "no run uses this workdir") from None
            if host == me["host"] and (pid == me["pid"] or not _alive(pid)):
                print(f"[train] taking over the stale lock {path} of pid {pid} on {host} (that process is gone)",
                      flush=True)
                path.unlink(missing_ok=True)
                continue
            raise WorkdirError(f"workdir {path.parent} is in use by pid {pid} on host {host} (since "
                               f"{holder.get('started', '?')}); wait for it, or delete {path} if that run is gone")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        break
    else:
        raise WorkdirError(f"could not take the lock {path}")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == me["pid"]:
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
    """Dotted keys whose values differ between two resolved configs, except the resumable ones."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [k for k in keys if not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)]


def record_config(workdir: str | Path, config: Any, *, resuming: bool, allow_change: bool = False) -> Path:
    """Write ``workdir/config.resolved.json``; when ``resuming``, first refuse a changed config (WorkdirError)."""
    path = Path(workdir) / CONFIG_FILE
    current = resolved_config(config)
    if resuming and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise WorkdirError(f"{path} is not valid JSON; repair or delete it to resume") from None
        changed = config_changes(saved, current)
        if changed and not allow_change:
            a, b = _flatten(saved), _flatten(current)
            shown = ", ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in changed[:4])
            more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
            raise WorkdirError(f"resume of {Path(workdir)} with a changed config: {shown}{more}; use the saved "
                               f"config ({path}), another workdir, or --allow-config-change")
        if changed:
            print(f"[train] resuming with a changed config (allowed): {', '.join(changed)}", flush=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
