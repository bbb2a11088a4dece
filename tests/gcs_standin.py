"""A local filesystem stand-in for ``gs://`` buckets, for tests: no network, the bytes land under a directory.

``gcs_standin(root)`` (context manager) maps ``gs://BUCKET/KEY`` onto ``root/BUCKET/KEY`` for the two ways our
code and Orbax reach a bucket:
- ``etils.epath`` (our workdir files, Orbax's directories, metadata and commit markers): ``mock_epath`` with
  each backend function's path arguments rewritten. epath picks TensorFlow's gfile for ``gs://`` whenever
  TensorFlow is installed, ignoring ``mock_epath``; ``EPATH_USE_TF=false`` turns that off for the stand-in.
- TensorStore (Orbax's array writes and reads): Orbax builds a ``{"driver": "gcs", "bucket", "path"}`` kvstore
  spec for a ``gs://`` path and hands it straight to TensorStore's own GCS client, never through epath. The
  stand-in replaces Orbax's ``gcs_utils.get_kvstore_for_gcs`` with a ``file`` driver spec under ``root``.
- Orbax asks Google Cloud Storage whether a bucket has a hierarchical namespace before listing or deleting
  steps (``google-cloud-storage``, a network call): the stand-in's buckets are flat (answers False).
Anything that still reaches TensorStore's real GCS driver fails at once (its endpoint is set to a closed port).

``activate_from_env()``: the same, for a subprocess, when ``JAX_REFINE_TEST_GCS_ROOT`` is set.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

ENV = "JAX_REFINE_TEST_GCS_ROOT"
PREFIX = "gs://"
WORKDIR = "gs://test-bucket/run"  # the tests' bucket workdir (root/test-bucket/run under the stand-in)
_ACTIVE: list[contextlib.ExitStack] = []  # keeps activate_from_env's stand-in alive for the process


def _vanished_ok(fn, path, exc_info) -> None:
    """`shutil.rmtree`'s onerror: an entry that is already gone is fine; anything else is raised."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


@contextlib.contextmanager
def gcs_standin(root: str | Path) -> Iterator[Path]:
    """Route ``gs://`` through epath and Orbax's TensorStore specs to ``root`` (created); yields ``root``."""
    from etils.epath import gpath
    from etils.epath.testing import mock_epath
    from orbax.checkpoint._src.path import gcs_utils  # test-only: Orbax has no public hook for its bucket calls

    from jax_refine import workdir

    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)

    def local(path) -> str:
        s = os.fspath(path)
        return str(root / s[len(PREFIX):]) if s.startswith(PREFIX) else s

    def remote(path: str) -> str:
        return PREFIX + str(Path(path).relative_to(root)) if str(path).startswith(str(root) + os.sep) else path

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    def open_(original, path, mode):  # a bucket has no directories: writing an object needs no parent
        if mode.startswith(("w", "a")):
            os.makedirs(os.path.dirname(local(path)), exist_ok=True)
        return original(local(path), mode)

    def rmtree(original, path):
        """A bucket's prefix delete lists and deletes objects: one that a concurrent delete (Orbax removes
        several temporary paths at once) already removed is no error there; a missing top still is."""
        target = local(path)
        if not os.path.lexists(target):
            return original(target)
        shutil.rmtree(target, onerror=_vanished_ok)

    def glob(original, pattern):
        return [remote(p) for p in original(local(pattern))]

    def walk(original, top, **kwargs):
        for dirpath, dirs, files in original(local(top), **kwargs):
            yield remote(dirpath), dirs, files

    def kvstore(path: str) -> dict:
        return {"driver": "file", "path": local(path)}

    fns = {name: one for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "stat")}
    fns.update(open=open_, copy=two, rename=two, replace=two, glob=glob, walk=walk, rmtree=rmtree)
    gpath._is_tf_installed.cache_clear()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"EPATH_USE_TF": "false",
                                                         "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:9"}))
        stack.callback(gpath._is_tf_installed.cache_clear)
        stack.enter_context(mock_epath(**fns))
        stack.enter_context(mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore))
        stack.enter_context(mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False))
        stack.enter_context(mock.patch.object(workdir, "get_bucket", lambda name: None))  # our own check's call
        yield root


def hide_google_cloud_storage(monkeypatch) -> None:
    """Make ``from google.cloud import storage`` fail with ImportError for this test, installed or not (what a
    machine without the package sees); no bucket is ever asked."""
    import sys

    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # an import of it raises ImportError
    cloud = sys.modules.get("google.cloud")
    if cloud is not None:  # `from google.cloud import storage` takes an attribute set by an earlier import
        monkeypatch.delattr(cloud, "storage", raising=False)
    from orbax.checkpoint._src.path import gcs_utils

    gcs_utils.get_bucket.cache_clear()  # a bucket client cached by an earlier call would answer instead


def activate_from_env() -> None:
    """Enter ``gcs_standin($JAX_REFINE_TEST_GCS_ROOT)`` for the rest of the process, if the variable is set."""
    if os.environ.get(ENV) and not _ACTIVE:
        stack = contextlib.ExitStack()
        stack.enter_context(gcs_standin(os.environ[ENV]))
        _ACTIVE.append(stack)
