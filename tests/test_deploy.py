"""The deployment kit: systemd units (parsed, and verified by systemd-analyze where it exists),
the agent installer (shellcheck, dry runs that change nothing), and the Docker files' inputs.
Nothing here needs systemd running, Docker or root, and nothing modifies the host."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = {
    "fedprune-agent.service": "/opt/fedprune/venv/bin/fedprune-agent run --config /etc/fedprune/agent.toml",
    "fedprune-coordinator.service":
        "/opt/fedprune/venv/bin/fedprune-coordinator run --config /etc/fedprune/coordinator.toml",
}
INSTALLER = DEPLOY / "install-agent.sh"


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section -> key -> every value in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None and _ == "=", f"{path.name}: {line!r} outside a section or without '='"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def last(section: dict[str, list[str]], key: str) -> str:
    assert key in section, f"missing {key}="
    return section[key][-1]


HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes", "LockPersonality": "yes", "RestrictSUIDSGID": "yes",
    "RestrictRealtime": "yes", "RestrictNamespaces": "yes", "CapabilityBoundingSet": "",
    "SystemCallArchitectures": "native", "Restart": "on-failure", "UMask": "0077",
    "User": "fedprune", "Group": "fedprune", "ConfigurationDirectory": "fedprune",
    # Measured: torch's oneDNN JIT maps pages writable+executable while training (deploy/README.md).
    "MemoryDenyWriteExecute": "no",
}


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_is_hardened_and_runs_the_cli(name: str) -> None:
    service = unit(DEPLOY / "systemd" / name)["Service"]
    for key, value in HARDENING.items():
        assert last(service, key) == value, f"{name}: {key}"
    assert last(service, "ExecStart") == UNITS[name]
    assert last(service, "StateDirectory") == name.removesuffix(".service")
    assert set(last(service, "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in service["SystemCallFilter"]
    assert re.fullmatch(r"[0-9]+s", last(service, "RestartSec"))
    assert "DynamicUser" not in service


@pytest.mark.parametrize("name,cli", [("fedprune-agent.service", "fedprune.edge_agent.cli"),
                                      ("fedprune-coordinator.service", "fedprune.coordinator.cli")])
def test_restart_is_suppressed_only_for_documented_permanent_failures(name: str, cli: str) -> None:
    exit_codes = pytest.importorskip(cli).EXIT_CODES
    codes = {int(c) for c in last(unit(DEPLOY / "systemd" / name)["Service"], "RestartPreventExitStatus").split()}
    assert codes == {2, 78}
    assert codes <= set(exit_codes), f"{cli}.EXIT_CODES must document {sorted(codes)}"


def test_agent_resource_limits_suit_a_raspberry_pi_4() -> None:
    service = unit(DEPLOY / "systemd" / "fedprune-agent.service")["Service"]
    assert last(service, "MemoryMax") == "1G"
    assert last(service, "CPUQuota") == "300%"
    assert last(service, "Nice") == "10"
    assert last(service, "IOSchedulingClass") == "idle"


def test_jetson_drop_in_only_opens_the_gpu() -> None:
    service = unit(DEPLOY / "systemd" / "jetson-cuda.conf")["Service"]
    assert last(service, "PrivateDevices") == "no"
    assert last(service, "SupplementaryGroups") == "video"
    assert set(service) <= {"PrivateDevices", "SupplementaryGroups", "MemoryHigh", "MemoryMax"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_units_and_drop_in(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point copies at a real executable, keep everything else.
    for name, command in UNITS.items():
        text = (DEPLOY / "systemd" / name).read_text()
        executable = command.split()[0]
        (tmp_path / name).write_text(text.replace(executable, shutil.which("true") or "/bin/true"))
    dropins = tmp_path / "fedprune-agent.service.d"
    dropins.mkdir()
    shutil.copy(DEPLOY / "systemd" / "jetson-cuda.conf", dropins)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--recursive-errors=no", *UNITS],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )
    assert result.returncode == 0, result.stderr


# --- install-agent.sh ----------------------------------------------------------------------------


def test_installer_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(INSTALLER)], check=True, timeout=30)
    assert os.access(INSTALLER, os.X_OK)


def test_shell_scripts_are_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:  # `make test` installs it; a bare pytest run may lack it
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not installed: scripts/bootstrap.sh --test-tools installs it")
        pytest.skip("shellcheck not installed (scripts/bootstrap.sh --test-tools)")
    scripts = [INSTALLER, *sorted((DEPLOY.parent / "scripts").glob("*.sh")), DEPLOY.parent / ".ci" / "run"]
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    bundle = tmp_path / "device-7.json"
    bundle.write_text('{"format": "fedprune-bundle/1", "device_id": "device-7"}')
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\n")
    return {"bundle": bundle, "config": config}


def dry_run(inputs: dict[str, Path], *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    args = ["bash", str(INSTALLER), "--bundle", str(inputs["bundle"]), "--config", str(inputs["config"]),
            "--python", shutil.which("python3") or "python3", "--dry-run", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)


def test_an_arm64_pi_gets_the_newest_cpu_only_torch_from_pypi(inputs: dict[str, Path], tmp_path: Path) -> None:
    """From 2.11 on PyPI's aarch64 torch is a CUDA build (2-3 GB of NVIDIA libraries a Pi cannot use)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "uname").write_text('#!/bin/sh\n[ "$1" = -m ] && echo aarch64 || exec /usr/bin/uname "$@"\n')
    (shim / "uname").chmod(0o755)
    result = dry_run(inputs, "--platform", "pi", env={**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert "torch==2.10.0" in result.stdout and "torch==2.13.0" not in result.stdout
    assert "download.pytorch.org" not in result.stdout


def test_dry_run_on_a_pi_prints_every_step_and_changes_nothing(inputs: dict[str, Path]) -> None:
    existed = {p: p.exists() for p in (Path("/opt/fedprune/venv"), Path("/etc/fedprune/agent.toml"))}
    result = dry_run(inputs, "--platform", "pi")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    steps = [
        "useradd --system", "-m venv /opt/fedprune/venv", "pip install", "torch==2.13.0",
        f"install -m 0600 -o fedprune -g fedprune {inputs['bundle']} /etc/fedprune/bundle.json",
        "/etc/fedprune/agent.toml", "/etc/systemd/system/fedprune-agent.service",
        "systemctl daemon-reload", "systemctl enable --now fedprune-agent.service",
    ]
    positions = [out.find(step) for step in steps]
    assert -1 not in positions, [s for s, p in zip(steps, positions) if p == -1]
    assert out.find("torch==2.13.0") < out.find(str(ROOT)), "torch is installed before fedprune"
    assert "jetson-cuda.conf" not in out
    assert {p: p.exists() for p in existed} == existed


def test_jetson_needs_nvidias_torch_wheel(inputs: dict[str, Path]) -> None:
    refused = dry_run(inputs, "--platform", "jetson")
    assert refused.returncode == 2 and "NVIDIA" in refused.stderr
    wheel = "/srv/wheels/torch-2.3.0a0+40ec155e58.nv24.03.13384722-cp310-cp310-linux_aarch64.whl"
    result = dry_run(inputs, "--platform", "jetson", "--torch-spec", wheel, "--no-start")
    assert result.returncode == 0, result.stderr
    assert wheel in result.stdout and "jetson-cuda.conf" in result.stdout
    assert "torch==2.13.0" not in result.stdout
    assert "systemctl enable fedprune-agent.service" in result.stdout


def test_data_dir_gets_a_read_only_drop_in(inputs: dict[str, Path]) -> None:
    # Any existing directory outside /tmp (the service's /tmp is private) stands in for the data;
    # not the checkout, which CI may clone under /tmp.
    data = Path("/usr/share").resolve()
    result = dry_run(inputs, "--platform", "pi", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert f"ReadOnlyPaths={data}" in result.stdout
    assert "ProtectHome=yes" in result.stdout


@pytest.mark.parametrize("change,message", [
    (lambda i: i["bundle"].write_text("{}"), "not a fedprune enrollment bundle"),
    (lambda i: i["config"].unlink(), "config"),
])
def test_bad_inputs_are_refused_before_any_step(inputs: dict[str, Path], change, message: str) -> None:
    change(inputs)
    result = dry_run(inputs, "--platform", "pi")
    assert result.returncode == 2
    assert message in result.stderr and "+ " not in result.stdout


def test_data_in_tmp_is_refused(inputs: dict[str, Path]) -> None:
    result = dry_run(inputs, "--platform", "pi", "--data-dir", "/tmp")
    assert result.returncode == 2 and "PrivateTmp" in result.stderr


def test_unknown_argument_is_a_usage_error(inputs: dict[str, Path]) -> None:
    assert dry_run(inputs, "--frobnicate").returncode == 2


# --- Docker (not built here: no engine in CI; deploy/README.md has the commands) -----------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.coordinator", "Dockerfile.agent"])
def test_dockerfile_copies_only_what_exists(dockerfile: str) -> None:
    text = (DEPLOY / "docker" / dockerfile).read_text()
    sources = [s for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE) for s in line.split()[:-1]]
    assert sources, "no COPY found"
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} (context: repository root)"
    from fedprune.common.configkit import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert folders <= set(sources), f"{dockerfile}: the install needs every package folder {sorted(folders)}"
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^USER fedprune$", text, re.MULTILINE)
    torch_first = text.find("torch==$TORCH_VERSION")
    assert -1 < torch_first < text.find("COPY protocol"), "torch is installed before fedprune"


def test_compose_builds_the_coordinator_beside_mosquitto_2() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    build = services["coordinator"]["build"]
    context = (DEPLOY / "docker" / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).is_file()
    assert set(compose["volumes"]) == {"mosquitto-data", "coordinator-state", "prometheus-data", "grafana-data"}
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith((".", "/"))}
    assert named == set(compose["volumes"]), "every named volume is declared and used"
    used_secrets = {name for s in services.values() for name in s.get("secrets", [])}
    assert used_secrets == set(compose["secrets"]), "every secret is declared and used"
    for secret in compose["secrets"].values():
        path = secret["file"]
        assert path.startswith("./secrets/"), path
    # The secrets directory the operator fills (deploy/README.md) is never committed.
    assert "secrets/" in (DEPLOY / "docker" / ".gitignore").read_text().split()


def test_the_model_package_is_installed_beside_fedprune_with_torch_pinned(inputs: dict[str, Path]) -> None:
    result = dry_run(inputs, "--platform", "generic", "--requirement", "mypkg==1.2.0",
                     "--requirement", "/srv/wheels/sensors-0.1-py3-none-any.whl")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "mypkg==1.2.0" in line)
    assert str(ROOT) in line and "/srv/wheels/sensors-0.1-py3-none-any.whl" in line and "torch==" in line
