#!/usr/bin/env bash
# Checks fedprune's CUDA paths on a GPU host (CI has no GPU): the CUDA tests, the local-training
# benchmark on CPU and on CUDA side by side, and one simulated federation trained on each.
#   scripts/gpu_check.sh [OUT_DIR]      (PYTHON=... to pick the interpreter; default python3)
# Each step's exit status goes to OUT_DIR/status.txt; the script exits non-zero if any failed.
set -uo pipefail
out=${1:-gpu-check}
py=${PYTHON:-python3}
rm -f "$out/status.txt"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

step() {  # step NAME COMMAND...: run it, keep its output, record its exit status
    local name=$1; shift
    echo "== $name"
    "$@" > >(tee "$out/$name.txt") 2>&1
    local rc=$?
    echo "$name $rc" >> "$out/status.txt"
    [ "$rc" -eq 0 ] || failed=1
}

sim_config() {  # a short clean mnist1d federation on the 1-D CNN, the heaviest built-in model
    cat > "$out/sim.toml" <<'TOML'
[simulation]
name = "gpu-check"
dataset = "mnist1d"
model = "cnn1d"
n_clients = 20
seed = 0
[strategy]
method = "fedprune"
rounds = 20
sparsity = 0.8
TOML
}

step environment "$py" -c "import platform, torch, onnxruntime; print(platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU', 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
step cuda_tests "$py" -m pytest -q -p no:cacheprovider -rs tests/edge_agent/test_cuda.py tests/edge_agent/test_training.py
step training_cuda "$py" benchmarks/bench_training.py --device cuda --repeats 3 --out "$out/training_cuda.json"
step training_cpu "$py" benchmarks/bench_training.py --device cpu --repeats 3 --out "$out/training_cpu.json"
sim_config
for device in cuda cpu; do
    step "simulate_$device" bash -c "time '$py' -m fedprune.coordinator.cli simulate --config '$out/sim.toml' --out '$out/sim_$device' --no-progress --device $device"
done
cat "$out/status.txt"
exit $failed
