#!/usr/bin/env bash
# jax_refine's entry point.
#   ./run.sh                 set up .venv and run the offline demo (CPU, a few minutes)
#   ./run.sh test [ARGS]     set up .venv with the test extras and run the test suite (pytest ARGS)
#   ./run.sh COMMAND ...     any `python -m jax_refine` command: train, evaluate, compare, export, prepare-data
set -euo pipefail
cd "$(dirname "$0")"
VENV="${JAX_REFINE_VENV:-.venv}"
PY="${PYTHON:-python3}"

setup() {  # setup REQUIREMENTS_FILE: create the venv and install what changed since the last run
  local req="$1" stamp
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  stamp="$VENV/.installed-$(cat requirements*.txt | sha256sum | cut -c1-16)-$(basename "$req")"
  if [ ! -f "$stamp" ]; then
    echo "[run.sh] installing $req into $VENV (first run only) ..."
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$req"
    if [ "$req" = requirements-test.txt ]; then
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
    exec "$VENV/bin/python" -m pytest -q "$@" tests
    ;;
  *)
    setup requirements.txt
    [ $# -eq 0 ] && set -- demo
    exec "$VENV/bin/python" -m jax_refine "$@"
    ;;
esac
