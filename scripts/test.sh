#!/usr/bin/env bash
# The README's test command (`make test`): bootstrap (venv, torch CPU wheel, fedprune[dev],
# Mosquitto from Debian), then the whole suite. Extra arguments go to pytest.
# Exits non-zero on any failure, and also when no test ran (pytest's exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --extras dev --test-tools
if [ "${CI:-}" = "true" ]; then export HYPOTHESIS_PROFILE=ci; fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
