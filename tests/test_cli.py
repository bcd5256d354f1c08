"""Both console scripts install, answer --help and --version, and document every exit code."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from fedprune.coordinator import cli as coordinator_cli
from fedprune.edge_agent import cli as agent_cli

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", ["fedprune-coordinator", "fedprune-agent"])
def test_console_script_prints_version_and_help(script: str) -> None:
    out = subprocess.run([BIN / script, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{script} {version('fedprune')}"
    help_text = subprocess.run([BIN / script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "exit codes:" in help_text


@pytest.mark.parametrize("module", [coordinator_cli, agent_cli])
def test_every_exit_code_is_documented_in_help(module) -> None:
    help_text = module.build_parser().format_help()
    for code, meaning in module.EXIT_CODES.items():
        assert f"{code} {meaning.split()[0]}" in " ".join(help_text.split())
    assert {0, 1, 2, 78} <= set(module.EXIT_CODES)


@pytest.mark.parametrize("script", ["fedprune-coordinator", "fedprune-agent"])
def test_unknown_command_is_a_usage_error(script: str) -> None:
    result = subprocess.run([BIN / script, "no-such-command"], capture_output=True, text=True)
    assert result.returncode == 2


def test_stop_request_during_teardown_keeps_a_clean_exit() -> None:
    """The chaos test's race: the daemon finishes its last round and exits by itself while the
    operator (or systemd) sends SIGTERM. The signal lands during interpreter teardown, here from
    an atexit hook, and must not turn exit 0 into death by signal."""
    script = (
        "import atexit, os, signal, time\n"
        "from fedprune.common.cli import new_parser, run_main\n"
        "parser, commands = new_parser('probe', 'probe', {0: 'ok'})\n"
        "commands.add_parser('done').set_defaults(handler=lambda args: 0)\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.2)))\n"
        "run_main('probe', parser, ['done'], ())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
