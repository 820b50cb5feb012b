"""The signed manifest of one recorded segment, and the hash chain that links segments.

Pure: values in, dicts and bytes out. Each encrypted segment `000123.ts.age` has a manifest
`000123.json` (the bytes of `manifest_bytes`) and a detached minisign signature
`000123.json.minisig` made with the device's Ed25519 message-signing key (`sign_manifest`).

The chain: a manifest's `prev_manifest_sha256` is the SHA-256 of the previous segment's manifest
file, exactly as written (`manifest_sha256`), so deleting, inserting or reordering a segment
breaks the chain at that point even though every remaining file is validly signed. It is null
only for the first segment of the device's life (`seq == FIRST_SEQ`) or after a chain restart,
which must then say why (`chain_restart`, e.g. the device's storage was wiped).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import cache
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jsonschema import Draft202012Validator, FormatChecker

from evidence_format import minisign
from protocol.messages import utc_iso

MANIFEST_VERSION = 1
FIRST_SEQ = 1
SEGMENT_SUFFIX = ".ts.age"
MANIFEST_SUFFIX = ".json"
SIGNATURE_SUFFIX = ".json.minisig"

_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_TIME = {"type": "string", "format": "date-time"}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://sos-devices.example/schemas/v1/segment-manifest.schema.json",
    "title": "Segment manifest",
    "description": "One recorded video segment: what it is, when and where, its ciphertext's "
                   "hash and the hash of the previous manifest. Signed with minisign.",
    "type": "object",
    "required": ["v", "device_id", "seq", "file", "start_utc", "end_utc", "start_mono",
                 "end_mono", "frames", "gps_track", "call_id", "flags", "ciphertext_sha256",
                 "ciphertext_bytes", "prev_manifest_sha256", "chain_restart", "cut"],
    "additionalProperties": False,
    "properties": {
        "v": {"const": MANIFEST_VERSION},
        "device_id": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{2,62}$"},
        "seq": {"type": "integer", "minimum": 0},
        "file": {"type": "string", "pattern": r"^[0-9]{6,}\.ts\.age$"},
        "start_utc": _TIME,
        "end_utc": _TIME,
        "start_mono": {"type": "number", "minimum": 0},
        "end_mono": {"type": "number", "minimum": 0},
        "frames": {"type": "integer", "minimum": 0},
        "gps_track": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["lat", "lon", "utc"],
                "properties": {
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180},
                    "utc": _TIME,
                    "alt_m": {"type": ["number", "null"]},
                    "accuracy_m": {"type": ["number", "null"], "minimum": 0},
                },
            },
        },
        "call_id": {"type": ["string", "null"], "minLength": 1, "maxLength": 200},
        "flags": {"type": "array", "uniqueItems": True,
                  "items": {"type": "string", "pattern": "^[a-z][a-z0-9-]*$"}},
        "ciphertext_sha256": _SHA256,
        "ciphertext_bytes": {"type": "integer", "minimum": 0},
        "prev_manifest_sha256": {"oneOf": [_SHA256, {"type": "null"}]},
        "chain_restart": {"type": ["string", "null"], "minLength": 1},
        "cut": {
            "oneOf": [
                {"type": "null"},
                {"type": "object",
                 "properties": {"truncated": {"type": "boolean"},
                                "reason": {"type": "string"}}},
            ],
        },
    },
}


def segment_file(seq: int) -> str:
    return f"{seq:06d}{SEGMENT_SUFFIX}"


def manifest_file(seq: int) -> str:
    return f"{seq:06d}{MANIFEST_SUFFIX}"


def signature_file(seq: int) -> str:
    return f"{seq:06d}{SIGNATURE_SUFFIX}"


def build_manifest(*, device_id: str, seq: int, start_utc: str | datetime,
                   end_utc: str | datetime, start_mono: float, end_mono: float, frames: int,
                   gps_track: list[dict[str, Any]], call_id: str | None, flags: list[str],
                   ciphertext_sha256: str, ciphertext_bytes: int,
                   prev_manifest_sha256: str | None, chain_restart: str | None = None,
                   cut: dict[str, Any] | None = None,
                   version: int = MANIFEST_VERSION) -> dict[str, Any]:
    """The manifest of segment `seq`; ValueError if it would not verify later.

    `cut` says how the segment ended, e.g. `{"reason": "crash-recovery", "truncated": True}`
    for a segment closed by recovery after a power loss. `chain_restart` is required when
    `prev_manifest_sha256` is None for any segment but the device's first.
    """
    manifest = {
        "v": version,
        "device_id": device_id,
        "seq": seq,
        "file": segment_file(seq),
        "start_utc": _iso(start_utc),
        "end_utc": _iso(end_utc),
        "start_mono": start_mono,
        "end_mono": end_mono,
        "frames": frames,
        "gps_track": [dict(point) for point in gps_track],
        "call_id": call_id,
        "flags": list(flags),
        "ciphertext_sha256": ciphertext_sha256,
        "ciphertext_bytes": ciphertext_bytes,
        "prev_manifest_sha256": prev_manifest_sha256,
        "chain_restart": chain_restart,
        "cut": dict(cut) if cut is not None else None,
    }
    problems = manifest_problems(manifest)
    if problems:
        raise ValueError(f"invalid manifest for segment {seq}: " + "; ".join(problems))
    return manifest


def manifest_problems(manifest: Any) -> list[str]:
    """Everything wrong with a manifest (schema and the rules a schema cannot say), or []."""
    problems = [f"{'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"
                for e in sorted(_validator().iter_errors(manifest), key=lambda e: list(e.path))]
    if problems:
        return problems
    if manifest["file"] != segment_file(manifest["seq"]):
        problems.append(f"file is {manifest['file']}, but seq {manifest['seq']} is "
                        f"{segment_file(manifest['seq'])}")
    if manifest["end_mono"] < manifest["start_mono"]:
        problems.append("end_mono is before start_mono")
    if (manifest["prev_manifest_sha256"] is None and manifest["seq"] != FIRST_SEQ
            and not manifest["chain_restart"]):
        problems.append("prev_manifest_sha256 is null but this is not the first segment "
                        "and chain_restart gives no reason")
    return problems


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Canonical JSON plus a newline: the exact bytes of the manifest file, which are what
    the signature covers and what the next manifest's `prev_manifest_sha256` hashes."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode() + b"\n"


def manifest_sha256(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(manifest_bytes(manifest)).hexdigest()


def trusted_comment(manifest: dict[str, Any]) -> str:
    """What `minisign -V` shows as the signature's trusted comment (signed, informative only)."""
    return (f"file:{manifest_file(manifest['seq'])}\tdevice:{manifest['device_id']}\t"
            f"seq:{manifest['seq']}\tstart:{manifest['start_utc']}")


def sign_manifest(manifest: dict[str, Any], key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """(manifest file, signature file) contents for `manifest`, signed with the device key;
    what `SegmentStore.commit(manifest=..., signature=...)` takes."""
    data = manifest_bytes(manifest)
    untrusted = (f"signature from {manifest['device_id']} key "
                 f"{minisign.key_id_hex(minisign.key_id_for(key.public_key()))}")
    return data, minisign.sign(key, data, trusted_comment(manifest), untrusted).encode()


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(MANIFEST_SCHEMA, format_checker=FormatChecker())


def _iso(when: str | datetime) -> str:
    return when if isinstance(when, str) else utc_iso(when)
