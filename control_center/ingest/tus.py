"""The tus 1.0.0 protocol as this server speaks it: constants, metadata, and refusals.

https://tus.io/protocols/resumable-upload (core, creation and creation-with-upload). A refusal
is an HTTP status plus one sentence; the server sends it as `{"error": ..., "retry": ...}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload"
MAX_WAIT_S = 60  # the longest `Prefer: wait=N` a GET .../receipt is held for
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
METADATA_KEY = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # a token, no spaces or commas


class Refusal(Exception):
    """A request the server will not carry out: `status`, one sentence, and whether the client
    should try again later (`retry`, with `retry_after` seconds for 503/507/423)."""

    def __init__(self, status: int, message: str, *, retry: bool = False,
                 retry_after: int | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry = retry
        self.retry_after = retry_after
        self.offset = offset  # the upload's real offset, sent with a 409

    def body(self) -> bytes:
        return json.dumps({"error": self.message, "retry": self.retry}).encode()


def parse_metadata(header: str | None) -> dict[str, bytes]:
    """`Upload-Metadata: key b64,key b64` -> {key: decoded bytes}; Refusal(400) if malformed."""
    if header is None or not header.strip():
        raise Refusal(400, "the request has no Upload-Metadata header (it must carry device_id, "
                           "seq, manifest and signature, each base64)")
    found: dict[str, bytes] = {}
    for pair in header.split(","):
        parts = pair.strip().split(" ")
        key = parts[0]
        if not METADATA_KEY.match(key) or len(parts) > 2:
            raise Refusal(400, f"Upload-Metadata is malformed near {pair.strip()[:40]!r}: "
                               f"expected 'key base64' pairs separated by commas")
        if key in found:
            raise Refusal(400, f"Upload-Metadata names {key!r} twice")
        try:
            found[key] = base64.b64decode(parts[1], validate=True) if len(parts) == 2 else b""
        except (binascii.Error, ValueError):
            raise Refusal(400, f"Upload-Metadata value of {key!r} is not base64") from None
    return found


def header_int(value: str | None, name: str, status: int = 400) -> int:
    """A non-negative decimal header value, or Refusal naming the header."""
    if value is None:
        raise Refusal(status, f"the request has no {name} header")
    if not re.fullmatch(r"[0-9]{1,19}", value.strip()):
        raise Refusal(400, f"{name} must be a non-negative decimal integer, not {value[:30]!r}")
    return int(value)


def parse_prefer(header: str | None) -> dict[str, str]:
    """RFC 7240 `Prefer: respond-async, wait=10` -> {"respond-async": "", "wait": "10"}
    (names lower-cased, parameters after ';' ignored, unknown preferences kept)."""
    found: dict[str, str] = {}
    for item in (header or "").split(","):
        name, _, value = item.split(";", 1)[0].strip().partition("=")
        if name:
            found.setdefault(name.strip().lower(), value.strip().strip('"'))
    return found


def preferred_wait(prefer: dict[str, str]) -> float:
    """Seconds a `Prefer: wait=N` asks for, capped at MAX_WAIT_S; 0 if absent or not a number."""
    value = prefer.get("wait", "")
    return float(min(int(value), MAX_WAIT_S)) if re.fullmatch(r"[0-9]{1,9}", value) else 0.0
