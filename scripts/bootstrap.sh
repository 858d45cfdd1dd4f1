#!/usr/bin/env bash
# Create the project's virtual environment (.venv) once and install iceaggr into it, editable,
# with the dev and notebook extras. Re-running is cheap: it reinstalls only when pyproject.toml changed.
#
# torch: on a machine whose python3 already has torch (a GPU box with a CUDA build), the venv sees
# the system site-packages so that torch is reused, never replaced. Otherwise torch is pinned to
# 2.13.0, which on the CPU machines of this project resolves to the local CPU wheel
# (a bare `torch` would pull the newest CUDA build, several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.iceaggr-installed

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: $PY already has torch $("$PY" -c 'import torch; print(torch.__version__)'); reusing it"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  fi
  "$VENV/bin/python" -m pip install -q -e ".[dev,notebooks]"
  touch "$STAMP"
  echo "bootstrap: installed iceaggr into $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
fi
