#!/usr/bin/env bash
# Long fuzz run for release checks: every target of tests/fuzz/ with 10^5+ inputs.
# Coverage-guided with atheris when it is installed (not a project dependency:
# `.venv/bin/pip install atheris`), else the seeded mutator of tests/fuzz/engine.py.
# New interesting inputs land in tests/fuzz/corpus/<target>/ (atheris: those that added
# coverage; review and commit the small ones). Exits non-zero on the first target with a finding;
# atheris names a crashing input crash-<sha1>: rename it to <name>.bin to replay it in CI.
#
#   scripts/fuzz.sh                 all targets, 100000 inputs each
#   RUNS=1000000 scripts/fuzz.sh codec daemon
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-100000}
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(codec sparse_values masks envelope chunk reassembler replay channel daemon)
fi
export OMP_NUM_THREADS=1
status=0
for target in "${TARGETS[@]}"; do
  echo "== $target: $RUNS inputs"
  if "$PY" -c "import atheris" 2>/dev/null; then
    work=$(mktemp -d)
    cp tests/fuzz/corpus/"$target"/*.bin "$work"/ 2>/dev/null || true
    # -timeout: a hang is a finding; -rss_limit_mb: so is unbounded memory.
    if ! "$PY" -m tests.fuzz.engine "$target" --atheris -runs="$RUNS" -timeout=10 -rss_limit_mb=3072 \
        -max_len=4096 -artifact_prefix="tests/fuzz/corpus/$target/" "$work"; then
      status=1
    fi
    # libFuzzer kept in $work only inputs that added coverage; keep the small ones as regression inputs
    find "$work" -type f ! -name '*.bin' -size -2049c -exec sh -c 'cp "$1" "tests/fuzz/corpus/$2/$(basename "$1").bin"' _ {} "$target" \;
    rm -rf "$work"
  else
    "$PY" -m tests.fuzz.engine "$target" --iterations "$RUNS" --save || status=1
  fi
  [ $status -eq 0 ] || { echo "finding in $target: inputs saved under tests/fuzz/corpus/$target/"; exit 1; }
done
