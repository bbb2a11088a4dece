"""Test-session set-up shared by every test file.

The whole session runs with 8 fake CPU devices so sharded code paths can be compared with one
device (use `jax.devices()[:1]` for the single-device mesh). The environment is set before JAX or
TensorFlow are imported anywhere.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

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
