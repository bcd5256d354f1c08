"""Declare a program's configuration once; load it from defaults < TOML < environment < flags.

A config is a frozen dataclass of *sections*, each a frozen dataclass whose fields are declared
with :func:`setting` (default, help text, optional check). The same declaration drives the
loader, the error messages (which name the key, the value and what is expected) and the
commented example that ``init`` writes, so documentation and defaults cannot drift.
Both programs use it; only their ``config`` modules call it with ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on JetPack 6
    import tomli as tomllib

Check = Callable[[Any], "str | None"]


class ConfigError(Exception):
    """A configuration value is missing, malformed or out of range; the message names the key."""


class FreeTable(Mapping):
    """A table whose keys the program does not know in advance (a model factory's arguments):
    kept as read, read-only; its owner checks the values."""

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items = dict(items or {})

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)

    def __hash__(self) -> int:  # read-only, so a frozen section may hold one as a default
        return hash(repr(sorted(self._items.items())))


def setting(default: Any, help: str, check: Check | None = None, secret: bool = False) -> Any:
    """A config field: ``check(value)`` returns None when valid, else what is expected."""
    metadata = {"help": help, "check": check, "secret": secret}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"one of {', '.join(repr(c) for c in choices)}"


def in_range(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"a number in [{low}, {high}]"


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str, base: Any = None) -> Any:
    """Convert a TOML/env value to the declared type, or raise ConfigError naming ``where``.
    ``base``: for a nested table, the instance whose values its missing keys keep."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or value == "":
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} {value!r}: expected a list")
        return tuple(_coerce(v, args[0], where) for v in value)
    if annotation is FreeTable:
        if isinstance(value, str):  # an environment variable or --set: a TOML inline table
            try:
                value = tomllib.loads(f"value = {value}")["value"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(f"{where} {value!r}: expected a TOML inline table such as {{ width = 64 }}") from None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} {value!r}: expected a table")
        return FreeTable(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} {value!r}: expected a table")
        label = where.replace("[", "").replace("] ", ".")
        return _build_section(label, annotation, {k: (v, f"[{label}] {k}") for k, v in value.items()}, base)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where} {value!r}: expected true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} {value!r}: expected an integer")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} {value!r}: expected an integer") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} {value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} {value!r}: expected a number") from None
    if annotation is Path:
        if not isinstance(value, (str, Path)) or str(value) == "":
            raise ConfigError(f"{where} {value!r}: expected a path")
        return Path(value).expanduser()
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} {value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config type {annotation!r} at {where}")


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``--set section.key=value`` flags as a mapping for :func:`load`."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


def _parse_flag_value(raw: str) -> Any:
    """Flags are TOML literals when they parse as one (``20``, ``true``, ``[1, 2]``), else strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def load(
    cls: type,
    *,
    toml_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    env_prefix: str = "",
    overrides: Mapping[str, str] | None = None,
) -> Any:
    """Build ``cls`` from defaults < TOML file < ``{env_prefix}{SECTION}_{KEY}`` < ``section.key`` overrides."""
    layers: dict[str, dict[str, tuple[Any, str]]] = {}
    sections = {f.name: f for f in dataclasses.fields(cls)}
    section_types = _field_types(cls)

    if toml_path is not None:
        try:
            document = tomllib.loads(Path(toml_path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {toml_path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {toml_path} is not valid TOML: {exc}") from None
        for section, table in document.items():
            if section not in sections or not isinstance(table, dict):
                raise ConfigError(f"{toml_path}: unknown section [{section}]; known: {', '.join(sections)}")
            for key, value in table.items():
                layers.setdefault(section, {})[key] = (value, f"[{section}] {key}")

    for name, raw in (env or {}).items():
        if not (env_prefix and name.startswith(env_prefix)):
            continue
        rest = name[len(env_prefix):].lower()
        for section in sections:
            if rest.startswith(section + "_"):
                layers.setdefault(section, {})[rest[len(section) + 1:]] = (raw, f"env {name}")
                break
        else:
            raise ConfigError(f"env {name}: no section matches; known: {', '.join(sections)}")

    for dotted, raw in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in sections or not key:
            raise ConfigError(f"--set {dotted}: expected section.key with section one of {', '.join(sections)}")
        layers.setdefault(section, {})[key] = (_parse_flag_value(raw), f"--set {dotted}")

    built = {}
    for section, section_field in sections.items():
        section_cls = section_types[section]
        built[section] = _build_section(section, section_cls, layers.get(section, {}))
    return cls(**built)


def load_section(section_cls: type, table: Mapping[str, Any], section: str) -> Any:
    """One section from an already parsed TOML table, checked as ``load`` checks it."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{section}] must be a table")
    return _build_section(section, section_cls, {k: (v, f"[{section}] {k}") for k, v in table.items()})


