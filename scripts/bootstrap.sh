#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: virtualenv, torch CPU wheel first (so pip never
# resolves a multi-GB CUDA build), then fedprune with the requested extras, then Mosquitto when asked.
#   scripts/bootstrap.sh [--extras dev,coordinator] [--mosquitto]
set -euo pipefail
cd "$(dirname "$0")/.."

extras="coordinator"
want_mosquitto=0
while [ $# -gt 0 ]; do
  case "$1" in
    --extras) extras="$2"; shift 2 ;;
    --mosquitto) want_mosquitto=1; shift ;;
    *) echo "bootstrap: unknown argument $1" >&2; exit 2 ;;
  esac
done

venv="${FEDPRUNE_VENV:-.venv}"
python="${PYTHON:-python3}"
torch_version="${FEDPRUNE_TORCH:-2.13.0}"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ "$want_mosquitto" -eq 1 ] && ! command -v mosquitto >/dev/null 2>&1; then
  echo "bootstrap: installing Mosquitto from Debian's packages"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# This machine's pip config names local mirrors that may be absent; pip says so once per package.
pip_install() { "${pip[@]}" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "bootstrap: installing torch==$torch_version (CPU wheel) before anything else"
  pip_install "torch==$torch_version"
fi

stamp="$venv/.fedprune-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing fedprune[$extras]"
  pip_install -e ".[$extras]"
  touch "$stamp"
fi
