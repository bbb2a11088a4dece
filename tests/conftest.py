"""Test-session set-up shared by every test file.

The whole session runs with 8 fake CPU devices so sharded code paths can be compared with one
device (use `jax.devices()[:1]` for the single-device mesh). The environment is set before JAX or
TensorFlow are imported anywhere.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# 8 fake devices, and XLA's CPU backend (LLVM) at -O0, for the session and its subprocesses: most of the CPU time is
# compiling tiny train steps that then run for a fraction of a second, and -O0 halves a compile (a scanned,
# rematted tiny CLIP step: 6.2 s -> 3.1 s, its run 0.12 s -> 0.17 s). The HLO and XLA's own passes are the
# same; only LLVM's machine-code optimisation is skipped, so results differ at most by float rounding, which
# every tolerance here is derived to cover. Set the level yourself in XLA_FLAGS (2 is XLA's default) to test the
# optimised code instead (docs/testing.md).
_flags = os.environ.get("XLA_FLAGS", "")
for _name, _value in (("xla_force_host_platform_device_count", 8), ("xla_backend_optimization_level", 0)):
    if _name not in _flags:  # a level or device count you set yourself wins
        _flags += f" --{_name}={_value}"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One JAX persistent compilation cache for the whole session, this process and every subprocess it starts
# (they inherit the environment): the same tiny model's train/eval steps are compiled by dozens of tests,
# CLI subprocesses and demo stages, and a compile is most of a tiny step's cost on CPU. The cache is keyed by
# the HLO, the devices and the flags, so a hit is the very executable a fresh compile would give. It is new
# for each session (nothing carries over between runs) and removed at exit; set JAX_COMPILATION_CACHE_DIR
# yourself to keep one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jax_refine_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CIFAR10_DIR = SHARED_DATA / "cifar10"


COCO_MINI_DIR = SHARED_DATA / "coco_mini"


def require_shared_data(path: Path) -> Path:
    """`path` under ../shared/data, or: FAIL in CI (env CI=true: missing data must not pass as skipped), skip
    elsewhere."""
    if not path.exists():
        message = f"real data not found at {path} (../shared/data beside the project)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; CI=true, so this is a failure, not a skip")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The real CIFAR-10 JPEGs beside the project (read-only; copy before corrupting)."""
    return require_shared_data(CIFAR10_DIR)


@pytest.fixture(scope="session")
def coco_mini_dir() -> Path:
    """Real MS-COCO 2017 photos and captions in the original format (read-only)."""
    return require_shared_data(COCO_MINI_DIR)


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP written by transformers' PyTorch `CLIPModel.save_pretrained` (safetensors)."""
    from hf_fixtures import write_hf_clip

    return write_hf_clip(tmp_path_factory.mktemp("tiny_clip"), "tiny", seed=0)


@pytest.fixture
def tfds_online(monkeypatch):
    """For tests that mock TFDS (`tfds.testing.mock_data`): the offline fail-fast check sees a network."""
    from jax_refine.data import sources

    monkeypatch.setattr(sources, "download_reachable", lambda timeout=3.0: True)


def slow(*values, id: str | None = None):
    """One `parametrize` case for the full suite only: `[(8, 16), slow(33, 64)]` keeps the first case in the
    fast tier (`-m "not slow"`) and the second in `./run.sh test`. Its test id is the one the plain values give."""
    return pytest.param(*values, marks=pytest.mark.slow, id=id)
