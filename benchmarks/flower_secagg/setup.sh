#!/usr/bin/env bash
# Create build/flower-venv (git-ignored) with the pinned Flower; leaves the project's .venv alone.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$ROOT/build/flower-venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$HERE/requirements.txt"
"$VENV/bin/python" -c "import flwr, numpy; print('flwr', flwr.__version__, 'numpy', numpy.__version__)"
