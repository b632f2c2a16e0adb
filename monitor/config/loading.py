"""Loading typed YAML settings: unknown keys are errors, every problem is one line with its key path."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args

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


def environment_names(environ: Mapping[str, str] | None = None) -> dict[tuple[str, ...], str]:
    """The `MONITOR_` variables by the key path they set: `MONITOR_MQTT__PORT` is `("mqtt", "port")`."""
    variables = os.environ if environ is None else environ
    return {
        tuple(part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_SEPARATOR)): name
        for name in variables
        if name.startswith(ENV_PREFIX) and ENV_SEPARATOR in name
    }


def environment_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """`MONITOR_MQTT__PASSWORD=x` becomes `{"mqtt": {"password": "x"}}`; values are parsed as YAML scalars."""
    variables = os.environ if environ is None else environ
    overrides: dict[str, Any] = {}
    for keys, name in environment_names(variables).items():
        raw = variables[name]
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


def source_of(keys: tuple[str, ...], file: str, names: dict[tuple[str, ...], str]) -> str:
    """Where the value at `keys` came from: the `MONITOR_` variable(s) that set it or a key below it, else the file."""
    variables = sorted(name for path, name in names.items() if path[: len(keys)] == keys)
    if not variables:
        return file
    return f"environment variable{'s' if len(variables) > 1 else ''} {', '.join(variables)}"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _worded(message: str) -> str:
    """pydantic's message in the config's words: `must be ...` rather than `Input should be ...`."""
    for prefix, replacement in (("Value error, ", ""), ("Assertion failed, ", ""), ("Input should be ", "must be ")):
        if message.startswith(prefix):
            message = replacement + message[len(prefix) :]
    return "required, not given" if message == "Field required" else message


def _section_check(
    keys: tuple[str, ...], message: str, value: Any, fields: set[str]
) -> tuple[tuple[str, ...], str, Any]:
    """A check over a whole section names the key it is about first (`sample_rate_hz is required ...`): the problem is
    then that key's, shown with that key's value, never the whole section (which may hold a password)."""
    match = re.match(r"([a-z][a-z0-9]*(?:_[a-z0-9]+)*)(: | is | )(.*)", message, re.DOTALL)
    if match is None or not isinstance(value, dict) or match[1] not in fields:
        return keys, message, None
    rest = match[3] if match[2] != " " else f"{match[1]} {match[3]}"
    return (*keys, match[1]), rest, value.get(match[1])


def field_names(model: type[BaseModel]) -> set[str]:
    """Every key of `model` and of the settings models below it."""
    found: set[str] = set()
    seen: set[type] = set()
    pending: list[Any] = [model]
    while pending:
        annotation = pending.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in seen:
                seen.add(annotation)
                found.update(annotation.model_fields)
                pending.extend(field.annotation for field in annotation.model_fields.values())
        else:
            pending.extend(get_args(annotation))
    return found


def format_validation_error(
    error: ValidationError,
    source: str,
    names: dict[tuple[str, ...], str] | None = None,
    fields: set[str] | None = None,
) -> str:
    """One line per problem: `source: key.path: message (got value)`; with `names` (from `environment_names`)
    a value set by a `MONITOR_` variable is blamed on the variable rather than on `source`; a check across the keys
    of a section that names one of `fields` first is that key's problem."""
    lines = []
    for problem in error.errors():
        keys = tuple(str(part) for part in problem["loc"])
        message, value = _worded(problem["msg"]), problem.get("input")
        section = keys
        if problem["type"] == "value_error":
            keys, message, value = _section_check(keys, message, value, fields or set())
        path = ".".join(keys) or "(top level)"
        where = source_of(keys, source, names or {}) if keys else source
        related = source_of(section, source, names or {}) if section != keys else where
        if related != where:  # a check across keys, some of them set by the environment
            where = f"{where} with {related}"
        if problem["type"] == "extra_forbidden":
            message = "unknown key (misspelt?)"
        hidden = problem["type"] in ("missing", "extra_forbidden") or value is None or isinstance(value, dict)
        lines.append(f"{where}: {path}: {message}{'' if hidden else f' (got {value!r})'}")
    return "\n".join(lines)


def unknown_variables(environ: Mapping[str, str] | None, sections: Sequence[str]) -> list[str]:
    """`MONITOR_` variables that cannot name a key (no `__` between section and key): one line each, with the
    spelling that was probably meant. Variables with `__` are checked by the schema like any key."""
    variables = os.environ if environ is None else environ
    problems = []
    for name in sorted(variables):
        if not name.startswith(ENV_PREFIX) or ENV_SEPARATOR in name:
            continue
        rest = name[len(ENV_PREFIX) :]
        meant = [f"{ENV_PREFIX}{section.upper()}{ENV_SEPARATOR}{rest[len(section) + 1 :]}" for section in sections]
        guess = [
            spelling
            for spelling, section in zip(meant, sections, strict=True)
            if rest.lower().startswith(section + "_")
        ]
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        problems.append(
            f"environment variable {name}: names no config key: a key is {ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY>, "
            f"with two underscores{hint}"
        )
    return problems


def validate(
    model: type[SettingsT], data: dict[str, Any], source: str, names: dict[tuple[str, ...], str] | None = None
) -> SettingsT:
    """Validate `data` against `model`; every violation goes into one `ConfigError`, a line each."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source, names, field_names(model))) from None
