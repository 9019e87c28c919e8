#!/usr/bin/env bash
# Create .venv and install gossipfl with its test tools. Idempotent: a second run with an unchanged
# pyproject.toml returns at once.
#
#   PYTHON=python3.12 scripts/setup.sh       # pick the interpreter (>= 3.11)
#   GOSSIPFL_TORCH="torch==2.5.1" ...         # pick the torch release installed first
#   GOSSIPFL_TORCH_INDEX=https://download.pytorch.org/whl/cpu ...   # e.g. a CPU-only build elsewhere
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${GOSSIPFL_VENV:-.venv}"
TORCH_SPEC="${GOSSIPFL_TORCH:-torch==2.13.0}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: gossipfl needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
    exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"

# checkov, the policy checker of tests/test_k8s.py, in a venv of its own: its pins would downgrade ours
# (packaging, networkx, python-dateutil).
CHECKOV_SPEC="checkov==3.3.30"
if [ "$(cat "$VENV/tools/checkov/.spec" 2>/dev/null)" != "$CHECKOV_SPEC" ]; then
    echo "setup: installing $CHECKOV_SPEC into $VENV/tools/checkov"
    "$PYTHON" -m venv --clear "$VENV/tools/checkov"
    "$VENV/tools/checkov/bin/python" -m pip install -q --disable-pip-version-check "$CHECKOV_SPEC"
    echo "$CHECKOV_SPEC" >"$VENV/tools/checkov/.spec"
fi

stamp="$VENV/.gossipfl-setup"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC ${GOSSIPFL_TORCH_INDEX:-}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

# torch first and pinned: left to the resolver, 'torch>=2.2' in a fresh venv pulls the newest,
# multi-GB CUDA build. An already installed torch is kept.
if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC into $VENV"
    "$PY" -m pip install -q ${GOSSIPFL_TORCH_INDEX:+--index-url "$GOSSIPFL_TORCH_INDEX"} "$TORCH_SPEC"
fi
echo "setup: installing gossipfl (editable) and its test tools into $VENV"
"$PY" -m pip install -q -e ".[test]"
echo "$want" >"$stamp"
