"""Configuration files: TOML, validated against a JSON Schema, with errors that name the key."""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator


class ConfigError(ValueError):
    """A configuration that cannot work; the text names the file and the key to fix."""


def load_schema(package: str, name: str) -> dict[str, Any]:
    return json.loads(resources.files(package).joinpath(name).read_text(encoding="utf-8"))


def check(data: dict[str, Any], schema: dict[str, Any], source: str) -> None:
    """Raise ConfigError for the first problem, as `FILE: key.path: what is wrong`."""
    errors = sorted(Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if not errors:
        return
    error = errors[0]
    path = [str(p) for p in error.absolute_path]
    if error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        raise ConfigError(f"{source}: missing key '{'.'.join([*path, missing])}'")
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        raise ConfigError(f"{source}: unknown key '{'.'.join([*path, extra[0]])}' (a typo?)")
    raise ConfigError(f"{source}: key '{'.'.join(path) or '(top level)'}': {error.message}")


def load_toml(path: str | Path, schema: dict[str, Any]) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    check(data, schema, str(path))
    return data
