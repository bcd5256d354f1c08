"""Both console scripts install, answer --help and --version, and document every exit code."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from coordinator import cli as coordinator_cli
from edge_agent import cli as agent_cli

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
