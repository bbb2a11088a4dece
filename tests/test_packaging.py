"""`pip install .` ships the configs: a wheel built from the sources holds them, and the config command of
the installed package works from another directory (no checkout on the path)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO_ROOT

SHIPPED = {"__init__", "clip_refine", "default", "demo", "presets", "study", "tiny_test"}


def test_the_wheel_ships_the_configs_and_the_installed_config_command_runs_elsewhere(tmp_path):
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO_ROOT / "jax_refine", src / "jax_refine", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("jax_refine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"jax_refine/configs/{n}.py" for n in SHIPPED} <= set(names)
    assert "jax_refine/assets/templates.json" in names and not any(n.startswith("configs/") for n in names)

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    where = subprocess.run([sys.executable, "-c", "import jax_refine; print(jax_refine.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=300)
    assert where.stdout.strip() == str(site / "jax_refine" / "__init__.py")  # the installed copy, not the checkout
    out = subprocess.run([sys.executable, "-m", "jax_refine", "config", "clip_refine:model=vitb32"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    c = json.loads(out.stdout)
    assert (c["model"]["name_or_path"], c["method"]["name"], c["workdir"]) == (
        "openai/clip-vit-base-patch32", "clip_refine", "outputs/clip_refine_vitb32_coco")
