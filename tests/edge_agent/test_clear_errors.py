"""``fedprune-agent`` stops with exit 78 and a message naming the file or key and the fix, never a
traceback: damaged data, ``infer`` inputs, a taken HTTP port, an unwritable state directory, a
broker that refuses the bundle's login (tests/integration/test_misfits.py). Each runs the installed
console script on real files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.config import load_config
from fedprune.coordinator.export import build_release, export_onnx
from fedprune.common.models import ModelSpec, init_params
from fedprune.edge_agent.release_store import ReleaseStore

BIN = Path(sys.executable).parent
SPEC = ModelSpec("mlp", (1, 8, 8), 10, args={"hidden": (16,)})


def dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_agent(tmp_path: Path, *, broker_url: str | None = None, broker_password: str = "", ca_file: Path | None = None,
                **agent: object) -> Path:
    """A coordinator's keys, one enrolled device's bundle, 64-feature data and an agent.toml."""
    url = broker_url or f"mqtt://127.0.0.1:{dead_port()}"
    enrollment.init(config_path=tmp_path / "coordinator.toml", state_dir=tmp_path / "state", federation="fed1",
                    broker_url=url, embedded_broker=False,
                    settings={"broker": {"ca_file": str(ca_file)}} if ca_file else None)
    config = load_config(tmp_path / "coordinator.toml", env={})
    enrollment.enroll(config, "dev-0", tmp_path / "bundle.json", broker_password=broker_password)
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "part.npz", X=np.zeros((20, 64), np.float32), y=np.arange(20) % 10)
    sections = {"agent": {"bundle": str(tmp_path / "bundle.json"), "data": str(data),
                          "state_dir": str(tmp_path / "agent-state"), "heartbeat_s": 1.0, **agent}}
    path = tmp_path / "agent.toml"
    path.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items())
                            for s, t in sections.items()))
    return path


def agent(*args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedprune-agent"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 78, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, result.stderr[-3000:]


def test_a_truncated_npz_in_the_data_directory_stops_run_naming_the_file(tmp_path: Path) -> None:
    config = write_agent(tmp_path)
    part = tmp_path / "data" / "part.npz"
    part.write_bytes(part.read_bytes()[:-40])  # the zip's central directory is cut off
    assert_user_error(agent("run", "--config", config), f"{part}: damaged or truncated .npz archive")


def test_data_and_its_copy_in_another_format_stop_run(tmp_path: Path) -> None:
    config = write_agent(tmp_path)
    (tmp_path / "data" / "part.csv").write_text("0,1\n")
    assert_user_error(agent("run", "--config", config), "part.csv and part.npz", "keep one of them")


def test_an_unwritable_state_dir_stops_run_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")  # even root cannot make a directory inside a file
    config = write_agent(tmp_path, state_dir=str(tmp_path / "a-file" / "state"))
    assert_user_error(agent("run", "--config", config), "[agent] state_dir", "not writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_read_only_state_dir_stops_run_naming_the_key(tmp_path: Path) -> None:
    state = tmp_path / "ro"
    state.mkdir(mode=0o500)
    config = write_agent(tmp_path, state_dir=str(state))
    assert_user_error(agent("run", "--config", config), "[agent] state_dir", "not writable")


@pytest.mark.parametrize("in_child", [True, False])
def test_cuda_without_a_gpu_stops_run_naming_the_key(tmp_path: Path, in_child: bool) -> None:
    """`simulate --device cuda` refuses it at start; so does a device, instead of declining every round."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU torch can see")
    config = write_agent(tmp_path, device="cuda", train_in_subprocess=in_child)
    assert_user_error(agent("run", "--config", config), '[agent] device = "cuda"', "torch sees no CUDA device",
                      'set it to "auto"')


def test_a_taken_inference_port_stops_run_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_agent(tmp_path, train_in_subprocess=True)
        with config.open("a") as handle:
            handle.write(f"[inference]\nhttp_port = {port}\n")
        assert_user_error(agent("run", "--config", config), f"[inference] http_port {port}", "Address already in use")


