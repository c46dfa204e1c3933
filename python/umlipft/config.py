"""Frozen, typed driver configurations loadable from YAML.

Every driver owns one subclass of :class:`DriverConfig`. Keys carry their units in their
names (``timestep_fs``, ``temperature_K``). Unknown keys are errors, because a misspelt key
silently falling back to a default is how long runs go wrong.
"""

from __future__ import annotations

import dataclasses
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
    """Convert YAML scalars to the field's declared type (int -> float, list -> tuple, str -> Path)."""
    if hint is None or value is None:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "types.UnionType":
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(key, value, non_none[0], source)
        return value
    try:
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, bool):
            raise TypeError
        if hint is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if hint is Path:
            return Path(value)
        if origin is tuple:
            if isinstance(value, str):
                value = value.split()
            inner = args[0] if args else None
            return tuple(_coerce(key, v, inner, source) for v in value)
        if isinstance(hint, type) and issubclass(hint, DriverConfig) and isinstance(value, Mapping):
            return hint.from_dict(value, source=f"{source}: {key}")
        if isinstance(hint, type) and hint in (int, float, str, bool) and not isinstance(value, hint):
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(
            f"{source}: key {key!r} expects {getattr(hint, '__name__', hint)}, got {value!r}"
        ) from None
    return value
