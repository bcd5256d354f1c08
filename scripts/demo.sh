#!/usr/bin/env bash
# The README's main command (`make demo`): bootstrap, then a real federation on this machine
# (embedded broker, coordinator daemon, 8 agent processes). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --extras coordinator
exec .venv/bin/python -m fedprune.coordinator.lab.demo "$@"
