"""Ed25519 signatures on messages, and the replay rules for commands.

A signed message carries `sig`: the standard base64 of the Ed25519 signature over the message
without `sig` in the JSON Canonicalization Scheme, RFC 8785 (JCS: keys sorted by UTF-16 code
units, no whitespace, strings as ECMAScript writes them, numbers in ECMAScript's shortest form, so
`76.0` is `76`). Any language can check it with a maintained JCS library (Python `rfc8785`, npm
`canonicalize`): parse, drop `sig`, canonicalise, verify with the sender's 32-byte public key.
Integers must stay within +-(2^53 - 1), as JCS requires.

Migration (docs/PROTOCOL.md, "Signatures"): software before JCS signed Python's
`json.dumps(sort_keys=True, separators=(",", ":"))` form, which equals JCS only for messages of
ASCII text and no fractional or exponent numbers. `verify` still accepts that legacy form, so
upgraded receivers (centres first, then devices) keep working with senders not yet upgraded.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.configfile import ConfigError, read_regular_file

SIG = "sig"
# SIA DC-09's window: a command may be at most 40 s old and at most 20 s in the future.
WINDOW_PAST_S = 40.0
WINDOW_FUTURE_S = 20.0


class SignatureError(ValueError):
    """Unsigned, or signed by nobody we trust; the text says which."""


def canonical(message: dict[str, Any]) -> bytes:
    """The bytes a signature covers: RFC 8785 of the message without `sig`."""
    try:
        return rfc8785.dumps({k: v for k, v in message.items() if k != SIG})
    except rfc8785.CanonicalizationError as exc:  # e.g. an integer beyond 2^53
        raise SignatureError(f"no canonical form: {exc}") from None


def legacy_canonical(message: dict[str, Any]) -> bytes:
    """What software before RFC 8785 signed (accepted by `verify` during the migration)."""
    body = {k: v for k, v in message.items() if k != SIG}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


FORMS: tuple[Callable[[dict[str, Any]], bytes], ...] = (canonical, legacy_canonical)


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key_b64 = public_key_b64(key.public_key())

    def sign(self, message: dict[str, Any]) -> dict[str, Any]:
        """The message with its `sig` field."""
        signature = self._key.sign(canonical(message))
        return {**message, SIG: base64.b64encode(signature).decode()}


def verify(message: dict[str, Any], keys: Iterable[Ed25519PublicKey]) -> Ed25519PublicKey:
    """The key among `keys` that signed `message` (RFC 8785, or the legacy form during the
    migration); raise SignatureError if none did."""
    encoded = message.get(SIG)
    if not isinstance(encoded, str):
        raise SignatureError("unsigned")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("signature is not base64") from None
    keys = list(keys)
    for form in FORMS:
        body = form(message)  # no canonical form (an integer beyond 2^53): refused in both
        for key in keys:
            try:
                key.verify(signature, body)
                return key
            except InvalidSignature:
                continue
    raise SignatureError("bad signature")


def load_key(path: Path) -> Ed25519PrivateKey:
    """The device's signing key at `path`, made and enrolled by `sos-provision`.

    Never makes one: a key made on the device is unknown to the fleet, so the centre would
    reject every message signed with it while the device showed them as delivered. Raises
    ConfigError `PATH: what is wrong`.
    """
    try:
        pem = read_regular_file(path)
    except ConfigError as exc:
        if path.exists():
            raise
        raise ConfigError(f"{exc}; the signing key is made and enrolled only by provisioning: "
                          "run `sos-provision` (docs/FLASHING.md)") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key (the signing key must be one)")
    return key


def load_or_make_key(path: Path) -> Ed25519PrivateKey:
    """The signing key at `path`, made there (0600) the first time; it never leaves. For
    provisioning and the fleet's own identities; the device itself uses `load_key`."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def public_key_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise ValueError(f"not a base64 Ed25519 public key: {text[:16]}...") from None


def window_error(stamp: datetime, now: datetime) -> str | None:
    """Why `stamp` is outside the DC-09 window around `now`, or None if it is inside."""
    skew = (stamp - now).total_seconds()
    if skew < -WINDOW_PAST_S:
        return f"timestamp {-skew:.0f} s old (limit {WINDOW_PAST_S:.0f} s)"
    if skew > WINDOW_FUTURE_S:
        return f"timestamp {skew:.0f} s in the future (limit {WINDOW_FUTURE_S:.0f} s)"
    return None


class SeqMemory:
    """Which sequence numbers of one sender were seen: a floor plus the recent ones above it.

    Pure and JSON-serialisable, for the device's persisted state. `accept(seq)` is False for a
    number seen before or below the floor (too old to tell, so treated as a replay).
    """

    def __init__(self, floor: int = 0, recent: Iterable[int] = (), size: int = 64) -> None:
        self.floor = floor
        self.recent = sorted(set(recent))
        self.size = size

    def accept(self, seq: int) -> bool:
        if seq <= self.floor or seq in self.recent:
            return False
        self.recent = sorted([*self.recent, seq])
        while len(self.recent) > self.size:
            self.floor = self.recent.pop(0)
        return True

    def to_json(self) -> dict[str, Any]:
        return {"floor": self.floor, "recent": self.recent}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SeqMemory:
        return cls(**data) if data else cls()
