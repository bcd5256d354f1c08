"""`--baseline REF` measures REF's code: the shim resolves every fedprune.* module into a worktree
of REF, for a commit from before the namespace (aliases to the old top-level modules) and after."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.baseline import ROOT, namespace_shim

PROBE = ("import fedprune.coordinator.daemon as d, fedprune.common.mqtt as m, fedprune.coordinator.lab.localfed as l; "
         "from importlib.resources import files; files('{package}').joinpath('templates'); "
         "print(d.__file__, m.__file__, l.__file__)")


@pytest.mark.parametrize("ref,package,expected", [
    ("83ce574", "coordinator", ("coordinator/daemon.py", "edge_agent/mqtt.py", "coordinator/localfed.py")),
    ("25358aa", "fedprune.coordinator.fleet", ("coordinator/daemon.py", "common/mqtt.py", "coordinator/lab/localfed.py")),
])
def test_the_shim_resolves_fedprune_into_the_worktree(tmp_path: Path, ref: str, package: str,
                                                      expected: tuple[str, ...]) -> None:
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{ref}^{{commit}}"]).returncode != 0:
        pytest.skip(f"{ref} is not in this clone's history")
    tree = tmp_path / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True, capture_output=True)
    try:
        shim = namespace_shim(tree, tmp_path / "shim")
        done = subprocess.run([sys.executable, "-c", PROBE.format(package=package)], capture_output=True, text=True,
                              env={"PYTHONPATH": f"{shim}:{tree}", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        files = [Path(f).resolve() for f in done.stdout.split()]
        assert files == [(tree / e).resolve() for e in expected]
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
