"""What names a model, without torch: the factory reference, its arguments and the task kind.

A model is named by an import path to a factory, ``"mypkg.nets:make_model"``, installed on the
coordinator and on every device like any Python package; no code ever travels. The built-ins
are factories too (``fedprune.common.zoo``), with short aliases. ``fedprune.common.models``
builds the module; the coordinator's config checks these rules at load, so ``status``, ``run``
and ``enroll`` refuse a malformed reference with one message without importing torch (~200 MB,
seconds on a small board).
"""

from __future__ import annotations

import importlib.metadata
import re

from fedprune.protocol.model_args import HEADLINE, TASK_KINDS, ModelArgs, normalise_args

__all__ = ["ALIASES", "HEADLINE", "LAYOUT_MISMATCH", "TASK_KINDS", "ModelArgs", "factory_path", "normalise_args", "package_version", "reference_problem",
           "task_problem"]

ALIASES = {
    "mlp": "fedprune.common.zoo:mlp",
    "cnn2d": "fedprune.common.zoo:cnn2d",
    "cnn1d": "fedprune.common.zoo:cnn1d",
}
# A wire label (protocol ModelRef.name): dotted module path, a colon, a dotted attribute path.
_REFERENCE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
MAX_REFERENCE = 64
# The decline reason of a device that builds the task's model with another layout (or cannot
# build it): final for that model, like data_mismatch.
LAYOUT_MISMATCH = "layout_mismatch"


def factory_path(reference: str) -> str:
    """``"module.path:attribute"`` for a reference or an alias; ValueError with the fix otherwise."""
    problem = reference_problem(reference)
    if problem:
        raise ValueError(problem)
    return ALIASES.get(reference, reference)


def reference_problem(reference: object) -> str | None:
    """Why ``reference`` cannot name a model factory, with the fix; None when it can."""
    if not isinstance(reference, str) or reference in ALIASES:
        return None if isinstance(reference, str) else f"model={reference!r}: expected a string"
    if len(reference) > MAX_REFERENCE or not _REFERENCE.fullmatch(reference):
        return (f"model={reference!r}: expected a built-in ({', '.join(ALIASES)}) or an import path to a factory "
                f"such as \"mypkg.nets:make_model\" (at most {MAX_REFERENCE} characters)")
    return None


def task_problem(task: object, num_outputs: int) -> str | None:
    if task not in TASK_KINDS:
        return f"task={task!r}: expected one of {TASK_KINDS}"
    if task == "classification" and num_outputs < 2:
        return f"num_classes={num_outputs}: a classification model needs at least 2 classes"
    return None


def package_version(reference: str) -> str:
    """The installed distribution that provides the factory, as "name version" ("" when its module
    is not part of one), read from package metadata without importing it: both sides name theirs
    when their layouts of one model differ."""
    if reference_problem(reference):
        return ""
    top = factory_path(reference).partition(":")[0].split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""
