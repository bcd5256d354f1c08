#!/usr/bin/env bash
# The README's test command (`make test`): bootstrap (venv, torch CPU wheel, fedprune[dev],
# Mosquitto from Debian), then the whole suite. Extra arguments go to pytest.
# --arm64 (and every CI run) first builds the emulated arm64 root of tests/integration/test_arm64.py
# (scripts/arm64.sh, about 2 minutes, then cached in .cache/arm64).
# Exits non-zero on any failure, and also when no test ran (pytest's exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
arm64=0
if [ "${1:-}" = "--arm64" ]; then arm64=1; shift; fi
scripts/bootstrap.sh --extras dev --test-tools
if [ "${CI:-}" = "true" ]; then export HYPOTHESIS_PROFILE=ci; arm64=1; fi
if [ "$arm64" -eq 1 ]; then scripts/arm64.sh; fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
