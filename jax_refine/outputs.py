"""Output directories that never delete what they should not: written aside, renamed into place.

Every command that writes a directory of results (export, demo, evaluate/compare reports) goes through
``output_dir``: the files are written into a new sibling temporary directory which is renamed onto the
target when complete, so a crash leaves the target as it was. An existing non-empty target is refused
unless ``overwrite`` is given, and never replaced when it is, or holds, a training workdir, an Orbax
checkpoint or a git repository -- unless it is this command's own earlier output (marked with
``OWNER_FILE``), e.g. a demo directory whose stages are training workdirs.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from etils import epath

from jax_refine import workdir as workdir_lib

OWNER_FILE = ".jax_refine_output.json"  # {"kind": "demo"|"export"|"report"}: written by output_dir
# Names that mark a directory as something we must never replace: (name, what it means).
PROTECTED_MARKERS = ((".git", "a git repository"), ("_CHECKPOINT_METADATA", "an Orbax checkpoint"),
                     ("checkpoints", "a training workdir"), ("config.resolved.json", "a training workdir"),
                     ("train.lock", "a training workdir"))


class OutputError(ValueError):
    """A target directory that must not be written; the message names it and why."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def own_kind(path: Path | epath.Path) -> str | None:
    """The ``kind`` recorded by ``output_dir`` in ``path`` (None if it is not our output)."""
    try:
        return json.loads((path / OWNER_FILE).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def protected_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` (local or ``gs://``) must never be replaced ("holds a git repository at ..."), or None.

    Walks the tree under ``path`` (stops at the first hit); a path that does not exist is not protected.
    """
    remote = workdir_lib.is_remote(path)
    root = workdir_lib.as_path(path) if remote else Path(path)
    if not root.is_dir():
        return None
    for dirpath, dirnames, filenames in (root.walk() if remote else os.walk(root)):
        names = set(dirnames) | set(filenames)
        for marker, what in PROTECTED_MARKERS:
            if marker in names:
                where = dirpath if remote else Path(dirpath)
                if marker == "checkpoints" and not (where / marker).is_dir():
                    continue
                rel = "" if os.fspath(where).rstrip("/") == os.fspath(root).rstrip("/") else f" (at {where})"
                return f"is or holds {what}{rel}"
        if not remote:
            dirnames[:] = [d for d in dirnames if not Path(dirpath, d).is_symlink()]
    return None


def check_target(target: str | os.PathLike, *, kind: str, overwrite: bool) -> Path | epath.Path:
    """Refuse ``target`` (one-line ``OutputError``) unless it is absent, empty, or ``overwrite`` is allowed.

    Returns the absolute target. A file (not a directory) at ``target`` is refused like a non-empty dir.
    A URL (``gs://...``) is taken for an export only, returned as an ``epath.Path`` (its writer uploads a
    finished local directory: ``train.export_hf``); reports are local.
    """
    remote = workdir_lib.is_remote(target)
    if remote and kind != "export":
        raise OutputError(f"{kind} output {target}: a URL is not supported for a report (only an export may go to "
                          "a bucket); write it to a local directory")
    out = workdir_lib.as_path(target) if remote else Path(target).expanduser().absolute()
    if remote:
        workdir_lib.check_bucket(out)
    elif out.is_symlink():  # write where the link points: the link stays, the directory it names is replaced
        out = out.resolve()
    if not out.exists():
        return out
    if out.is_dir() and not any(out.iterdir()):
        return out
    if own_kind(out) != kind or not out.is_dir():
        reason = protected_reason(out) if out.is_dir() else None
        if reason:
            raise OutputError(f"refusing to write {kind} output to {out}: it {reason}; choose another --out "
                              "(it is never replaced, even with --overwrite)")
    if not overwrite:
        raise OutputError(f"{out} already exists and is not empty: pass --overwrite to replace it, or choose "
                          "another --out")
    return out


@contextlib.contextmanager
def output_dir(target: str | Path, *, kind: str, overwrite: bool = False, mark: bool = False) -> Iterator[Path]:
    """Yield a new temporary directory beside ``target``; on success it replaces ``target`` as a whole.

    ``kind`` names the writer ("export", "demo", "report"). ``mark`` writes OWNER_FILE, so that this
    output may later be replaced (with ``overwrite``) although it holds training workdirs (the demo's).
    On an exception the temporary directory is removed and ``target`` is untouched. Directory
    permissions follow the umask (not mkdtemp's 0700).
    """
    if workdir_lib.is_remote(target):  # a bucket has no rename: its writers upload a finished local directory
        raise OutputError(f"{kind} output {target}: output_dir writes local directories only")
    out = check_target(target, kind=kind, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        if mark:
            (tmp / OWNER_FILE).write_text(json.dumps({"kind": kind}) + "\n")
        yield tmp
        _umask_permissions(tmp)
        check_target(out, kind=kind, overwrite=overwrite)  # again: something may have appeared meanwhile
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(out: Path) -> list[Path]:
    """Remove what an earlier ``output_dir`` of ``out`` left when its process was killed: the sibling
    ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>`` directories of processes that are gone (a live one's are
    its work in progress). Returns them; one line says so."""
    gone = []
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*")):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(?:tmp-(\d+)-.+|old-(\d+))", path.name)
        if m and not workdir_lib._alive(int(m.group(1) or m.group(2))):  # the lock's test
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            gone.append(path)
    if gone:
        print(f"[output] removed {len(gone)} leftover(s) of an earlier, killed write of {out}: "
              f"{', '.join(p.name for p in gone)}", flush=True)
    return gone


def describe(out: Path | epath.Path) -> str:
    """``"N files, X MB: a, b, ..."`` of the directory ``out`` (local or a bucket): what a writer wrote."""
    root = workdir_lib.as_path(out)
    files = sorted((r / n for r, _, names in root.walk() for n in names if n != OWNER_FILE), key=str)
    size = sum(f.stat().length for f in files)
    names = [str(f.relative_to(root)) for f in files]
    return f"{len(names)} files, {size / 1e6:.1f} MB: {', '.join(names)}"


def _umask_permissions(root: Path) -> None:
    """Give files written with private modes (safetensors writes 0600) the umask's normal permissions."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(Path(dirpath, name), os.stat(Path(dirpath, name)).st_mode & 0o7777 | (0o777 & ~mask))
        for name in filenames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                os.chmod(p, os.stat(p).st_mode & 0o7777 | (0o666 & ~mask))


def rebase(value, tmp: Path, out: Path):
    """``value`` (str/Path, or lists/dicts of them) with the prefix ``tmp`` replaced by ``out``."""
    if isinstance(value, dict):
        return {k: rebase(v, tmp, out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rebase(v, tmp, out) for v in value)
    if isinstance(value, Path) and value.is_relative_to(tmp):
        return out / value.relative_to(tmp)
    if isinstance(value, str) and value.startswith(str(tmp)):
        return str(out) + value[len(str(tmp)):]
    return value
