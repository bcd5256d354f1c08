"""Side by side with an older commit: run a benchmark script in a git worktree of that commit,
with the same arguments, and read back the JSON it wrote. The script is copied in from this tree
(the old commit may not have it); the federation's processes import the old code, because
PYTHONPATH puts the worktree ahead of this checkout's editable install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def describe(tree: Path = ROOT) -> str:
    """The commit a measurement ran on, with -dirty for uncommitted changes to the code it measures
    (benchmarks/ aside: a baseline's worktree holds this tree's scripts)."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", ".", ":!benchmarks"],
                             capture_output=True, text=True)
    return (head.stdout.strip() or "unknown") + ("-dirty" if changed.stdout.strip() else "")


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
        subprocess.run([sys.executable, str(copy), *argv, "--json-out", str(result)], check=True,
                       env={**os.environ, "PYTHONPATH": str(tree)})
        return json.loads(result.read_text())
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
