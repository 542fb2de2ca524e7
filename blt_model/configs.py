"""Run configs in three layers (STYLE.md §2): class defaults, then a YAML file, then dotted
`key=value` overrides from the command line.

Invariant: the result is a validated pydantic model; an unknown key (at any depth), a value
that does not parse to its field's type, or a malformed override is a `ConfigError` naming the
key, never a warning.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Sequence, TypeVar, get_args

import fsspec
import yaml
from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config file, key or value that cannot make a valid config."""


def preset_file(preset_dir: Path, name_or_path: str) -> str:
    """A preset name (`debug`) means `<preset_dir>/debug.yaml`; anything else is a path or URL."""
    candidate = preset_dir / f"{name_or_path}.yaml"
    if "/" not in name_or_path and not name_or_path.endswith(".yaml") and candidate.exists():
        return str(candidate)
    return name_or_path


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with fsspec.open(str(path), "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"config file {path} nests too deep to read") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config class a field holds: itself, or the one config of an optional or union
    (``FaultInjection | None``); None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = {m for arg in get_args(annotation) if (m := _section(arg)) is not None}
    return models.pop() if len(models) == 1 else None


def _field_names(cls: type[BaseModel], dotted: list[str]) -> None:
    """Refuse an override whose dotted key names no field (before pydantic sees it)."""
    model: type[BaseModel] | None = cls
    for depth, key in enumerate(dotted):
        if model is None:
            raise ConfigError(f"{'.'.join(dotted)}: {'.'.join(dotted[:depth])} is not a section")
        fields = model.model_fields
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {'.'.join(dotted)!r} (known here: {known})")
        model = _section(fields[key].annotation)


def apply_override(data: dict[str, Any], cls: type[BaseModel], override: str) -> None:
    """Set `a.b=c` in the nested dict `data`; the value is read as a YAML scalar (1e-3, true,
    null, [1, 2]) and validated against the field's type later."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not KEY=VALUE (e.g. model.dim=256)")
    dotted = key.split(".")
    _field_names(cls, dotted)
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(f"override {key}: the value nests too deep to read") from None
    node = data
    for part in dotted[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[dotted[-1]] = value


def build_config(
    cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> C:
    """defaults <- YAML file <- overrides, validated once."""
    data = read_yaml(path) if path else {}
    for override in overrides:
        apply_override(data, cls, override)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            # reprlib: an input can be huge (or a YAML alias bomb, shared references nested deep).
            + (f" (got {reprlib.repr(err['input'])})" if err["type"] != "extra_forbidden" else "")
            for err in e.errors()
        )
        raise ConfigError(f"invalid {cls.__name__}: {problems}") from None