def _build_section(section: str, section_cls: type, given: dict[str, tuple[Any, str]], base: Any = None) -> Any:
    """``base`` (an instance of ``section_cls``) supplies the values of keys not given: a nested
    table such as [strategy.local] overrides its parent's default, not the nested class's."""
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(given) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{given[key][1]}: unknown key; [{section}] knows {', '.join(fields)}")
    types_ = _field_types(section_cls)
    values = {}
    for name, f in fields.items():
        if base is not None:
            default = getattr(base, name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if name in given:
            raw, where = given[name]
            value = _coerce(raw, types_[name], where, default if dataclasses.is_dataclass(default) else None)
        else:
            value, where = default, f"[{section}] {name}"
        check = f.metadata.get("check")
        problem = check(value) if (check and value is not None) else None
        if problem:
            shown = "***" if f.metadata.get("secret") else repr(value)
            raise ConfigError(f"{where} {shown}: expected {problem}")
        values[name] = value
    try:
        return section_cls(**values)
    except (TypeError, ValueError) as exc:  # a rule across keys; the message may name the section itself
        message = str(exc)
        raise ConfigError(message if message.startswith(f"[{section}]") else f"[{section}] {message}") from None


def render_example(cls: type, title: str, values: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A commented TOML file with every key, its help and its default (or the given value)."""
    lines = [f"# {title}", "# Every key is optional; shown values are the defaults unless set by init.", ""]
    types_ = _field_types(cls)
    for section in dataclasses.fields(cls):
        _render_table(lines, section.name, types_[section.name], (values or {}).get(section.name, {}))
    return "\n".join(lines)


def _render_table(lines: list[str], name: str, table_cls: type, given: Mapping[str, Any], title: str = "",
                  key_help: Mapping[str, str] | None = None) -> None:
    """One [table], then a [name.child] table for each field whose default is a dataclass: headed
    by that field's help, its keys helped by the field's ``key_help`` metadata when their class
    declares no settings (e.g. protocol data). ``given`` may set a child table's keys as a mapping."""
    doc = (table_cls.__doc__ or "").strip().splitlines()
    title = title or (doc[0] if doc else "")
    lines.append(f"[{name}]" + (f"  # {title}" if title else ""))
    nested = []
    for f in dataclasses.fields(table_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = given.get(f.name, default)
        if dataclasses.is_dataclass(default):
            overrides = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
            nested.append((f, type(default), {**dataclasses.asdict(default), **overrides}))
            continue
        help_text = f.metadata.get("help") or (key_help or {}).get(f.name)
        if help_text:
            lines.append(f"# {help_text}")
        rendered = _toml_literal(value)
        lines.append(f"{f.name} = {rendered}" if rendered is not None else f"# {f.name} =")
    lines.append("")
    for f, child_cls, child_values in nested:
        _render_table(lines, f"{name}.{f.name}", child_cls, child_values, f.metadata.get("help", ""),
                      f.metadata.get("key_help"))


def _toml_literal(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_literal(v) or '""' for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")
