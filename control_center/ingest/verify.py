"""What the server checks before it takes a segment's bytes, and before it stores them.

At creation (`admit`): the metadata names the certificate's device; the manifest is JSON within
the untrusted decoder's limits (protocol.untrusted: no nesting bomb, no huge integer, no
repeated key; checked before anything else reads it), valid and signed by that device's key
(control_center.evidence, as `sos-evidence verify` checks it), and describes the segment and
size the request announces. Against the store (`check_chain`): no other manifest is stored for
this seq, and the stored neighbours chain to this manifest. At completion
(`check_ciphertext`): the bytes are the ones the manifest signs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_center.evidence import ERROR, KeysFor, check_signed_manifest
from control_center.ingest.stores import EvidenceStore
from control_center.ingest.tus import Refusal
from evidence_format.manifest import manifest_file, signature_file
from protocol.untrusted import MANIFEST_LIMITS, UntrustedJsonError, loads_untrusted

REQUIRED = ("device_id", "seq", "manifest", "signature")
MAX_MANIFEST_BYTES = 256 * 1024


@dataclass(frozen=True)
class Admission:
    device_id: str
    seq: int
    manifest: dict[str, Any]
    manifest_bytes: bytes
    signature: bytes
    manifest_sha256: str


def admit(device: str, metadata: dict[str, bytes], length: int, scratch: Path,
          keys_for: KeysFor) -> Admission:
    """Check a creation request from certificate `device`; the manifest and signature are
    written into `scratch` (the upload's directory) to be checked. Raises Refusal."""
    missing = [k for k in REQUIRED if k not in metadata]
    if missing:
        raise Refusal(400, f"Upload-Metadata lacks {', '.join(missing)} (it must carry "
                           f"{', '.join(REQUIRED)}, each base64)")
    claimed = metadata["device_id"].decode("utf-8", "replace")
    if claimed != device:
        raise Refusal(403, f"this connection's certificate is {device}'s, so it cannot upload "
                           f"for device {claimed[:64]!r}")
    seq_text = metadata["seq"].decode("ascii", "replace")
    if not re.fullmatch(r"[0-9]{1,12}", seq_text):
        raise Refusal(400, f"Upload-Metadata seq must be a decimal number, not {seq_text[:20]!r}")
    seq = int(seq_text)
    raw, signature = metadata["manifest"], metadata["signature"]
    if len(raw) > MAX_MANIFEST_BYTES:
        raise Refusal(413, f"the manifest is {len(raw)} bytes; the limit is "
                           f"{MAX_MANIFEST_BYTES}")
    _check_json(raw, seq)
    manifest_path, signature_path = scratch / manifest_file(seq), scratch / signature_file(seq)
    manifest_path.write_bytes(raw)
    signature_path.write_bytes(signature)
    manifest, findings = check_signed_manifest(manifest_path, signature_path, keys_for)
    errors = [f for f in findings if f.level == ERROR]
    if manifest is None:
        raise Refusal(422, f"the manifest of segment {seq} is refused: "
                           f"{errors[0].text if errors else 'unreadable'}")
    if manifest["device_id"] != device:
        raise Refusal(422, f"the manifest of segment {seq} is {manifest['device_id']}'s, not "
                           f"{device}'s")
    if errors:
        raise Refusal(422, f"the signature of segment {seq} is refused ({errors[0].kind}): "
                           f"{errors[0].text}")
    if manifest["seq"] != seq:
        raise Refusal(422, f"Upload-Metadata says seq {seq}, but the manifest is signed as "
                           f"segment {manifest['seq']}")
    if manifest["ciphertext_bytes"] != length:
        raise Refusal(422, f"Upload-Length is {length} bytes, but the manifest of segment {seq} "
                           f"signs ciphertext_bytes {manifest['ciphertext_bytes']}")
    return Admission(device, seq, manifest, raw, signature, hashlib.sha256(raw).hexdigest())


def _check_json(raw: bytes, seq: int) -> None:
    """Refusal(422) unless the manifest parses within the untrusted decoder's limits; only
    then may the evidence checker (and its plain json.loads) read it."""
    try:
        loads_untrusted(raw, MANIFEST_LIMITS)
    except UntrustedJsonError as exc:
        raise Refusal(422, f"the manifest of segment {seq} is refused: {exc}") from None


def check_chain(store: EvidenceStore, manifest: dict[str, Any], manifest_sha256: str) -> bool:
    """Raise Refusal(422) if the segment contradicts what the store holds for its device;
    True if this very manifest is already stored. Neighbours that are not stored (yet) are
    fine: uploads come evidence first, not in seq order."""
    device, seq = manifest["device_id"], manifest["seq"]
    name = manifest_file(seq)
    stored = store.manifest(device, seq)
    if stored is not None:
        digest = hashlib.sha256(stored).hexdigest()
        if digest == manifest_sha256:
            return True
        raise Refusal(422, f"segment {seq} of {device} is already stored with another manifest "
                           f"(SHA-256 {digest[:16]}...), so this {name} ({manifest_sha256[:16]}"
                           f"...) would substitute it")
    prev = manifest["prev_manifest_sha256"]
    before = store.manifest(device, seq - 1) if seq > 0 else None
    if before is not None and prev is not None:
        digest = hashlib.sha256(before).hexdigest()
        if prev != digest:
            raise Refusal(422, f"{name} of {device} does not follow the stored "
                               f"{manifest_file(seq - 1)}: it names a predecessor with SHA-256 "
                               f"{prev[:16]}..., but the stored one hashes to {digest[:16]}... "
                               f"(substituted or reordered)")
    after = store.manifest(device, seq + 1)
    if after is not None:
        named = _prev_of(after)
        if named is not None and named != manifest_sha256:
            raise Refusal(422, f"the stored {manifest_file(seq + 1)} of {device} names a "
                               f"predecessor with SHA-256 {named[:16]}..., not this {name} "
                               f"({manifest_sha256[:16]}...) (substituted or reordered)")
    return False


def check_ciphertext(digest: str, size: int, manifest: dict[str, Any]) -> None:
    """Raise Refusal(422) unless the received bytes are the ones the manifest signs."""
    if digest != manifest["ciphertext_sha256"] or size != manifest["ciphertext_bytes"]:
        raise Refusal(422, f"the {size} bytes received for segment {manifest['seq']} hash to "
                           f"{digest[:16]}..., but its manifest signs "
                           f"{manifest['ciphertext_sha256'][:16]}... "
                           f"({manifest['ciphertext_bytes']} bytes): the segment was altered "
                           f"or damaged before it was sent")


def _prev_of(raw: bytes) -> str | None:
    try:
        value = loads_untrusted(raw, MANIFEST_LIMITS).get("prev_manifest_sha256")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
