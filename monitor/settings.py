"""Loading typed YAML settings: unknown keys are errors, every problem is one line with its key path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from monitor.errors import ConfigError

ENV_PREFIX = "MONITOR_"
ENV_SEPARATOR = "__"

SettingsT = TypeVar("SettingsT", bound=BaseModel)


class Strict(BaseModel):
    """Base of every settings model: a misspelt key is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML is one `ConfigError` line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def environment_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """`MONITOR_MQTT__PASSWORD=x` becomes `{"mqtt": {"password": "x"}}`; values are parsed as YAML scalars."""
    variables = os.environ if environ is None else environ
    overrides: dict[str, Any] = {}
    for name, raw in variables.items():
        if not name.startswith(ENV_PREFIX) or ENV_SEPARATOR not in name:
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_SEPARATOR)]
        try:
            value = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            value = raw
        if keys[-1] in ("password", "username") or isinstance(value, (dict, list)):
            value = raw
        node = overrides
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return overrides


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: `source: key.path: message (got value)`."""
    lines = []
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key (misspelt?)"
        shown = "" if problem["type"] in ("missing", "extra_forbidden") else f" (got {problem.get('input')!r})"
        lines.append(f"{source}: {path}: {message}{shown}")
    return "\n".join(lines)


def validate(model: type[SettingsT], data: dict[str, Any], source: str) -> SettingsT:
    """Validate `data` against `model`; every violation goes into one `ConfigError`, a line each."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None