@pytest.fixture
def released(tmp_path: Path) -> Path:
    """An agent config whose model store holds a release of a 64-input model."""
    config = write_agent(tmp_path)
    onnx = export_onnx(SPEC, init_params(SPEC, seed=0), metadata={"federation": "fed1", "round": 1, "mask_version": 0})
    ReleaseStore(tmp_path / "agent-state" / "models", keep=3).accept(build_release(1, onnx))
    return config


def test_infer_reads_a_csv_with_a_header_row(tmp_path: Path, released: Path) -> None:
    samples = tmp_path / "samples.csv"
    samples.write_text(",".join(f"f{i}" for i in range(64)) + "\n" + "\n".join(",".join(["0.5"] * 64) for _ in range(3)))
    result = agent("infer", "--config", released, "--input", samples)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "row,prediction" and len(result.stdout.splitlines()) == 4


def test_infer_names_a_missing_input_and_one_of_the_wrong_width(tmp_path: Path, released: Path) -> None:
    assert_user_error(agent("infer", "--config", released, "--input", tmp_path / "nope.csv"), "nope.csv: no such file")
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("1,2,3\n4,5,6\n")
    assert_user_error(agent("infer", "--config", released, "--input", narrow),
                      "narrow.csv: inputs have shape (2, 3); the model expects (N, 1, 8, 8) or flat rows (N, 64)",
                      "pass --labels")



class _SilentLink:
    """What ``_check_bundle_accepted`` reads from an MqttLink: connected, never a task."""

    refusal = None
    connected = True

    def stats(self):
        from fedprune.common.mqtt import LinkStats

        return LinkStats(connects=1)


def test_an_agent_that_never_hears_a_task_says_what_to_check_less_and_less_often(tmp_path: Path, caplog) -> None:
    """Over a broker that accepts any login, a bundle of another federation hears nothing at all:
    not final (the coordinator may be down), but said, with the bundle to check."""
    from fedprune.edge_agent.config import load_config as load_agent_config
    from fedprune.edge_agent.daemon import SILENCE_WARNING_S, AgentDaemon

    now = [1000.0]
    daemon = AgentDaemon(load_agent_config(write_agent(tmp_path), env={}), clock=lambda: now[0])
    daemon.link = _SilentLink()
    with caplog.at_level("WARNING", logger="fedprune.agent"):
        for _ in range(int(7 * SILENCE_WARNING_S)):
            now[0] += 1.0
            daemon._check_bundle_accepted()
    warnings = [r.getMessage() for r in caplog.records if "event=no_task_yet" in r.getMessage()]
    assert [w.split()[1] for w in warnings] == ["waited_s=300", "waited_s=900", "waited_s=2100"]
    assert f"bundle={tmp_path / 'bundle.json'}" in warnings[0] and "federation=fed1" in warnings[0]


def test_an_audit_log_that_cannot_be_written_costs_messages_not_the_agent(tmp_path: Path, caplog) -> None:
    """A full or broken disk under audit.jsonl: the register and status are not sent (the audit
    comes with each publish), the loop and the shutdown carry on, and each failure is logged."""
    from fedprune.coordinator.lab.memory_broker import MemoryBroker
    from fedprune.edge_agent.config import load_config as load_agent_config
    from fedprune.edge_agent.daemon import AgentDaemon
    from fedprune.protocol.messages import State

    config = write_agent(tmp_path, train_in_subprocess=True)
    (tmp_path / "agent-state" / "audit.jsonl").mkdir(parents=True)  # os.open for appending fails: IsADirectoryError
    daemon = AgentDaemon(load_agent_config(config, env={}))
    daemon.start(MemoryBroker().connect("a", daemon.subscriptions, on_message=daemon.enqueue, will=daemon.last_will))
    daemon.step()
    daemon._publish_status(State.IDLE, "heartbeat")
    daemon.finish()
    assert "event=register_not_sent" in caplog.text and "event=status_not_sent" in caplog.text
