"""The one content key of the files something reads: a run's data, a prepared data set, an evaluation cache.

``files_key(paths, root=..., content=...)`` hashes, for each file in order, its name (relative to ``root``,
so the same data under another spelling of its directory -- relative, absolute, through a symlink -- keys
the same) and either its bytes (``content=True``: caption files, class-name files; a few MB) or its
``(size, mtime_ns, inode)`` (``content=False``: photos; hashing every photo of a set is too slow for a
check at each start: Flickr8k's 8,091 photos take 0.4-0.6 s to hash and 0.05-0.1 s to stat, COCO 2017's
118k photos would take about a minute to hash; see benchmarks/fingerprint_cost.py). Replacing a photo by
another one of the same byte size changes its mtime (and, written by a rename, its inode); renaming a
folder changes the names, and so the labels that class folders give.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

KEY_DIGITS = 16  # hex digits of a key (64 bits: a collision between two versions of one data set is no concern)
MISSING = "missing"  # what a file that does not exist contributes (its absence is part of the content)


def _entry(path: str, content: bool) -> str:
    """``sha256=<hex>`` of the file's bytes, or ``<size>:<mtime_ns>:<inode>``; MISSING if there is none."""
    try:
        if content:
            with open(path, "rb") as f:
                return "sha256=" + hashlib.file_digest(f, "sha256").hexdigest()
        st = os.stat(path)  # follows symlinks: a linked photo keys as its target
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return MISSING
    except OSError as e:  # e.g. ELOOP, a symlink cycle: no photo, but a change of what the folder holds
        return f"unreadable:{e.errno}"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _name(path: str, base: str | None) -> str:
    """``path`` relative to the directory ``base`` (ending in a separator), else its resolved absolute path."""
    if base is None:
        return os.path.realpath(path)
    full = os.path.abspath(path)
    # a prefix cut where it applies (relpath costs ~20 us a file: a third of a second for Flickr8k's photos)
    return full[len(base):] if full.startswith(base) else os.path.relpath(full, base)


def files_key(paths: Iterable[str | os.PathLike], *, root: str | os.PathLike | None = None,
              content: bool = False) -> str:
    """KEY_DIGITS hex digits over each file of ``paths`` in the given order: its name (relative to ``root``
    if given, else its resolved absolute path) and its bytes (``content``) or ``(size, mtime_ns, inode)``."""
    base = os.path.join(os.path.abspath(root), "") if root is not None else None
    h = hashlib.sha256()
    for p in paths:
        path = os.fspath(p)  # named as given under root (not resolved: a linked photo keeps its own name)
        h.update(f"{_name(path, base)}\0{_entry(path, content)}\n".encode())
    return h.hexdigest()[:KEY_DIGITS]


def tree_files(root: str | os.PathLike) -> list[str]:
    """Every file under the directory ``root``, sub-folders included, sorted by path (names of directories
    and files starting with "." skipped: editor and OS litter)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [os.path.join(dirpath, n) for n in filenames if not n.startswith(".")]
    return sorted(out)
