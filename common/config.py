"""The one loader of mqvox config files: a TOML file into nested frozen settings dataclasses.

Every program's settings are frozen dataclasses whose fields all have defaults, so an
empty file is the defaults. The loader refuses what it cannot use, naming the key: an
unknown key at any depth, a value of the wrong type (TOML's 10 is taken for a float,
a string or a boolean never for a number), a string outside an enum's values, and what
a class's own ``__post_init__`` refuses. A table of tables (``Mapping[str, SomeSettings]``,
e.g. the device's ``[actions.NAME]``) is built item by item, so an error names its item.
"""

from __future__ import annotations

import tomllib
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import dacite

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed TOML document of a config file; ConfigError when it cannot be read or is not TOML."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config {path} is not valid TOML: {error}") from None


def load_config(cls: type[T], path: str | Path) -> T:
    """The settings ``cls`` of a TOML config file; ConfigError names the file and what is wrong."""
    return settings_from_table(cls, read_toml(path), str(path))


def settings_from_table(cls: type[T], table: Mapping[str, Any], where: str = "settings") -> T:
    """Build and check settings ``cls`` from a parsed TOML document; ConfigError names ``where`` and the key."""
    unknown = _unknown_keys(cls, table, "")
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    try:
        return _build(cls, table, "", _dacite_config(cls))
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _build(cls: type, data: Any, path: str, config: dacite.Config) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must be a table, not {data!r}")
    data = dict(data)
    hints = typing.get_type_hints(cls)
    tables: dict[str, dict[str, Any]] = {}
    for item in fields(cls):
        if item.name not in data:
            continue
        item_class = _table_item_class(hints[item.name])
        nested = _nested_class(hints[item.name])
        if nested is not None and isinstance(data[item.name], Mapping):
            # Built here rather than by dacite, so that what its own checks refuse is named with its table.
            data[item.name] = _build(nested, data[item.name], _join(path, item.name), config)
        elif item_class is not None:
            value = data.pop(item.name)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{_join(path, item.name)} must be a table of tables, not {value!r}")
            # Built one by one, so an error names its item.
            tables[item.name] = {
                name: _build(item_class, entry, _join(path, item.name, name), config) for name, entry in value.items()
            }
    try:
        settings = dacite.from_dict(cls, data, config)
        return replace(settings, **tables) if tables else settings
    except dacite.DaciteFieldError as error:
        if path:
            error.update_path(path)
        raise ConfigError(str(error)) from None
    except dacite.DaciteError as error:
        raise ConfigError(str(error)) from None
    except ValueError as error:  # the class's own checks, ConfigError and the programs' own errors included
        # Named with its table, unless the class's message names it already ("capture.vad_frame_ms must be ...").
        named = not path or str(error).startswith(f"{path}.")
        raise ConfigError(str(error) if named else f"{path}: {error}") from None


def _join(*names: str) -> str:
    """The dotted name of a key, e.g. ``broker.tls``."""
    return ".".join(name for name in names if name)


def _nested_class(kind: Any) -> type | None:
    """The settings class of a nested table field (``BrokerSettings``, or an optional ``TlsSettings | None``)."""
    if typing.get_origin(kind) is Mapping:
        return None
    nested = [arg for arg in (kind, *typing.get_args(kind)) if is_dataclass(arg)]
    return nested[0] if nested else None


def _table_item_class(kind: Any) -> type | None:
    """The settings class of the items of a ``Mapping[str, SomeSettings]`` field; None for any other field."""
    if typing.get_origin(kind) is Mapping:
        item_class = typing.get_args(kind)[1]
        if is_dataclass(item_class):
            return item_class
    return None


def _unknown_keys(cls: type, table: Mapping[str, Any], where: str) -> list[str]:
    """Dotted names of keys in ``table`` that ``cls`` has no field for, at any depth."""
    hints = typing.get_type_hints(cls)
    known = {item.name for item in fields(cls)}
    unknown = [f"{where}{key}" for key in table if key not in known]
    for key in known & set(table):
        kind, value = hints[key], table[key]
        if not isinstance(value, Mapping):
            continue  # a wrong type, which the build reports
        item_class = _table_item_class(kind)
        if item_class is not None:
            for name, item in value.items():
                if isinstance(item, Mapping):
                    unknown += _unknown_keys(item_class, item, f"{where}{key}.{name}.")
        elif (nested := _nested_class(kind)) is not None:
            unknown += _unknown_keys(nested, value, f"{where}{key}.")
    return unknown


def _number(value: Any) -> float:
    # TOML writes 10 for 10.0; accept both, but never a string or a boolean.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise dacite.WrongTypeError(float, value)
    return float(value)


def _whole_number(value: Any) -> int:
    # Python's True is an int; a setting that counts is never a boolean.
    if isinstance(value, bool):
        raise dacite.WrongTypeError(int, value)
    return value


class _NotAChoice(dacite.DaciteFieldError):
    """A string outside an enum's values; dacite adds the field's dotted path."""

    def __init__(self, choices: type[StrEnum], value: Any) -> None:
        super().__init__()
        self.choices = choices
        self.value = value

    def __str__(self) -> str:
        allowed = ", ".join(repr(str(choice)) for choice in self.choices)
        return f'"{self.field_path}" must be one of {allowed}, not {self.value!r}'


def _choice(choices: type[StrEnum]):
    def convert(value: Any) -> StrEnum:
        try:
            return choices(value)
        except ValueError:
            raise _NotAChoice(choices, value) from None

    return convert


def _dacite_config(cls: type) -> dacite.Config:
    return dacite.Config(
        strict=True,
        type_hooks={float: _number, int: _whole_number} | {kind: _choice(kind) for kind in _enums(cls)},
        cast=[tuple],
    )


def _enums(cls: type, seen: set[type] | None = None) -> set[type[StrEnum]]:
    """The StrEnum types of ``cls``'s fields, at any depth."""
    seen = set() if seen is None else seen
    seen.add(cls)
    found: set[type[StrEnum]] = set()
    pending = list(typing.get_type_hints(cls).values())
    while pending:
        kind = pending.pop()
        pending.extend(typing.get_args(kind))
        if isinstance(kind, type) and issubclass(kind, StrEnum):
            found.add(kind)
        elif is_dataclass(kind) and isinstance(kind, type) and kind not in seen:
            found |= _enums(kind, seen)
    return found
