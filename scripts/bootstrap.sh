#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: virtualenv, torch CPU wheel first (so pip never
# resolves a multi-GB CUDA build), then fedprune with the requested extras, then the test suite's Debian tools when asked
# (Mosquitto for the broker tests, shellcheck for the installer, Chromium for the status page).
#   scripts/bootstrap.sh [--extras dev,coordinator] [--test-tools]
set -euo pipefail
cd "$(dirname "$0")/.."

extras="coordinator"
want_test_tools=0
while [ $# -gt 0 ]; do
  case "$1" in
    --extras) extras="$2"; shift 2 ;;
    --test-tools) want_test_tools=1; shift ;;
    *) echo "bootstrap: unknown argument $1" >&2; exit 2 ;;
  esac
done

venv="${FEDPRUNE_VENV:-.venv}"
python="${PYTHON:-python3}"
torch_version="${FEDPRUNE_TORCH:-2.13.0}"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Another apt-get (unattended upgrades on a fresh machine) may hold the dpkg lock: wait for it.
apt_get() { as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"; }

if [ "$want_test_tools" -eq 1 ]; then
  missing=()
  command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto mosquitto-clients)
  command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
  [ -x /usr/bin/chromium ] || missing+=(chromium)  # the status page's browser test (driven by playwright)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)  # promtool checks deploy/observability's rules
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]} from Debian's packages"
    apt_get update -qq
    apt_get install -y -qq "${missing[@]}" >/dev/null
    # The prometheus package enables a server on :9090 where systemd runs; the tests need only promtool.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
      as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  fi
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
