"""Segment receipts: the centre's signed word that it stored a segment (docs/UPLOAD.md).

A receipt is signed like a command (protocol/signing.py) with the fleet's centre key, so a
device checks it with `protocol.signing.verify(receipt, centre_public_keys)` and the keys it
already trusts for commands. Field names follow the manifest's.

`audit_head` (optional in the schema: receipts issued before it existed lack it) anchors the
centre's audit log: it is the hash of the `receipt_issued` line that records this receipt
(`control_center.audit.entry_hash`), written and fsynced before the receipt is signed, so the
receipt names its own line and, through the chain, every line before it.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

from protocol.messages import utc_iso
from protocol.signing import Signer

RECEIPT_VERSION = 1
RECEIPT_TYPE = "segment_receipt"


def make_receipt(signer: Signer, *, device_id: str, seq: int, ciphertext_sha256: str,
                 manifest_sha256: str, ciphertext_bytes: int, store: str,
                 stored_at: datetime | None = None, receipt_id: str | None = None,
                 audit_head: str | None = None) -> dict[str, Any]:
    """A signed receipt; `receipt_id` is made up unless given (the ingest gives the one its
    audit line names), `audit_head` is left out unless given."""
    extra = {"audit_head": audit_head} if audit_head is not None else {}
    receipt = signer.sign({
        **extra,
        "v": RECEIPT_VERSION,
        "type": RECEIPT_TYPE,
        "receipt_id": receipt_id or new_receipt_id(),
        "device_id": device_id,
        "seq": seq,
        "ciphertext_sha256": ciphertext_sha256,
        "manifest_sha256": manifest_sha256,
        "ciphertext_bytes": ciphertext_bytes,
        "stored_at": utc_iso(stored_at or datetime.now(UTC)),
        "store": store,
    })
    problems = receipt_problems(receipt)
    if problems:  # never hand out what our own schema refuses
        raise ValueError("invalid receipt: " + "; ".join(problems))
    return receipt


def new_receipt_id() -> str:
    return str(uuid.uuid4())


def receipt_bytes(receipt: dict[str, Any]) -> bytes:
    """The receipt as sent in GET .../receipt: canonical JSON."""
    return json.dumps(receipt, sort_keys=True, separators=(",", ":")).encode()


def receipt_header(receipt: dict[str, Any]) -> str:
    """The `Upload-Receipt` header value: standard base64 of `receipt_bytes`."""
    return base64.b64encode(receipt_bytes(receipt)).decode()


def receipt_problems(receipt: Any) -> list[str]:
    """Everything in `receipt` that breaks protocol/schemas/receipt.schema.json, or []."""
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"
            for e in sorted(_validator().iter_errors(receipt), key=lambda e: list(e.path))]


def receipt_schema() -> dict[str, Any]:
    text = resources.files("protocol").joinpath("schemas", "receipt.schema.json").read_text()
    return json.loads(text)


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(receipt_schema(), format_checker=FormatChecker())
