"""Import paths to user code, ``"package.module:attribute"``: the model factory and the data
factory are both named so, and resolved here with one set of messages."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class UnresolvedReference(ValueError):
    """The reference names nothing callable here; the message says which step failed."""


def resolve_callable(reference: str) -> Callable[..., Any]:
    """The callable ``reference`` names, imported now; UnresolvedReference when the module does not
    import (or fails while importing: it is user code), lacks the attribute, or it is not callable."""
    module_name, _, attribute = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnresolvedReference(f"cannot import {module_name!r} ({exc})") from None
    except Exception as exc:  # SyntaxError, NameError... in the user's module
        raise UnresolvedReference(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UnresolvedReference(f"{module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UnresolvedReference(f"{module_name}:{attribute} is not callable")
    return target
