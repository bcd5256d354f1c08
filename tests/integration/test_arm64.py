"""The agent as aarch64 code, in an emulated Raspberry Pi user space (scripts/arm64.sh: Debian
bookworm arm64, Python 3.11, the agent installed from aarch64 wheels, run by qemu-aarch64-static
without binfmt): the protocol and training unit tests, and a real federation in which an emulated
agent (training in a child process, as installed on a Pi) trains beside native ones with a native
coordinator over Mosquitto with TLS, installs the release and serves it with ONNX Runtime,
predicting what the native agents predict.

Run by `make test-arm64`, which builds the root first (about 2 minutes, then cached); skipped
when it is not built (FEDPRUNE_ARM64 names another directory than .cache/arm64).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from fedprune.coordinator.lab.localfed import LocalFederation
from tests.integration.mosquitto import MosquittoBroker

ROOT = Path(__file__).resolve().parents[2]
ARM64 = Path(os.environ.get("FEDPRUNE_ARM64", ROOT / ".cache" / "arm64"))
PYTHON = ARM64 / "bin" / "python3"
TIMINGS = ARM64 / "timings.json"

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def emulated_root() -> None:
    if not (ARM64 / "ready").exists():
        message = f"no emulated arm64 root in {ARM64}: run `make test-arm64` (scripts/arm64.sh builds it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI builds it in scripts/test.sh, so it must be there")
        pytest.skip(message)


def record(name: str, value: object) -> None:
    """Each check's wall time and the federation's outcome beside the build's (report.json), for firmware_notes/."""
    timings = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    timings[name] = round(value, 1) if isinstance(value, float) else value
    TIMINGS.write_text(json.dumps(timings, indent=1) + "\n")


def test_the_emulated_python_is_aarch64_with_the_agents_packages() -> None:
    result = subprocess.run([str(PYTHON), "-c", "import platform, torch, onnxruntime, fedprune.edge_agent.daemon; "
                             "print(platform.machine(), torch.__version__, onnxruntime.__version__)"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("aarch64 "), result.stdout


def test_protocol_and_training_unit_tests_pass_as_aarch64_code() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/protocol",
         "tests/edge_agent/test_agent_core.py", "tests/edge_agent/test_feedback.py", "tests/edge_agent/test_training.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
        env={**os.environ, "FEDPRUNE_ARM64_TEST": "1", "HYPOTHESIS_PROFILE": "ci"})
    record("unit_tests_s", time.monotonic() - started)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    passed = int(re.search(r"(\d+) passed", result.stdout).group(1))
    assert passed > 200 and "failed" not in result.stdout


def test_an_emulated_agent_trains_beside_native_ones_and_serves_the_release(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    emulated = mosquitto.devices[0].username
    fed = LocalFederation(
        root=tmp_path, broker=mosquitto.access(), devices=tuple(d.username for d in mosquitto.devices), rounds=4,
        federation=mosquitto.federation, partition="iid", agent_commands={emulated: (str(PYTHON), "-m", "fedprune.edge_agent.cli")},
        # As the installer sets it up on a Pi: training in a short-lived child, started emulated too.
        device_sections={emulated: {"agent": {"train_in_subprocess": True}}},
        settings={"broker": {"username": mosquitto.coordinator.username}, "metrics": {"port": -1},
                  "rounds": {"deadline_s": 600.0, "reannounce_s": 30.0}})
    fed.prepare()
    started = time.monotonic()
    fed.start()
    try:
        agent = fed.processes[emulated]
        deadline = time.monotonic() + 30  # the launcher execs the emulator: the agent's process is qemu's
        while not os.readlink(f"/proc/{agent.pid}/exe").endswith("qemu-aarch64-static"):
            assert time.monotonic() < deadline and agent.poll() is None, fed.log(emulated)
            time.sleep(0.1)
        history = fed.wait_for_round(4, timeout=1200)
        record("federation_4_rounds_s", time.monotonic() - started)
        assert fed.processes["coordinator"].wait(timeout=120) == 0
        fed.wait_for_release(1, timeout=300)
    finally:
        codes = fed.stop_all()
    assert "aarch64" not in fed.log("coordinator")
    assert all(entry["received"] == 3 and emulated in entry["update_bytes"] for entry in history), history
    scores = history[-1]["scores"]
    record("final_scores", {d: {"q": round(s["q"], 4), "r": round(s["r"], 4)} for d, s in scores.items()})
    record("final_accuracy", history[-1]["accuracy"])
    native_q = [scores[d]["q"] for d in scores if d != emulated]
    assert scores[emulated]["q"] >= min(native_q) - 0.1, scores  # its updates count like the native ones'
    assert codes[emulated] == 0, fed.log(emulated)[-3000:]

    samples = fed.root / "data" / "holdout.npz"
    started = time.monotonic()
    on_arm = fed.infer(emulated, samples)
    record("inference_s", time.monotonic() - started)
    native = fed.infer(mosquitto.devices[1].username, samples)
    assert on_arm.returncode == 0 and native.returncode == 0, on_arm.stderr + native.stderr
    arm_predictions = (fed.root / "devices" / emulated / "predictions.csv").read_text()
    native_predictions = (fed.root / "devices" / mosquitto.devices[1].username / "predictions.csv").read_text()
    assert arm_predictions == native_predictions  # the same release, the same answers from ONNX Runtime on aarch64
