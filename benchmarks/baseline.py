"""Side by side with an older commit: run a benchmark script in a git worktree of that commit,
with the same arguments, and read back the JSON it wrote. The script is copied in from this tree
(the old commit may not have it); the federation's processes import the old code, because a shim
first on PYTHONPATH makes every ``fedprune.*`` name resolve into the worktree ahead of this
checkout's editable install: a ``fedprune`` package whose folders link to the worktree's, or,
for a commit from before the namespace (8bd6ddb), an import hook that gives each
``fedprune.*`` module the old top-level module it was moved from."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def describe(tree: Path = ROOT) -> str:
    """The commit a measurement ran on, with -dirty for uncommitted changes to the code it measures
    (benchmarks/ aside: a baseline's worktree holds this tree's scripts)."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", ".", ":!benchmarks"],
                             capture_output=True, text=True)
    return (head.stdout.strip() or "unknown") + ("-dirty" if changed.stdout.strip() else "")


# Installed as sitecustomize in a pre-namespace worktree: fedprune.<folder>[.core|.fleet|.lab].<module>
# is the old <folder>.<module>, and common/ was part of edge_agent/.
_ALIASES = """
import importlib, importlib.abc, importlib.util, sys

RENAMED = {"fedprune.common.cli": "edge_agent.cli_common", "fedprune.coordinator.lab.datasets": "edge_agent.data"}


def old_name(name):
    if name in RENAMED:
        return RENAMED[name]
    top, *rest = name.split(".")[1:]
    return ".".join(["edge_agent" if top == "common" else top, *[p for p in rest if p not in ("core", "fleet", "lab")]])


class Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    own_specs = {}

    def find_spec(self, name, path, target=None):
        if name == "fedprune":
            return importlib.util.spec_from_loader(name, self, is_package=True)
        old = importlib.util.find_spec(old_name(name)) if name.startswith("fedprune.") else None
        if old is None:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=old.submodule_search_locations is not None)

    def create_module(self, spec):
        if spec.name == "fedprune":
            return None
        module = importlib.import_module(old_name(spec.name))
        self.own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        if module.__name__ != "fedprune":  # the import system gave the old module our spec: give its own back
            module.__spec__ = self.own_specs[module.__spec__.name]


sys.meta_path.insert(0, Alias())
"""


def namespace_shim(tree: Path, shim: Path) -> Path:
    """``shim``, made a directory to put first on PYTHONPATH so that ``fedprune.*`` is the
    worktree's code (outside the worktree, which would otherwise count as changed)."""
    package = shim / "fedprune"
    package.mkdir(parents=True)
    if (tree / "common").is_dir():
        (package / "__init__.py").write_text("")
        for folder in ("protocol", "common", "edge_agent", "coordinator"):
            (package / folder).symlink_to(tree / folder, target_is_directory=True)
    else:
        package.rmdir()
        (shim / "sitecustomize.py").write_text(_ALIASES)
    return shim


def run_at_commit(ref: str, script: Path, argv: list[str]) -> dict:
    """``script argv --json-out FILE`` in a worktree of ``ref``; the parsed FILE."""
    tree = Path(tempfile.mkdtemp(prefix="fedprune-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    try:
        copy = tree / "benchmarks" / script.name
        shutil.copy(script, copy)
        shutil.copy(Path(__file__), tree / "benchmarks" / "baseline.py")
        result = tree / "baseline.json"
        path = f"{namespace_shim(tree, Path(str(tree) + '-namespace'))}{os.pathsep}{tree}"
        subprocess.run([sys.executable, str(copy), *argv, "--json-out", str(result)], check=True,
                       env={**os.environ, "PYTHONPATH": path})
        return json.loads(result.read_text())
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(str(tree) + "-namespace", ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", metavar="REF", help="also measure this commit, side by side (e.g. 83ce574)")
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)  # the baseline's run writes here


def side_by_side(script: Path, argv: list[str], args: argparse.Namespace,
                 measure: Callable[[argparse.Namespace], dict]) -> dict[str, dict] | None:
    """``{"baseline": ..., "this tree": ...}`` (the baseline only with ``--baseline``); None in
    the baseline's own run, which writes its measurement to ``--json-out`` for the caller."""
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(measure(args)))
        return None
    own = [a for a in argv if not a.startswith("--baseline") and a != args.baseline]
    runs = {"baseline": run_at_commit(args.baseline, script, own)} if args.baseline else {}
    runs["this tree"] = measure(args)
    return runs
