"""The layering of docs/DESIGN.md, read from the folders and checked by walking each module's AST.

protocol <- common <- edge_agent, coordinator; ``core/`` folders are pure (no torch, paho, files
or clock); only the coordinator's ``lab/`` (simulation, attacks) runs the agent's code.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"protocol": "fedprune.protocol", "common": "fedprune.common", "edge_agent": "fedprune.edge_agent",
           "coordinator": "fedprune.coordinator"}

PROTOCOL_ALLOWED = {"numpy", "msgpack", "cryptography"}
IO_MODULES = {"torch", "onnx", "onnxruntime", "onnxscript", "paho", "amqtt", "socket", "subprocess", "requests"}
IO_CALLS = {"open"}
IO_ATTRIBUTES = {("os", "environ"), ("time", "time"), ("time", "monotonic"), ("datetime", "now")}
# Who may import whom, by folder: a module may import from its own folder's prefix and these.
MAY_IMPORT = {
    "fedprune.protocol": ("fedprune.protocol",),
    "fedprune.common": ("fedprune.protocol", "fedprune.common"),
    "fedprune.edge_agent": ("fedprune.protocol", "fedprune.common", "fedprune.edge_agent"),
    "fedprune.coordinator": ("fedprune.protocol", "fedprune.common", "fedprune.coordinator"),
    "fedprune.coordinator.lab": ("fedprune.protocol", "fedprune.common", "fedprune.coordinator",
                                 "fedprune.edge_agent"),
}
PURE_FOLDERS = ("fedprune.coordinator.core", "fedprune.edge_agent.core")


def modules() -> list[tuple[str, Path]]:
    found = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            dotted = ".".join((package, *path.relative_to(ROOT / folder).with_suffix("").parts))
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


def role(dotted: str) -> str:
    """The most specific MAY_IMPORT row the module's folder falls under."""
    return max((r for r in MAY_IMPORT if dotted == r or dotted.startswith(r + ".")), key=len)


@pytest.mark.parametrize("dotted,path", modules(), ids=[m for m, _ in modules()])
def test_module_respects_the_layer_table(dotted: str, path: Path) -> None:
    imported, io_uses = imports_and_io(path)
    ours = {m for m in imported if top(m) == "fedprune"}
    allowed = MAY_IMPORT[role(dotted)]
    bad = {m for m in ours if not (m.startswith(allowed) or m in allowed)}
    assert not bad, f"{dotted} imports {sorted(bad)}: its folder ({role(dotted)}) may import only {allowed}"
    legacy = {m for m in imported if top(m) in FOLDERS}
    assert not legacy, f"{dotted} imports {sorted(legacy)}: import through the fedprune namespace"
    if role(dotted) == "fedprune.protocol":
        foreign = {m for m in imported - ours if top(m) not in PROTOCOL_ALLOWED and not _stdlib(m)}
        assert not foreign, f"{dotted} imports {sorted(foreign)}: protocol is pure (stdlib, numpy, msgpack, cryptography)"
        assert not io_uses, f"{dotted} uses {sorted(io_uses)}: protocol takes `now` and bytes from its caller"
    if dotted.startswith(PURE_FOLDERS):
        io = {m for m in imported if top(m) in IO_MODULES}
        shells = {m for m in ours if not m.startswith(("fedprune.protocol", *PURE_FOLDERS))}
        assert not io, f"core {dotted} imports {sorted(io)}"
        assert not shells, f"core {dotted} imports shells {sorted(shells)}"
        assert not io_uses, f"core {dotted} uses {sorted(io_uses)}: time and randomness arrive as arguments"


def _stdlib(name: str) -> bool:
    return top(name) in sys.stdlib_module_names or top(name) == "__future__"


def test_every_package_folder_is_installed() -> None:
    """pyproject lists the packages by hand (the namespace maps folders); a new folder must be listed."""
    from fedprune.common.configkit import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {m for m, p in modules() if p.name == "__init__.py"}
    assert found == listed


def test_the_walk_finds_the_folders() -> None:
    names = {m for m, _ in modules()}
    assert {"fedprune.protocol", "fedprune.coordinator.core", "fedprune.coordinator.fleet",
            "fedprune.coordinator.lab", "fedprune.edge_agent.core", "fedprune.common.mqtt"} <= names


def test_operator_commands_load_neither_the_daemon_nor_paho() -> None:
    """enroll, revoke, provision, status and export work on the state directory alone; the MQTT
    client and the daemon (with its import of releases) stay out of them."""
    probe = ("import sys; import fedprune.coordinator.fleet.enrollment, fedprune.coordinator.fleet.provision, "
             "fedprune.coordinator.releases; "
             "print(sorted(m for m in sys.modules if m.startswith(('paho', 'fedprune.coordinator.daemon', 'torch'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", loaded.stdout


@pytest.mark.parametrize("dotted,path", modules(), ids=[m for m, _ in modules()])
def test_a_module_over_400_lines_says_why_at_its_top(dotted: str, path: Path) -> None:
    lines = path.read_text().count("\n")
    if lines > 400:
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "over 400 lines" in docstring, f"{dotted} has {lines} lines: split it, or say why at its top"


def test_no_import_cycles() -> None:
    """A cycle makes import order matter and hides which module owns an idea; none, lazy imports included."""
    graph = {}
    for dotted, path in modules():
        imported, _ = imports_and_io(path)
        graph[dotted] = {m for m in imported if m != dotted and m in {d for d, _ in modules()}}
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        if module in trail:
            raise AssertionError("import cycle: " + " -> ".join((*trail[trail.index(module):], module)))
        if module in done:
            return
        for target in graph[module]:
            visit(target, (*trail, module))
        done.add(module)

    for module in graph:
        visit(module, ())
