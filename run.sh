#!/usr/bin/env bash
# jax_refine's entry point.
#   ./run.sh                 set up .venv and run the offline demo (CPU, a few minutes)
#   ./run.sh test [ARGS]     set up .venv with the test extras and run the test suite (pytest ARGS)
#   ./run.sh COMMAND ...     any `python -m jax_refine` command: train, evaluate, compare, export, prepare-data
# Commands run in the caller's directory (relative --out/--config/--workdir paths are the caller's); the
# venv and the package are found beside this script.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
VENV="${JAX_REFINE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

setup() {  # setup REQUIREMENTS_FILE: create the venv and install what changed since the last run
  local req="$ROOT/$1" stamp
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  stamp="$VENV/.installed-$(cat "$ROOT"/requirements*.txt | sha256sum | cut -c1-16)-$(basename "$req")"
  if [ ! -f "$stamp" ]; then
    echo "[run.sh] installing $req into $VENV (first run only) ..."
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$req"
    if [ "$(basename "$req")" = requirements-test.txt ]; then
      "$VENV/bin/python" -m pip install -q --no-deps open-clip-torch==3.3.0
    fi
    touch "$stamp"
  fi
}

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
case "${1:-demo}" in
  test)
    shift || true
    setup requirements-test.txt
    cd "$ROOT"
    # two workers, one test file each at a time (module fixtures stay in one process); pytest alone keeps
    # ~1 of 2 cores busy. JAX_REFINE_TEST_WORKERS=0 runs in one process; a later -n in ARGS wins.
    # the whole tests/ folder unless ARGS name test files or folders themselves (tests/x.py, tests/x.py::name)
    folder=tests
    for arg in "$@"; do
      case "$arg" in tests|tests/*|*.py|*.py::*)
        folder=
        # pytest-xdist drops pytest's own "file or directory not found" line: say it here, once
        if [ ! -e "${arg%%::*}" ]; then
          echo "error: test file or folder not found: ${arg%%::*} (paths are relative to $ROOT)" >&2
          exit 2
        fi ;;
      esac
    done
    exec "$VENV/bin/python" -m pytest -q -n "${JAX_REFINE_TEST_WORKERS:-2}" --dist loadfile "$@" ${folder:+"$folder"}
    ;;
  *)
    setup requirements.txt
    [ $# -eq 0 ] && set -- demo --overwrite  # the default demo replaces its own earlier output
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    exec "$VENV/bin/python" -m jax_refine "$@"
    ;;
esac
