"""No file tracked by git may be a copy of a file under ../shared/data (the data sets' licences forbid
redistributing them with the project; see ../shared/data/README.md).

Compared by content (SHA-256), so a renamed or moved copy is caught too. Only shared files whose byte size
equals a tracked file's size are hashed, which keeps the check to a second or two.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SHARED_DATA


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tracked_files(repo: Path) -> list[Path]:
    """The files `git ls-files` lists (those present in the working tree)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    return [repo / name for name in out.decode().split("\0") if name and (repo / name).is_file()]


def borrowed(repo: Path, shared: Path) -> list[tuple[str, str]]:
    """(tracked path, shared path) for every tracked file identical in content to a file under `shared`."""
    by_size: dict[int, list[Path]] = {}
    for path in tracked_files(repo):
        by_size.setdefault(path.stat().st_size, []).append(path)
    digest_of: dict[Path, str] = {}  # tracked files hashed lazily, only when a shared file matches in size
    found = []
    for dirpath, _, names in os.walk(shared):
        for name in names:
            p = Path(dirpath) / name
            candidates = by_size.get(p.stat().st_size)
            if not candidates:
                continue
            digest = _sha256(p)
            for c in candidates:
                if c not in digest_of:
                    digest_of[c] = _sha256(c)
                if digest_of[c] == digest:
                    found.append((str(c.relative_to(repo)), str(p)))
    return found


def test_no_tracked_file_is_a_copy_of_shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA}")
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    copies = borrowed(REPO_ROOT, SHARED_DATA)
    assert not copies, f"{len(copies)} tracked file(s) copied from {SHARED_DATA}, e.g. {copies[:3]}"


def test_the_check_finds_a_copy(tmp_path):
    """The check itself: a committed copy (renamed) is found, a different file of the same size is not."""
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    (shared / "sub" / "photo.jpg").write_bytes(b"\xff\xd8 pretend jpeg bytes")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "copied.bin").write_bytes(b"\xff\xd8 pretend jpeg bytes")
    (repo / "other.bin").write_bytes(b"\xff\xd8 pretend JPEG bytes")  # same size, other content
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "copied.bin", "other.bin"], cwd=repo, check=True)
    assert borrowed(repo, shared) == [("copied.bin", str(shared / "sub" / "photo.jpg"))]
