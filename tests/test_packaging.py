"""What `pip install` gives a user: the wheel's contents, every imported package declared, and the CLI and the
losses working from a real install in a brand-new venv, with and without the `train` extra.

The install test resolves dependencies with pip as a user's install does, from the package index this machine
(and CI) is configured with, constrained to requirements.txt's pins so it takes the versions already in pip's
cache; nothing of the suite's own site-packages is visible in that venv, so an undeclared import fails there.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SHIPPED = {"clip_refine", "default", "demo", "study", "tiny_test"}  # configs/, installed as jax_refine/configs/
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# Imported only on a path that says what to install when it is missing (hf.py's old PyTorch .bin reader, plots'
# optional UMAP): not a dependency of any extra.
OPTIONAL = {"torch", "umap"}


def _requirement_names(reqs: list[str]) -> set[str]:
    """Distribution names of PEP 508 strings, normalized ("ml_dtypes>=0.5" -> "ml-dtypes")."""
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _imports(path: Path) -> set[str]:
    """Dotted names of every absolute import in a file (`from a.b import c` -> "a.b.c"), function-level ones
    included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {f"{node.module}.{a.name}" for a in node.names}  # the name too: a private one is caught
    return names


def _package_imports() -> dict[str, set[str]]:
    """{module path inside jax_refine/ or configs/ (both ship in the wheel): its imported module names}."""
    paths = sorted((REPO_ROOT / "jax_refine").rglob("*.py")) + sorted((REPO_ROOT / "configs").glob("*.py"))
    return {str(p.relative_to(REPO_ROOT)): _imports(p) for p in paths}


def test_every_imported_package_is_declared_and_no_private_module_is_imported():
    core = _requirement_names(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = core | _requirement_names(extras["train"]) | _requirement_names(extras["gcs"])
    dists = md.packages_distributions()  # top-level import name -> the installed distributions providing it
    stdlib = sys.stdlib_module_names
    undeclared, private = {}, {}
    for where, names in _package_imports().items():
        for name in names:
            top = name.split(".")[0]
            if top in stdlib or top in ("jax_refine", "__future__") or top in OPTIONAL:
                continue
            provided = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
            if top == "google":  # a namespace: google.cloud.storage is google-cloud-storage, google.protobuf ...
                provided = {"-".join(name.split(".")[:3]).replace("_", "-")}
            if not provided & declared:
                undeclared.setdefault(name, []).append(where)
            if any(part.startswith("_") for part in name.split(".")[1:]):
                private.setdefault(name, []).append(where)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert not private, f"private modules of other packages imported: {private}"


def test_the_cli_hint_names_every_train_extra_module_and_the_core_imports_only_core_packages():
    from jax_refine import cli

    core = {"jax", "numpy"}
    third_party = set()
    for where, names in _package_imports().items():
        tops = {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"jax_refine", "__future__"}
        if where in ("jax_refine/losses.py", "jax_refine/metrics.py", "jax_refine/__init__.py"):
            assert tops <= core, f"{where} imports {tops - core}: the core install has only jax and numpy"
        third_party |= tops
    missing = third_party - core - OPTIONAL - {"google"} - cli.TRAIN_EXTRA_MODULES
    assert not missing, f"cli.TRAIN_EXTRA_MODULES lacks {missing}: a core-only install would show a traceback"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (setuptools writes build/ and *.egg-info beside them)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for folder in ("jax_refine", "configs"):
        shutil.copytree(REPO_ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp / "dist"), str(src)], check=True, timeout=300)
    found, = (tmp / "dist").glob("jax_refine-*.whl")
    return found


def test_the_wheel_ships_configs_assets_and_the_console_script(wheel):
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    assert {f"jax_refine/configs/{n}.py" for n in SHIPPED} <= names
    assert "jax_refine/assets/templates.json" in names and not any(n.startswith("configs/") for n in names)
    # pyproject lists the packages by hand (configs/ is mapped in): every file of the checkout must be in the wheel
    files = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "jax_refine").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    files |= {f"jax_refine/configs/{p.name}" for p in (REPO_ROOT / "configs").glob("*.py")}
    assert not files - names, f"not in the wheel (add the folder to pyproject's packages): {files - names}"
    entry_points, = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "jax-refine = jax_refine.cli:main" in z.read(entry_points).decode()
    metadata, = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = z.read(metadata).decode()
    assert "Provides-Extra: train" in text and "Provides-Extra: gcs" in text
    assert "Requires-Dist: etils[epath]" in text and "extra == \"train\"" in text


