"""The layering of docs/DESIGN.md, checked by walking each module's AST.

protocol <- edge_agent <- coordinator; pure cores never touch torch, paho, files or the clock.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROTOCOL_ALLOWED = {"numpy", "msgpack", "cryptography"}
CORE_MODULES = {
    "edge_agent.agent", "edge_agent.guard", "edge_agent.privacy",
    "coordinator.masks", "coordinator.contribution", "coordinator.aggregation",
    "coordinator.strategy", "coordinator.rounds", "coordinator.registry",
}
IO_MODULES = {"torch", "onnx", "onnxruntime", "onnxscript", "paho", "amqtt", "socket", "subprocess", "requests"}
IO_CALLS = {"open"}
IO_ATTRIBUTES = {("os", "environ"), ("time", "time"), ("time", "monotonic"), ("datetime", "now")}


def modules() -> list[tuple[str, Path]]:
    found = []
    for package in ("protocol", "edge_agent", "coordinator"):
        for path in sorted((ROOT / package).rglob("*.py")):
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found.append((dotted.removesuffix(".__init__"), path))
    return found


def imports_and_io(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    imported: set[str] = set()
    io_uses: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in IO_CALLS:
            io_uses.add(f"{node.func.id}()")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in IO_ATTRIBUTES:
                io_uses.add(f"{node.value.id}.{node.attr}")
    return imported, io_uses


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("dotted,path", modules(), ids=[m for m, _ in modules()])
def test_module_respects_the_layer_table(dotted: str, path: Path) -> None:
    imported, io_uses = imports_and_io(path)
    package = top(dotted)
    if package == "protocol":
        bad = {m for m in imported if top(m) in IO_MODULES | {"edge_agent", "coordinator"}}
        bad |= {m for m in imported if top(m) not in PROTOCOL_ALLOWED | {"protocol"} and not _stdlib(m)}
        assert not bad, f"{dotted} imports {sorted(bad)}: protocol is pure (stdlib, numpy, msgpack, cryptography)"
        assert not io_uses, f"{dotted} uses {sorted(io_uses)}: protocol takes `now` and bytes from its caller"
    if package == "edge_agent":
        assert not {m for m in imported if top(m) == "coordinator"}, f"{dotted} imports the coordinator"
    if dotted in CORE_MODULES:
        bad = {m for m in imported if top(m) in IO_MODULES}
        shells = {m for m in imported if top(m) in {"edge_agent", "coordinator"} and m not in CORE_MODULES}
        assert not bad, f"core {dotted} imports {sorted(bad)}"
        assert not shells, f"core {dotted} imports shells {sorted(shells)}"
        assert not io_uses, f"core {dotted} uses {sorted(io_uses)}: time and randomness arrive as arguments"


def _stdlib(name: str) -> bool:
    import sys

    return top(name) in sys.stdlib_module_names or top(name) == "__future__"


def test_the_walk_finds_the_packages() -> None:
    names = {m for m, _ in modules()}
    assert {"protocol", "edge_agent", "coordinator", "protocol.layout"} <= names


def test_operator_commands_load_neither_the_daemon_nor_paho() -> None:
    """enroll, revoke, provision, status and export work on the state directory alone; the MQTT
    client and the daemon (with its import of releases) stay out of them."""
    import subprocess
    import sys

    probe = ("import sys; import coordinator.enrollment, coordinator.provision, coordinator.releases; "
             "print(sorted(m for m in sys.modules if m.startswith(('paho', 'coordinator.daemon', 'torch'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", loaded.stdout
