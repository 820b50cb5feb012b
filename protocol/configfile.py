"""Configuration files: TOML, validated against a JSON Schema, with errors that name the key."""

from __future__ import annotations

import copy
import json
import math
import os
import stat
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from jsonschema import Draft202012Validator


class ConfigError(ValueError):
    """A configuration that cannot work; the text names the file and the key to fix."""


def load_schema(package: str, name: str) -> dict[str, Any]:
    return json.loads(resources.files(package).joinpath(name).read_text(encoding="utf-8"))


def check(data: dict[str, Any], schema: dict[str, Any], source: str) -> None:
    """Raise ConfigError for the first problem, as `FILE: key.path: what is wrong`."""
    text = problem(data, schema)
    if text is not None:
        raise ConfigError(f"{source}: {text}")


def problem(data: Any, schema: dict[str, Any]) -> str | None:
    """The first thing `data` breaks in `schema`, as `key 'a.b': what is wrong`; None if
    nothing. A key's `"x-error"` says what its value must be in the words of its users, and
    `"x-removed"` (beside `"not": {}`) why a key that used to be read is now refused."""
    not_finite = _not_finite(data)
    if not_finite is not None:
        return not_finite
    errors = sorted(Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if not errors:
        return None
    error = errors[0]
    path = [str(p) for p in error.absolute_path]

    def key(*names: str) -> str:
        return ".".join([*path, *names]) or "(top level)"

    if error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        return f"missing key '{key(missing)}'"
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown key '{key(extra[0])}' (a typo?)"
    if error.validator == "dependentRequired":
        name, needs = next((k, [n for n in v if n not in error.instance])
                           for k, v in error.validator_value.items()
                           if k in error.instance and any(n not in error.instance for n in v))
        return f"key '{key(name)}': is set but '{key(needs[0])}' is not"
    sub = error.schema if isinstance(error.schema, dict) else {}
    if "x-removed" in sub:
        return f"key '{key()}' {sub['x-removed']}"
    if "x-error" in sub:
        return f"key '{key()}': {sub['x-error']}, not {error.instance!r}"
    return f"key '{key()}': {error.message}"


def with_defaults(data: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of (validated) `data` with the schema's `default` of every absent key, in each
    object that is present: the schema is the one place a default is written. An absent
    object stays absent (an optional section that is off). Only `properties` are followed
    (no `$ref`, `allOf` or `oneOf`: the config schemas use none for keys with defaults)."""
    filled = dict(data)
    for name, sub in schema.get("properties", {}).items():
        if name in filled:
            if isinstance(filled[name], dict):
                filled[name] = with_defaults(filled[name], sub)
        elif "default" in sub:
            filled[name] = copy.deepcopy(sub["default"])  # never the cached schema's own
    return filled


def subschema(schema: dict[str, Any], *names: str) -> dict[str, Any]:
    """The sub-schema of the key at `names` (e.g. "upload"), for code that reads one."""
    for name in names:
        schema = schema["properties"][name]
    return schema


def _not_finite(data: Any, key: str = "") -> str | None:
    """TOML allows nan and inf, and JSON Schema's minimum/maximum let nan through (every
    comparison with it is false); no key of ours has a use for either, whatever its schema."""
    if isinstance(data, float) and not math.isfinite(data):
        return f"key '{key}': {data} is not a finite number"
    items: Any = ()
    if isinstance(data, dict):
        items = ((f"{key}.{name}" if key else str(name), value) for name, value in data.items())
    elif isinstance(data, list):
        items = ((f"{key}[{index}]", value) for index, value in enumerate(data))
    for inner, value in items:
        text = _not_finite(value, inner)
        if text is not None:
            return text
    return None


def load_toml(path: str | Path, schema: dict[str, Any]) -> dict[str, Any]:
    """The validated TOML at `path`; ConfigError as one line `FILE: what is wrong`."""
    path = Path(path)
    try:
        data = tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    check(data, schema, str(path))
    return data


def _read_text(path: Path) -> str:
    raw = read_regular_file(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start} is not UTF-8)") from None


def read_regular_file(path: Path) -> bytes:
    """The bytes of `path`; ConfigError `PATH: why not` for a missing, unreadable or special
    file (a directory, or a device that would never end)."""
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{path}: is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: not a regular file")
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable (permission denied)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None


# -- the files a configuration names ---------------------------------------------------------------
# A schema marks a key that names a file with `"x-file": KIND` beside its description; the
# program that reads the config says what each KIND must be (e.g. firmware/config.py).


def annotated(data: dict[str, Any], schema: dict[str, Any],
              keyword: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, annotation) for each key present in `data` whose schema carries
    `keyword`, in schema order."""
    for name, sub in schema.get("properties", {}).items():
        if name not in data:
            continue
        if keyword in sub:
            yield name, data[name], sub[keyword]
        if isinstance(data[name], dict):
            for key, value, note in annotated(data[name], sub, keyword):
                yield f"{name}.{key}", value, note


def pem_certificates(path: Path) -> None:
    """One or more PEM certificates (a CA, or a certificate with its chain)."""
    pem = read_regular_file(path)
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate") from None


def pem_private_key(path: Path) -> None:
    """An unencrypted PEM private key (the device has nobody to type a passphrase)."""
    pem = read_regular_file(path)
    try:
        serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(f"{path}: the private key is encrypted (the device needs it "
                          "without a passphrase)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM private key") from None


def no_file_in_the_way(path: Path) -> None:
    """Absent, or a directory: a key that names a directory must not name a file."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: not a directory")


def directory_or_creatable(path: Path) -> None:
    """A writable directory, or one that can be made: its nearest existing ancestor is a
    writable directory (for the user running this)."""
    no_file_in_the_way(path)
    if path.exists():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{path}: directory not writable")
        return
    ancestor = next(p for p in path.parents if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"{path}: cannot be made: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: cannot be made: {ancestor} is not writable")


def existing(path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"{path}: does not exist")
