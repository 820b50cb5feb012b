"""Message encoding and validation against the JSON Schemas in `schemas/`."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

from protocol.untrusted import MESSAGE_LIMITS, UntrustedJsonError, loads_untrusted

SCHEMA_VERSION = 1
MAX_PAYLOAD_BYTES = MESSAGE_LIMITS.max_bytes  # bigger is refused unparsed (protocol/untrusted.py)


class MessageKind(StrEnum):
    ALERT = "alert"
    POSITION = "position-update"
    EVENT = "event"
    STATUS = "status"
    COMMAND = "command"
    DELIVERY_RECEIPT = "delivery-receipt"


class ProtocolError(ValueError):
    """A payload that is not a valid message; the text says what is wrong, in one line."""


@cache
def _registry() -> Registry:
    registry = Registry()
    for entry in resources.files("protocol").joinpath("schemas").iterdir():
        if entry.name.endswith(".schema.json"):
            schema = json.loads(entry.read_text(encoding="utf-8"))
            resource = Resource.from_contents(schema)
            registry = registry.with_resources([(schema["$id"], resource), (entry.name, resource)])
    return registry


@cache
def _validator(kind: MessageKind) -> Draft202012Validator:
    schema = _registry().contents(f"{kind.value}.schema.json")
    return Draft202012Validator(schema, registry=_registry(), format_checker=FormatChecker())


def validate(kind: MessageKind, message: Any) -> None:
    """Raise ProtocolError naming the first offending field if `message` breaks its schema."""
    error = next(iter(sorted(_validator(kind).iter_errors(message), key=lambda e: e.path)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ProtocolError(f"invalid {kind.value}: {where}: {error.message}")


def encode(kind: MessageKind, message: dict[str, Any]) -> bytes:
    """Validate then serialise compactly; what we send always meets our own schema."""
    validate(kind, message)
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode()


def decode(kind: MessageKind, payload: bytes) -> dict[str, Any]:
    """Parse and validate a received payload, or raise ProtocolError."""
    try:
        message = loads_untrusted(payload, MESSAGE_LIMITS)
    except UntrustedJsonError as exc:
        raise ProtocolError(f"invalid {kind.value}: {exc}") from None
    validate(kind, message)
    return message


def payload_digest(payload: bytes) -> str:
    """What a delivery receipt's `digest` holds: SHA-256 (hex) of a message's exact bytes."""
    return hashlib.sha256(payload).hexdigest()


def utc_iso(when: datetime) -> str:
    """UTC time as the protocol writes it: ISO 8601 with milliseconds and a Z."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id() -> str:
    """A random 128-bit id as 32 lower-case hex digits (alert and command ids)."""
    return uuid.uuid4().hex
