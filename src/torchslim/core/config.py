"""Typed, strict configs: frozen dataclasses validated from plain mappings, round-tripping through YAML/JSON.

Every method's options are a ``Config`` subclass. A plain mapping (what a YAML recipe holds) is validated into
the typed object: unknown keys and wrong types are errors that name the key and where it stood.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class PruneConfig(Config):
    ...     sparsity: float = 0.5
    ...     scope: str = "layer"
    >>> PruneConfig.from_dict({"sparsity": 0.9}).sparsity
    0.9
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from torchslim.core.errors import TorchslimError

C = TypeVar("C", bound="Config")


class ConfigError(TorchslimError):
    """A config mapping that does not fit its typed form; the message names the key and where it stood."""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        key, value = get_args(tp)
        return f"mapping of {_type_name(key)} to {_type_name(value)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Validate ``value`` against the annotation ``tp``; returns the typed value or raises ConfigError."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        item_type = args[0] if args else Any
        return tuple(_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = get_args(tp)
        return {_coerce(k, key_type, f"{where}"): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return tp.from_dict(value, where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def _plain(value: Any) -> Any:
    """A JSON/YAML-ready form of a config value."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every typed config: strict ``from_dict``, ``to_dict``, and YAML/JSON round trips.

    Subclasses are frozen dataclasses. Override ``validate`` for checks across fields; raise ConfigError there.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks across fields; subclasses raise ConfigError naming the field."""

    @classmethod
    def from_dict(cls: type[C], mapping: Mapping[str, Any] | C, where: str | None = None) -> C:
        """Validate a plain mapping into this config type; unknown keys and wrong types name the key."""
        where = where or cls.__name__
        if isinstance(mapping, cls):
            return mapping
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(mapping).__name__}")
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = [key for key in mapping if key not in fields]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(fields))}")
        values = {}
        for name, field in fields.items():
            if name in mapping:
                values[name] = _coerce(mapping[name], hints[name], f"{where}.{name}")
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {name!r}")
        try:
            return cls(**values)
        except ConfigError as error:
            if str(error).startswith(where):
                raise
            raise ConfigError(f"{where}: {error}") from None

    @classmethod
    def coerce(cls: type[C], value: C | Mapping[str, Any] | None, where: str | None = None) -> C:
        """Accept the typed object, a plain mapping, or None (all defaults)."""
        if value is None:
            return cls()
        return cls.from_dict(value, where=where)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[C], text_or_path: str | Path) -> C:
        """Parse YAML text (or a path to a .yaml file) with the safe loader and validate it."""
        text = text_or_path
        where = cls.__name__
        if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path and text_or_path.endswith((".yaml", ".yml"))):
            path = Path(text_or_path)
            text = path.read_text()
            where = str(path)
        return cls.from_dict(yaml.safe_load(str(text)) or {}, where=where)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed, validated again."""
        return type(self).from_dict({**self.to_dict(), **changes})


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition`` holds (for ``Config.validate``)."""
    if not condition:
        raise ConfigError(message)


__all__ = ["Config", "ConfigError", "check"]