def _readme_losses_snippet() -> str:
    """The README's losses snippet (the python block that imports jax_refine.losses), as a user copies it."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    snippet, = [b for b in blocks if "from jax_refine import losses" in b][:1]
    return snippet + "\nprint('grads', grads.shape, float(loss))\n"


def _constraints(tmp: Path) -> Path:
    """requirements.txt as a pip constraints file (constraints take no extras and no -r lines)."""
    lines = [re.sub(r"\[[^]]*\]", "", ln) for ln in (REPO_ROOT / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith(("#", "-"))]
    path = tmp / "constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_a_fresh_venv_install_core_then_train_extra(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_ = venv / "bin"
    pip = [str(bin_ / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install",
           "-c", str(_constraints(tmp_path))]
    elsewhere = tmp_path / "elsewhere"  # not the checkout: only the installed copy can be imported
    elsewhere.mkdir()
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2",
           "JAX_PLATFORMS": "cpu"}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)

    # 1. core only: jax + numpy. The losses snippet runs; every CLI command is one line and exit 2.
    subprocess.run([*pip, str(wheel)], check=True, timeout=900)
    snippet = run(str(bin_ / "python"), "-c", _readme_losses_snippet())
    assert snippet.returncode == 0, snippet.stderr[-3000:]
    assert snippet.stdout.startswith("grads (8, 512) "), snippet.stdout  # (B, D) of the README's features
    assert run(str(bin_ / "jax-refine"), "--help").returncode == 0  # argparse only
    for argv in (["config", "clip_refine:model=vitb32"], ["train", "--config", "tiny_test"], ["demo"]):
        out = run(str(bin_ / "jax-refine"), *argv)
        assert out.returncode == 2, (argv, out.stderr[-3000:])
        err = out.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: `{argv[0]}` needs the package "), err
        assert err[0].endswith("pip install 'jax_refine[train]'  (from a clone: pip install '.[train]')"), err

    # 2. with the train extra: the console script and `python -m jax_refine` resolve the paper config.
    subprocess.run([*pip, f"{wheel}[train]"], check=True, timeout=1800)
    for cmd in ([str(bin_ / "jax-refine")], [str(bin_ / "python"), "-m", "jax_refine"]):
        help_ = run(*cmd, "--help")
        assert help_.returncode == 0 and "prepare-data" in help_.stdout, help_.stderr[-3000:]
        out = run(*cmd, "config", "clip_refine:model=vitb32")
        assert out.returncode == 0, out.stderr[-3000:]
        c = json.loads(out.stdout)
        assert (c["model"]["name_or_path"], c["method"]["name"], c["workdir"], c["train"]["batch_size"]) == (
            "openai/clip-vit-base-patch32", "clip_refine", "outputs/clip_refine_vitb32_coco", 512)
    where = run(str(bin_ / "python"), "-c", "import jax_refine; print(jax_refine.__file__)")
    assert where.stdout.strip().startswith(str(venv)), where.stdout  # the installed copy, not the checkout
    # every shipped config and an old name by name, from the installed copy of configs/
    found = run(str(bin_ / "python"), "-c", "from jax_refine import config; print(config.configs_dir()); "
                "print(*config.shipped_configs()); [config.load_config(n) for n in config.shipped_configs()]")
    assert found.returncode == 0, found.stderr[-3000:]
    folder, listed = found.stdout.strip().splitlines()
    assert folder.startswith(str(venv)) and folder.endswith("jax_refine/configs") and set(listed.split()) == SHIPPED
    old = run(str(bin_ / "jax-refine"), "config", "hycd_vitb32_coco:gpu1")
    assert old.returncode == 0 and json.loads(old.stdout)["workdir"] == "outputs/hycd_vitb32_coco", old.stderr[-3000:]
    # a user's config file starts from the base config of the installed package
    (elsewhere / "mine.py").write_text("from jax_refine import config_base\n\n\ndef get_config(arg=None):\n"
                                       "    c = config_base.get_config(arg)\n    c.train.batch_size = 7\n    return c\n")
    mine = run(str(bin_ / "jax-refine"), "config", "mine.py:gpu8")
    assert mine.returncode == 0, mine.stderr[-3000:]
    c = json.loads(mine.stdout)
    assert (c["train"]["batch_size"], c["mesh"]["shape"]["fsdp"]) == (7, 8)
