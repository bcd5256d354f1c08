"""Side by side with an older commit: run a benchmark script in a git worktree of that commit,
with the same arguments, and read back the JSON it wrote. The script is copied in from this tree
(the old commit may not have it); the federation's processes import the old code, because
PYTHONPATH puts the worktree ahead of this checkout's editable install."""

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
