"""Frozen, typed driver configurations loadable from YAML.

Every driver owns one subclass of :class:`DriverConfig`. Keys carry their units in their
names (``timestep_fs``, ``temperature_K``). Unknown keys are errors, because a misspelt key
silently falling back to a default is how long runs go wrong.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

C = TypeVar("C", bound="DriverConfig")


@dataclasses.dataclass(frozen=True)
class DriverConfig:
    """Base class: subclasses are ``@dataclass(frozen=True)`` with typed fields."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any], *, source: str = "configuration") -> C:
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
        known = set(cls.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; "
                f"valid keys are: {', '.join(sorted(known))}"
            )
        hints = typing.get_type_hints(cls)
        converted = {key: _coerce(key, value, hints.get(key), source) for key, value in values.items()}
        try:
            config = cls(**converted)
        except TypeError as err:  # a required field is missing
            raise ConfigError(f"{source}: {err}") from None
        config.validate()
        return config

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, **overrides: Any) -> C:
        path = Path(path)
        values = read_yaml_mapping(path)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values, source=str(path))

    @classmethod
    def from_command_line(cls: type[C], config_file: str | Path | None, overrides: Mapping[str, Any]) -> C:
        """YAML file (if given) with command-line flags on top; unset flags (None) are ignored."""
        if config_file:
            return cls.from_yaml(config_file, **overrides)
        return cls.from_dict({k: v for k, v in overrides.items() if v is not None}, source="command line")

    def replace(self: C, **overrides: Any) -> C:
        """A copy with the given fields changed; ``None`` means 'keep' (unset CLI flags)."""
        values = self.to_dict()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return type(self).from_dict(values, source=f"{type(self).__name__} overrides")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def validate(self) -> None:
        """Subclasses check value ranges here and raise ConfigError."""


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping, with one clear error for every way it can be wrong."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(values).__name__}")
    return values


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, DriverConfig):
        return value.to_dict()
    return value


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Convert YAML values to the field's declared type (int -> float, list -> tuple, str -> Path),
    refusing every value of another type with a ConfigError naming the key."""
    if hint is None or hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, option, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else _type_error(key, value, hint, source)
    if value is None:
        raise _type_error(key, value, hint, source)
    if isinstance(hint, type) and issubclass(hint, DriverConfig):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: key {key!r} is a section: expected a mapping of "
                              f"{hint.__name__} keys, got {value!r}")
        return hint.from_dict(value, source=f"{source}: {key}")
    if origin is tuple:
        inner = args[0] if args else None
        if isinstance(value, str):  # "O H Co" on a command line or in YAML
            return tuple(_from_word(key, v, inner, source) for v in value.split())
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, hint, source)
        return tuple(_coerce(f"{key}[{i}]", v, inner, source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, value, hint, source)
        key_type, value_type = args if len(args) == 2 else (None, None)
        return {_coerce(f"{key} key", k, key_type, source): _coerce(f"{key}.{k}", v, value_type, source)
                for k, v in value.items()}
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            return _from_word(key, value, float, source)
        raise _type_error(key, value, hint, source)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(key, value, hint, source)
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise _type_error(key, value, hint, source)
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise _type_error(key, value, hint, source)
        return Path(value)
    return value


def _from_word(key: str, word: Any, hint: Any, source: str) -> Any:
    """One item of a whitespace-separated string, converted to ``hint`` (a number, or kept as text)."""
    if hint in (int, float) and isinstance(word, str):
        try:
            number = hint(word)
        except ValueError:
            raise _type_error(key, word, hint, source) from None
        if isinstance(number, float) and math.isnan(number):
            raise _type_error(key, word, hint, source)
        return number
    return _coerce(key, word, hint, source)


def _type_error(key: str, value: Any, hint: Any, source: str) -> ConfigError:
    name = " or ".join(_type_name(a) for a in typing.get_args(hint)) if typing.get_args(hint) and \
        typing.get_origin(hint) in (typing.Union, types.UnionType) else _type_name(hint)
    shown = "nothing (null)" if value is None else f"{value!r} ({type(value).__name__})"
    return ConfigError(f"{source}: key {key!r} expects {name}, got {shown}")


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}" if typing.get_args(hint) else "a list"
    if typing.get_origin(hint) is dict:
        return "a mapping"
    if hint is Path:
        return "a path"
    if hint is float:
        return "a number"
    if hint is int:
        return "an integer"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "text"
    return getattr(hint, "__name__", str(hint))
