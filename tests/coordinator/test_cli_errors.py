"""``fedprune-coordinator`` stops with exit 78 and a message naming the key and the fix, never a
traceback: a model that cannot take its input_shape (every command), a taken metrics or embedded
broker port, an unwritable state directory. Each runs the installed console script."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from fedprune.coordinator.fleet import enrollment
from fedprune.coordinator.fleet.broker import EmbeddedBroker
from fedprune.common.configkit import ConfigError

BIN = Path(sys.executable).parent
CNN1D_13 = ("[federation] model 'cnn1d' with arguments {}: ValueError: cnn1d needs input_shape (C, L), got (13,): "
            "e.g. [1, 13] for one channel")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "coordinator.toml"
    enrollment.init(config_path=path, state_dir=tmp_path / "state", federation="fed1",
                    broker_url=f"mqtt://127.0.0.1:{free_port()}", embedded_broker=False)
    return path


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def coordinator(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedprune-coordinator"), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 78, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, result.stderr[-3000:]


def test_a_model_that_cannot_take_its_input_shape_stops_run(config: Path) -> None:
    """Before: `run` died with a traceback. Whether a factory builds is known only by building it
    (torch), so `run` refuses it; `status` and `enroll` need no model and keep working."""
    result = coordinator("run", "--config", config, "--set", "federation.model=cnn1d",
                         "--set", "federation.input_shape=[13]")
    assert_user_error(result, CNN1D_13)


@pytest.mark.parametrize("setting,needle", [
    ("federation.model=mypkg.nets", "model='mypkg.nets': expected a built-in (mlp, cnn2d, cnn1d) or an import path"),
    ("federation.model_args={ hidden = { a = 1 } }", "[federation] model_args: model argument hidden"),
    ("federation.task=ranking", "federation.task 'ranking': expected one of"),
])
def test_a_malformed_model_is_refused_by_every_command(config: Path, setting: str, needle: str) -> None:
    for command in (("status",), ("run",)):
        assert_user_error(coordinator(*command, "--config", config, "--set", setting), needle)


def test_a_factory_that_is_not_installed_stops_run_naming_the_fix(config: Path) -> None:
    assert_user_error(coordinator("run", "--config", config, "--set", "federation.model=no_such_pkg.nets:make"),
                      "cannot import 'no_such_pkg.nets'", "install the package that provides it")


def test_simulate_refuses_the_model_with_the_same_rule(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text('[simulation]\ndataset = "digits"\nmodel = "cnn1d"\n')
    assert_user_error(coordinator("simulate", "--config", path, "--out", tmp_path / "out"),
                      "[federation] model 'cnn1d' with arguments {}: ValueError: cnn1d needs input_shape (C, L), got (1, 8, 8): "
                      "e.g. [1, 64]")


def test_a_taken_metrics_port_stops_run_naming_the_key(config: Path, taken_port: int) -> None:
    assert_user_error(coordinator("run", "--config", config, "--set", f"metrics.port={taken_port}"),
                      f"[metrics] port {taken_port}: cannot listen on 127.0.0.1:{taken_port}", "-1 to turn it off")


def test_a_taken_embedded_broker_port_stops_run_naming_the_key(config: Path, taken_port: int) -> None:
    """Before: a 60-line amqtt traceback and exit 1, which systemd restarts forever."""
    result = coordinator("run", "--config", config, "--set", "broker.embedded=true",
                         "--set", f"broker.url=mqtt://127.0.0.1:{taken_port}", "--set", "metrics.port=-1")
    assert_user_error(result, f"[broker] url: the embedded broker cannot listen on 127.0.0.1:{taken_port}",
                      "embedded = false")
    assert result.stderr.count("\n") == 1


def test_the_embedded_broker_refuses_a_taken_port_and_still_starts_on_a_free_one(taken_port: int) -> None:
    with pytest.raises(ConfigError, match=f"127.0.0.1:{taken_port}"):
        EmbeddedBroker(port=taken_port).start()
    with EmbeddedBroker() as broker:
        assert broker.port != taken_port


def test_an_unwritable_state_dir_stops_run_and_enroll_naming_the_key(config: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")  # even root cannot make a directory inside a file
    where = tmp_path / "a-file" / "state"
    assert_user_error(coordinator("run", "--config", config, "--set", f"state.dir={where}", "--set", "metrics.port=-1"),
                      f"[state] dir {where}: cannot write", "set [state] dir to a writable directory")
    assert_user_error(coordinator("enroll", "dev-0", "--config", config, "--set", f"state.dir={where}",
                                  "--out", tmp_path / "b.json"), f"[state] dir {where}")


def test_held_out_data_that_does_not_fit_the_model_stops_run_naming_the_key(config: Path, tmp_path: Path) -> None:
    holdout = tmp_path / "holdout.csv"
    holdout.write_text("a,b,label\n0.5,1.5,3.25\n1.0,2.0,1.5\n")
    result = coordinator("run", "--config", config, "--set", f"evaluation.data={holdout}",
                         "--set", "federation.input_shape=[2]")
    assert_user_error(result, "[evaluation] data", "does not fit the model", "labels must be integers")
    missing = coordinator("run", "--config", config, "--set", f"evaluation.data={tmp_path / 'none.npz'}")
    assert_user_error(missing, "[evaluation] data:", "none.npz")
