"""Checking, decrypting and exporting a device's recorded segments (see docs/EVIDENCE.md).

`verify_directory` checks every manifest's minisign signature, every encrypted segment's
SHA-256 against its manifest, the file names against the signed sequence numbers, and the hash
chain in sequence order. It never stops at the first problem: a court needs to know everything
that is wrong, and what is still sound. Each finding is one line naming the files.

Every file is treated as hostile: only regular files are opened (never followed if a symlink,
never blocked on if a FIFO), manifests are parsed by the untrusted decoder, and anything else
becomes a finding, never an exception. Given the ingest's audit log (`check_against_audit`),
segments the centre stored and that are gone are found too, at either end of the chain.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from control_center.audit import AuditCheck, NotARegularFile, open_regular, read_regular
from control_center.fleet import Fleet
from evidence_format import age_stream, minisign
from evidence_format.files import sha256_of
from evidence_format.manifest import (
    FIRST_SEQ,
    MANIFEST_SUFFIX,
    SEGMENT_SUFFIX,
    SIGNATURE_SUFFIX,
    manifest_problems,
)
from protocol.signing import public_key_from_b64
from protocol.untrusted import MANIFEST_LIMITS, loads_untrusted

ERROR = "error"
NOTE = "note"
STEM = re.compile(r"^[0-9]{6,}$")
GPX_NS = "http://www.topografix.com/GPX/1/1"
AGE_HINT = "install it: apt-get install age (or https://github.com/FiloSottile/age/releases)"
SIGNATURE_LIMIT = 64 * 1024  # a minisig file is about 300 bytes


class EvidenceError(Exception):
    """Something that stops a command (no key, no age binary, a refused export)."""


class ExportRefused(EvidenceError):
    """An export refused because the directory does not verify; `report` says why."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Finding:
    level: str  # ERROR: the evidence does not verify; NOTE: true, worth knowing, not a failure
    kind: str  # a stable word, listed in docs/EVIDENCE.md
    files: tuple[str, ...]
    text: str

    def __str__(self) -> str:
        return f"{self.level.upper():5} {self.kind}: {self.text}"


@dataclass(frozen=True)
class TrustedKey:
    """A key the device's manifests may be signed with; `revoked_at` (ISO time) if the fleet
    has since replaced or revoked it."""

    key: minisign.PublicKey
    label: str
    revoked_at: str | None = None


KeysFor = Callable[[str], Sequence[TrustedKey]]  # device id -> its keys


@dataclass
class Segment:
    """The files sharing one stem (`000123`), and what they say."""

    stem: str
    manifest_path: Path | None = None
    signature_path: Path | None = None
    ciphertext_path: Path | None = None
    raw: bytes = b""
    manifest: dict[str, Any] | None = None  # set only when it is a valid manifest
    sha256: str = ""  # of `raw`: what the next manifest must chain to

    @property
    def data(self) -> dict[str, Any]:
        """The manifest, for segments known to have a valid one."""
        assert self.manifest is not None
        return self.manifest

    @property
    def seq(self) -> int:
        return self.data["seq"]


@dataclass
class Report:
    directory: Path
    device_id: str | None = None
    segments: list[Segment] = field(default_factory=list)  # valid manifests, in (seq, stem) order
    findings: list[Finding] = field(default_factory=list)
    unusable: set[str] = field(default_factory=set)  # stems whose manifest is absent or invalid
    starts_at: int | None = None  # the chain's first seq here, when its predecessor is absent
    #                               and nothing explains why (see `verdict`)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == ERROR]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if f.level == NOTE]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, level: str, kind: str, files: Iterable[str], text: str) -> None:
        self.findings.append(Finding(level, kind, tuple(files), text))

    @property
    def verdict(self) -> str:
        """NOT VERIFIED (an error), INCOMPLETE (no error, but the chain's start is not here
        and nothing explains it: what is here is sound, what came before is unknown), or
        VERIFIED."""
        if not self.ok:
            return "NOT VERIFIED"
        return "INCOMPLETE" if self.starts_at is not None else "VERIFIED"

    def summary(self) -> str:
        seqs = [s.seq for s in self.segments]
        span = (f"{len(seqs)} segment(s), seq {min(seqs)}-{max(seqs)}, "
                f"{self.segments[0].data['start_utc']} to "
                f"{self.segments[-1].data['end_utc']}"
                if seqs else "no segments")
        start = (f"; segments before seq {self.starts_at} are not here, so the chain's start "
                 f"is not verified (--audit with --fleet tells whether the centre stored them)"
                 if self.ok and self.starts_at is not None else "")
        return (f"{self.verdict}: {self.directory}: {self.device_id or 'unknown device'}, "
                f"{span}{start}; {len(self.errors)} error(s), {len(self.notes)} note(s)")


# -- keys ----------------------------------------------------------------------------------------
def keys_from_pubkey_file(path: str | Path) -> KeysFor:
    """Trust one minisign public key file (`device.pub`) for whatever device id is claimed."""
    try:
        key = minisign.parse_public_key(Path(path).read_text())
    except (OSError, UnicodeDecodeError, minisign.MinisignError) as exc:
        raise EvidenceError(f"{path}: cannot use as a minisign public key: {exc}") from None
    trusted = [TrustedKey(key, f"{Path(path).name} (key {key.key_id_hex})")]
    return lambda device_id: trusted


def keys_from_fleet(fleet_dir: str | Path) -> KeysFor:
    """Trust the signing keys the fleet registry ever held for the claimed device id: the
    active one, and revoked ones (good only for what was recorded before the revocation)."""
    try:
        fleet = Fleet(fleet_dir)
    except (OSError, ValueError) as exc:
        raise EvidenceError(f"cannot read the fleet registry: {exc}") from None
    return keys_from_loaded_fleet(fleet)


def keys_from_loaded_fleet(fleet: Fleet) -> KeysFor:
    """As `keys_from_fleet`, for a Fleet already open (e.g. the ingest server's); it sees the
    registry as of the fleet's last `reload()`."""

    def keys_for(device_id: str) -> list[TrustedKey]:
        found = []
        for identity in list(fleet.identities):
            if identity.name != device_id or not identity.signing_key:
                continue
            public = public_key_from_b64(identity.signing_key)
            revoked = identity.revoked_at if identity.status != "active" else None
            found.append(TrustedKey(
                minisign.PublicKey(minisign.key_id_for(public), public),
                f"{device_id}'s {'revoked' if revoked else 'registered'} key "
                f"(serial {identity.serial})", revoked))
        return found

    return keys_for


def check_signed_manifest(manifest_path: str | Path, signature_path: str | Path,
                          keys_for: KeysFor) -> tuple[dict[str, Any] | None, list[Finding]]:
    """One segment's manifest and signature, checked as `verify_directory` checks each one
    (schema, signature by a key of the device the manifest names, key revocation), without
    its ciphertext or neighbours. Returns (the manifest if it is valid, the findings): the
    segment is acceptable when no finding is an ERROR. Files are named `NNNNNN.json` and
    `NNNNNN.json.minisig` in the messages, as on the device."""
    manifest_path, signature_path = Path(manifest_path), Path(signature_path)
    report = Report(manifest_path.parent)
    segment = Segment(manifest_path.name.removesuffix(MANIFEST_SUFFIX),
                      manifest_path=manifest_path, signature_path=signature_path)
    _read_manifest(report, segment)
    if segment.manifest is None:
        return None, report.findings
    report.device_id = segment.data["device_id"]
    report.segments = [segment]
    _check_signatures(report, keys_for)
    return segment.manifest, report.findings


# -- verifying -----------------------------------------------------------------------------------
def verify_directory(directory: str | Path, keys_for: KeysFor,
                     audit: AuditCheck | None = None) -> Report:
    """Every problem with the segments in `directory` (see docs/EVIDENCE.md for the kinds);
    with the ingest's `audit` log (`control_center.audit.check_audit`), also every segment it
    stored that is not here."""
    report = Report(Path(directory))
    if not report.directory.is_dir():
        raise EvidenceError(f"{directory}: not a directory")
    groups = _scan(report)
    segments = [g for g in groups if g.manifest is not None]
    report.device_id = _main_device(report, segments)
    segments = [s for s in segments if s.data["device_id"] == report.device_id]
    report.segments = sorted(segments, key=lambda s: (s.seq, s.stem))
    _check_signatures(report, keys_for)
    _check_ciphertexts(report)
    _check_names(report)
    _check_chain(report)
    if audit is not None:
        check_against_audit(report, audit)
    if not report.segments and report.ok:
        report.add(ERROR, "empty", [], f"no segment manifest (NNNNNN{MANIFEST_SUFFIX}) in "
                                       f"{report.directory}: nothing was verified")
    for segment in report.segments:
        cut = segment.data.get("cut") or {}
        if cut.get("truncated"):
            report.add(NOTE, "truncated", [segment.stem + SEGMENT_SUFFIX],
                       f"{segment.stem}{SEGMENT_SUFFIX} was closed by recovery after a crash "
                       f"({cut.get('reason', 'no reason given')}): its recording stops short, "
                       f"and what it holds is signed")
    return report


def _scan(report: Report) -> list[Segment]:
    """Group the directory's files by stem; read and check each manifest."""
    groups: dict[str, Segment] = {}
    for path in sorted(report.directory.iterdir()):
        for suffix, attr in ((SIGNATURE_SUFFIX, "signature_path"),
                             (MANIFEST_SUFFIX, "manifest_path"),
                             (SEGMENT_SUFFIX, "ciphertext_path")):
            stem = path.name[:-len(suffix)]
            if path.name.endswith(suffix) and STEM.match(stem):
                setattr(groups.setdefault(stem, Segment(stem)), attr, path)
                break
        else:
            if path.name.endswith(SEGMENT_SUFFIX + ".part"):
                report.add(NOTE, "interrupted", [path.name],
                           f"{path.name} is a recording cut short and not yet closed by the "
                           f"device's recovery; it has no manifest and is not evidence yet")
    for group in groups.values():
        _read_manifest(report, group)
    return list(groups.values())


def _read_manifest(report: Report, group: Segment) -> None:
    stem = group.stem
    report.unusable.add(stem)  # until its manifest is read and found valid
    if group.manifest_path is None:
        if group.ciphertext_path is not None:
            report.add(ERROR, "no-manifest", [group.ciphertext_path.name],
                       f"{group.ciphertext_path.name} has no manifest {stem}{MANIFEST_SUFFIX}: "
                       f"nothing says what it is, when it was recorded or that it is genuine")
        if group.signature_path is not None:
            report.add(ERROR, "no-manifest", [group.signature_path.name],
                       f"{group.signature_path.name} has no manifest {stem}{MANIFEST_SUFFIX}")
        return
    name = group.manifest_path.name
    try:
        group.raw = read_regular(group.manifest_path, MANIFEST_LIMITS.max_bytes)
    except OSError as exc:
        _unreadable(report, group.manifest_path, exc)
        return
    group.sha256 = hashlib.sha256(group.raw).hexdigest()
    try:
        data = loads_untrusted(group.raw, MANIFEST_LIMITS)
    except ValueError as exc:
        report.add(ERROR, "unreadable", [name], f"{name} is not usable JSON ({exc})")
        return
    problems = manifest_problems(data)
    if problems:
        report.add(ERROR, "unreadable", [name],
                   f"{name} is not a valid manifest: {'; '.join(problems)}")
        return
    group.manifest = data
    report.unusable.discard(stem)


def _unreadable(report: Report, path: Path, exc: OSError) -> None:
    """One finding for a file that cannot be read: `not-a-file` (a FIFO, directory, symlink,
    device or socket carrying a segment's name) or `unreadable`."""
    if isinstance(exc, NotARegularFile):
        report.add(ERROR, "not-a-file", [path.name], f"{exc}: not read, and not evidence")
    else:
        report.add(ERROR, "unreadable", [path.name],
                   f"{path.name} cannot be read: {exc.strerror or exc}")


def _main_device(report: Report, segments: list[Segment]) -> str | None:
    counts = Counter(s.data["device_id"] for s in segments)
    if not counts:
        return None
    device_id = counts.most_common(1)[0][0]
    for segment in segments:
        other = segment.data["device_id"]
        if other != device_id:
            report.add(ERROR, "other-device", [segment.stem + MANIFEST_SUFFIX],
                       f"{segment.stem}{MANIFEST_SUFFIX} is from device {other}, among "
                       f"{device_id}'s segments; check that device's directory separately")
    return device_id


def _check_signatures(report: Report, keys_for: KeysFor) -> None:
    if report.device_id is None:
        return
    keys = list(keys_for(report.device_id))
    if not keys:
        report.add(ERROR, "no-key", [],
                   f"no signing key for {report.device_id} (not in the fleet registry, or "
                   f"never enrolled with a signing key): no signature could be checked")
        return
    for segment in report.segments:
        problem = _signature_problem(segment, keys)
        if problem is not None:
            report.add(*problem)


def _signature_problem(segment: Segment,
                       keys: list[TrustedKey]) -> tuple[str, str, list[str], str] | None:
    """(level, kind, files, text) if the manifest's signature is missing, foreign or bad."""
    name = segment.stem + MANIFEST_SUFFIX
    if segment.signature_path is None:
        return ERROR, "unsigned", [name], f"{name} has no signature {segment.stem}" \
                                          f"{SIGNATURE_SUFFIX}"
    sig_name = segment.signature_path.name
    try:
        text = read_regular(segment.signature_path, SIGNATURE_LIMIT).decode()
        signature = minisign.parse_signature(text)
    except NotARegularFile as exc:
        return ERROR, "not-a-file", [sig_name], f"{exc}: not read, and not evidence"
    except OSError as exc:
        return ERROR, "unreadable", [sig_name], f"{sig_name} cannot be read: {exc}"
    except (UnicodeDecodeError, minisign.MinisignError) as exc:
        return ERROR, "bad-signature", [sig_name], f"{sig_name}: {exc}"
    candidates = [k for k in keys if k.key.key_id == signature.key_id]
    if not candidates:
        trusted = ", ".join(k.label for k in keys)
        return (ERROR, "foreign-key", [name, sig_name],
                f"{sig_name} was made with another key (key id "
                f"{minisign.key_id_hex(signature.key_id)}), not the device's: {trusted}")
    for key in candidates:
        try:
            minisign.verify_with(key.key, segment.raw, text)
        except minisign.MinisignError:
            continue
        return _revocation_problem(segment, key)
    return (ERROR, "bad-signature", [name, sig_name],
            f"{sig_name} does not match {name} (the manifest was changed after it was signed, "
            f"or the signature is damaged)")


def _revocation_problem(segment: Segment,
                        key: TrustedKey) -> tuple[str, str, list[str], str] | None:
    if key.revoked_at is None:
        return None
    name = segment.stem + MANIFEST_SUFFIX
    start = segment.data["start_utc"]
    if _when(start) < _when(key.revoked_at):
        return (NOTE, "revoked-key", [name],
                f"{name} is signed with {key.label}, revoked at {key.revoked_at}, after this "
                f"segment's start ({start})")
    return (ERROR, "revoked-key", [name],
            f"{name} is signed with {key.label}, revoked at {key.revoked_at}, before this "
            f"segment's claimed start ({start}): whoever signed it held a withdrawn key")


def _check_ciphertexts(report: Report) -> None:
    """Each `.ts.age` against its manifest. Its size is compared first, and it is hashed only
    if that size is one a manifest here signs: a hostile file (a sparse 100 TB one) costs
    an fstat, not hours of hashing."""
    by_hash = {s.data["ciphertext_sha256"]: s for s in report.segments}
    sizes = {s.data["ciphertext_bytes"] for s in report.segments}
    for segment in report.segments:
        manifest = segment.manifest
        assert manifest is not None
        name = segment.stem + SEGMENT_SUFFIX
        if segment.ciphertext_path is None:
            report.add(ERROR, "no-segment", [segment.stem + MANIFEST_SUFFIX],
                       f"{segment.stem}{MANIFEST_SUFFIX} describes {name}, which is not here "
                       f"(deleted, or not yet copied)")
            continue
        try:
            size, digest = _size_and_sha256(segment.ciphertext_path, sizes)
        except OSError as exc:
            _unreadable(report, segment.ciphertext_path, exc)
            continue
        if digest == manifest["ciphertext_sha256"] and size == manifest["ciphertext_bytes"]:
            continue
        owner = by_hash.get(digest) if digest is not None else None
        hint = (f"; it is the segment of {owner.stem}{MANIFEST_SUFFIX} (swapped or renamed)"
                if owner is not None and owner is not segment else "")
        found = (f"SHA-256 {digest[:16]}..., {size} bytes" if digest is not None else
                 f"{size} bytes (not hashed: no manifest here signs that size)")
        report.add(ERROR, "altered", [name, segment.stem + MANIFEST_SUFFIX],
                   f"{name} is not the file its manifest signed: {found}; "
                   f"{segment.stem}{MANIFEST_SUFFIX} says "
                   f"{manifest['ciphertext_sha256'][:16]}..., {manifest['ciphertext_bytes']} "
                   f"bytes{hint}")


def _size_and_sha256(path: Path, sizes: set[int]) -> tuple[int, str | None]:
    """(size, SHA-256) of a regular file; the hash only if the size is in `sizes` (fstat
    first, on the file opened), else None."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        return size, (sha256_of(f) if size in sizes else None)


def _check_names(report: Report) -> None:
    """A file's name must match the seq its manifest signs; renamed files are reported once
    per swapped pair, so the reader sees what happened rather than a cascade."""
    misnamed = {s.stem: s for s in report.segments if s.stem != f"{s.seq:06d}"}
    done: set[str] = set()
    for stem, segment in sorted(misnamed.items()):
        if stem in done:
            continue
        partner = misnamed.get(f"{segment.seq:06d}")
        if partner is not None and partner.seq == int(stem):
            done |= {stem, partner.stem}
            report.add(ERROR, "swapped", [f"{stem}.*", f"{partner.stem}.*"],
                       f"{stem}.* and {partner.stem}.* are swapped: {stem}{MANIFEST_SUFFIX} is "
                       f"signed as segment {segment.seq} and {partner.stem}{MANIFEST_SUFFIX} as "
                       f"segment {partner.seq}; in file-name order the recording is out of "
                       f"sequence (the chain is checked in signed order)")
        else:
            done.add(stem)
            report.add(ERROR, "renamed", [f"{stem}.*"],
                       f"{stem}{MANIFEST_SUFFIX} is signed as segment {segment.seq} "
                       f"({segment.seq:06d}{MANIFEST_SUFFIX}): the file was renamed or moved")


def _check_chain(report: Report) -> None:
    """In signed-seq order: no duplicates, no gaps, each manifest names its predecessor's hash."""
    previous: Segment | None = None
    for segment in report.segments:
        name = segment.stem + MANIFEST_SUFFIX
        prev_hash = segment.data["prev_manifest_sha256"]
        if previous is None:
            _chain_start(report, segment)
        elif segment.seq == previous.seq:
            report.add(ERROR, "duplicate", [previous.stem + MANIFEST_SUFFIX, name],
                       f"{previous.stem}{MANIFEST_SUFFIX} and {name} are both signed as segment "
                       f"{segment.seq}: the chain forks, at most one of them is the original")
        elif segment.seq > previous.seq + 1:
            missing = range(previous.seq + 1, segment.seq)
            files = sorted({f"{seq:06d}" for seq in missing} & report.unusable)
            why = (f"files {', '.join(f + '.*' for f in files)} are here but have no valid "
                   f"manifest (see above)" if files else "deleted or never delivered")
            report.add(ERROR, "gap", [previous.stem + MANIFEST_SUFFIX, name],
                       f"segment(s) {_seq_list(missing)} missing between "
                       f"{previous.stem}{MANIFEST_SUFFIX} and {name}: {why}")
        elif prev_hash is None:
            report.add(NOTE, "restart", [name],
                       f"{name} restarts the chain ({segment.data['chain_restart']}): "
                       f"nothing proves it follows {previous.stem}{MANIFEST_SUFFIX}")
        elif prev_hash != previous.sha256:
            report.add(ERROR, "chain", [previous.stem + MANIFEST_SUFFIX, name],
                       f"{name} does not follow {previous.stem}{MANIFEST_SUFFIX}: it names a "
                       f"predecessor with SHA-256 {prev_hash[:16]}..., but "
                       f"{previous.stem}{MANIFEST_SUFFIX} hashes to {previous.sha256[:16]}... "
                       f"(a manifest was edited, replaced or reordered)")
        previous = segment


def _chain_start(report: Report, first: Segment) -> None:
    name = first.stem + MANIFEST_SUFFIX
    manifest = first.manifest
    assert manifest is not None
    if manifest["prev_manifest_sha256"] is not None:
        report.starts_at = first.seq
        report.add(NOTE, "partial", [name],
                   f"the chain here starts at segment {first.seq} ({name}), which names a "
                   f"predecessor that is not here: segments before it were deleted, or never "
                   f"reached this directory (on a device: uploaded and deleted); nothing before "
                   f"it is checked")
    elif first.seq != FIRST_SEQ:
        report.add(NOTE, "restart", [name],
                   f"{name} starts a new chain ({manifest['chain_restart']})")


# -- against the ingest's audit log --------------------------------------------------------------
def check_against_audit(report: Report, audit: AuditCheck) -> None:
    """Every segment the audit log says the ingest stored for this device must be here:
    `missing` for each one that is not (its head, tail or middle deleted after it was
    stored), also for seqs up to the highest that a signed head vouches for (found even if the
    log's tail was cut). The log's own findings are included (kinds prefixed `audit-`). A chain
    whose start is absent is explained when the log shows the ingest never stored it."""
    name = audit.path.name
    for finding in audit.findings:
        report.add(finding.level, f"audit-{finding.kind}", [name], f"{name}: {finding.text}")
    device = report.device_id or report.directory.name
    stored = _stored_in_audit(audit, device)
    present = {s.seq: s for s in report.segments}
    invalid = {int(stem) for stem in report.unusable if stem.isdigit()}
    for seq, (line, entry) in sorted(stored.items()):
        if seq in present:
            _compare_stored(report, present[seq], name, line, entry)
        elif seq not in invalid:  # files here with a bad manifest are reported already
            report.add(ERROR, "missing", [f"{seq:06d}.*"],
                       f"segment {seq} ({seq:06d}.*) is not here, but the ingest stored it "
                       f"({name} line {line}, {entry['time']}, manifest SHA-256 "
                       f"{str(entry.get('manifest_sha256'))[:16]}...): deleted after it was "
                       f"stored")
    _check_signed_highest(report, audit, device, set(stored) | set(present) | invalid)
    unaudited = sorted(set(present) - set(stored))
    if unaudited:
        report.add(NOTE, "unaudited", [name],
                   f"{name} has no segment_stored line for segment(s) "
                   f"{', '.join(map(str, unaudited))} of {device}: not stored by the ingest that "
                   f"writes this log (copied in, or stored before the log began)")
    if (report.starts_at is not None and stored
            and not any(seq < report.starts_at for seq in stored)):
        _explain_start(report, audit, device, min(line for line, _ in stored.values()))


def _explain_start(report: Report, audit: AuditCheck, device: str, first_line: int) -> None:
    """The chain's start is absent, and the log has no earlier `segment_stored` line of the
    device. That explains the start (the `partial` NOTE says so, and the verdict is
    VERIFIED) only if an anchor outside the log, checked with the centre key, vouches for
    the device's first `segment_stored` line (and so for every line before it): an
    unanchored log could have had those earlier lines removed with the segments."""
    first = report.starts_at
    assert first is not None
    name = audit.path.name
    manifest = f"{first:06d}{MANIFEST_SUFFIX}"
    report.findings = [f for f in report.findings if (f.kind, f.files) != ("partial", (manifest,))]
    if not audit.anchors_checked or audit.anchored < first_line:
        why = ("its signed heads were not checked (no centre key: give --fleet)"
               if not audit.anchors_checked else
               f"no signed head or receipt vouches for its line {first_line} (the first for "
               f"{device})")
        report.add(NOTE, "partial", [manifest],
                   f"the chain here starts at segment {first} ({manifest}), which names a "
                   f"predecessor that is not here; {name} has no segment_stored line of "
                   f"{device} before it, but {why}, so lines for earlier segments could have "
                   f"been removed with them: nothing before it is checked")
        return
    report.add(NOTE, "partial", [manifest],
               f"the chain here starts at segment {first} ({manifest}), and {name} shows that "
               f"the ingest never stored a segment of {device} before it (its lines up to "
               f"{first_line} are vouched for by {audit.anchor}): they never reached this "
               f"centre (for example deleted on the card to make room for SOS evidence, or "
               f"recorded before this log began), rather than deleted here")
    report.starts_at = None


def _stored_in_audit(audit: AuditCheck, device: str) -> dict[int, tuple[int, dict[str, Any]]]:
    """{seq: (line number, entry)} of the device's `segment_stored` lines."""
    stored = {}
    for line in audit.lines:
        entry = line.entry
        if (entry is not None and entry.get("event") == "segment_stored"
                and entry.get("device_id") == device and type(entry.get("seq")) is int):
            stored.setdefault(entry["seq"], (line.number, entry))
    return stored


def _compare_stored(report: Report, segment: Segment, name: str, line: int,
                    entry: dict[str, Any]) -> None:
    if entry.get("manifest_sha256") not in (None, segment.sha256):
        manifest = segment.stem + MANIFEST_SUFFIX
        report.add(ERROR, "audit-mismatch", [manifest],
                   f"{manifest} hashes to {segment.sha256[:16]}..., but the ingest stored "
                   f"segment {segment.seq} with manifest SHA-256 "
                   f"{str(entry['manifest_sha256'])[:16]}... ({name} line {line}): replaced "
                   f"after it was stored")


def _check_signed_highest(report: Report, audit: AuditCheck, device: str,
                          known: set[int]) -> None:
    """Seqs up to the highest a signed head says was stored, known neither here nor to the
    log: the store's tail and the log's tail were both cut."""
    vouched = [(h.statement["stored"][device], h.statement["time"]) for h in audit.heads
               if type((h.statement.get("stored") or {}).get(device)) is int]
    if not vouched:
        return
    highest, when = max(vouched)
    unknown = range(max(known, default=0) + 1, highest + 1)
    if unknown:
        report.add(ERROR, "missing", [],
                   f"the centre signed at {when} that it had stored segments of {device} up to "
                   f"seq {highest} ({audit.path.name}.heads), but segment(s) "
                   f"{_seq_list(unknown)} are neither here nor in the audit log: deleted, and "
                   f"the log's tail cut")


# -- decrypting and exporting --------------------------------------------------------------------
def decrypt_segment(path: str | Path, identity: str | Path, out: str | Path) -> Path:
    """Decrypt one `.ts.age` segment to a playable `.ts` with the stock `age` binary.

    `out` appears only when decryption succeeded (written beside it first, then renamed).
    """
    age = shutil.which("age")
    if age is None:
        raise EvidenceError(f"the `age` binary is not installed; {AGE_HINT}")
    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    done = subprocess.run([age, "--decrypt", "--identity", str(identity), "--output", str(tmp),
                           str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise EvidenceError(f"{path}: age could not decrypt it: {done.stderr.strip()}")
    os.replace(tmp, out)
    return out


@dataclass(frozen=True)
class Decrypted:
    """What `decrypt_or_salvage` did with one segment."""

    output: Path | None  # None: nothing could be recovered, so no file was written
    complete: bool  # the whole segment was decrypted
    salvaged: bool  # the salvage decryptor wrote it (the segment was cut short)
    chunks: int  # authenticated 64 KiB chunks written by the salvage decryptor (0 for age)
    plaintext_bytes: int
    sha256: str  # of the input .ts.age, as read
    manifest: dict[str, Any] | None  # the manifest beside the input (NOT verified), if readable
    stopped_because: str = ""  # salvage: where and why it stopped
    age_error: str = ""  # stock age's complaint, when it was tried and failed


def decrypt_or_salvage(path: str | Path, identity: str | Path, out: str | Path) -> Decrypted:
    """Decrypt one segment; if it was cut short, recover the authenticated part of it.

    A segment whose manifest (`NNNNNN.json` beside it) has a `cut` goes straight to the salvage
    decryptor (`evidence_format.age_stream.salvage_into`); any other goes to stock `age`
    (`decrypt_segment`), and only if age fails AND the salvage decryptor finds the file merely
    truncated (not altered, not another key's) is the authenticated prefix kept. `out` is
    written (beside it first, then renamed) only when at least one chunk was recovered;
    otherwise `output` is None. An altered chunk, a wrong identity or a file that is not age
    raise EvidenceError, as with `decrypt_segment`."""
    path, out = Path(path), Path(out)
    manifest = _manifest_beside(path)
    try:
        digest, _ = _sha256_file(path)
    except OSError as exc:
        raise EvidenceError(f"{path}: cannot read it: {exc}") from None
    age_error = ""
    if not (manifest or {}).get("cut"):
        if shutil.which("age") is None:
            raise EvidenceError(f"the `age` binary is not installed; {AGE_HINT}")
        try:
            decrypt_segment(path, identity, out)
        except EvidenceError as exc:
            age_error = str(exc)
        else:
            return Decrypted(out, True, False, 0, out.stat().st_size, digest, manifest)
    try:
        keys = age_stream.parse_identities(Path(identity).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EvidenceError(f"{identity}: cannot use it as an age identity file: {exc}") from None
    tmp = out.with_name(out.name + ".part")
    try:
        with open(path, "rb") as source, open(tmp, "wb") as sink:
            report = age_stream.salvage_into(source, keys, sink)
    except age_stream.AgeFormatError as exc:
        tmp.unlink(missing_ok=True)
        raise EvidenceError(f"{path}: cannot be decrypted: {exc}"
                            + (f" (stock {age_error})" if age_error else "")) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finished = report.stopped_because == age_stream.FINISHED
    if not finished and not _truncation(report.stopped_because):
        tmp.unlink(missing_ok=True)  # damage or trailing data: not what a power cut leaves
        raise EvidenceError(f"{path}: not decrypted: {report.stopped_because}; it was altered "
                            f"or damaged, not cut short" + (f" ({age_error})" if age_error else ""))
    if report.chunks == 0:
        tmp.unlink(missing_ok=True)
        output = None
    else:
        os.replace(tmp, out)
        output = out
    return Decrypted(output, finished, True, report.chunks, report.bytes, digest, manifest,
                     "" if finished else report.stopped_because, age_error)


def _truncation(stopped_because: str) -> bool:
    """Whether `salvage_into` stopped because the file ends early (see its texts)."""
    return stopped_because.startswith("file ends") or "(truncated" in stopped_because


def _manifest_beside(path: Path) -> dict[str, Any] | None:
    """The manifest `NNNNNN.json` next to `NNNNNN.ts.age`, parsed but not verified."""
    if not path.name.endswith(SEGMENT_SUFFIX):
        return None
    try:
        data = loads_untrusted(read_regular(path.with_name(path.name.removesuffix(SEGMENT_SUFFIX)
                                                           + MANIFEST_SUFFIX),
                                            MANIFEST_LIMITS.max_bytes), MANIFEST_LIMITS)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and not manifest_problems(data) else None


@dataclass
class Export:
    report: Report
    segments: list[Segment]
    video: Path
    track: Path
    record: Path
    track_points: int
    forced: bool
    skipped: list[str] = field(default_factory=list)  # the call's segment files not present


def export_call(directory: str | Path, call_id: str, *, identity: str | Path,
                outdir: str | Path, keys_for: KeysFor, force: bool = False) -> Export:
    """Verify `directory`, then write the call's video (`CALL.ts`, its segments decrypted in
    seq order and joined), its track (`CALL.gpx`) and a record of what was checked
    (`CALL.verification.txt`). Raises EvidenceError if verification fails, unless `force`."""
    report = verify_directory(directory, keys_for)
    segments = [s for s in report.segments if s.data["call_id"] == call_id]
    if not segments:
        raise EvidenceError(f"{directory}: no segment of call {call_id!r}")
    if not report.ok and not force:
        raise ExportRefused(f"refusing to export call {call_id!r}: {directory} does not verify "
                      f"({len(report.errors)} error(s)); --force exports it anyway", report)
    usable = [s for s in segments if s.ciphertext_path is not None]
    skipped = [s.stem + SEGMENT_SUFFIX for s in segments if s.ciphertext_path is None]
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    base = outdir / _safe_name(call_id)
    video = _join_decrypted(usable, identity, base.with_name(base.name + ".ts"))
    gpx = gpx_document(usable, call_id, report.device_id or "unknown", verified=report.ok)
    ET.fromstring(gpx)  # well-formed, or fail here rather than in a court's viewer
    track = base.with_name(base.name + ".gpx")
    track.write_bytes(gpx)
    export = Export(report, usable, video, track, base.with_name(base.name + ".verification.txt"),
                    sum(len(s.data["gps_track"]) for s in usable),
                    forced=not report.ok, skipped=skipped)
    export.record.write_text(verification_record(export, call_id))
    return export


def _join_decrypted(segments: list[Segment], identity: str | Path, out: Path) -> Path:
    """MPEG-TS streams may be joined byte by byte; each segment starts at a keyframe."""
    tmp = out.with_name(out.name + ".part")
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as scratch, open(tmp, "wb") as joined:
            for segment in segments:
                assert segment.ciphertext_path is not None
                plain = decrypt_segment(segment.ciphertext_path, identity,
                                        Path(scratch) / f"{segment.stem}.ts")
                with open(plain, "rb") as part:
                    shutil.copyfileobj(part, joined, 1 << 20)
                plain.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half video left that could be mistaken for the export
        raise
    os.replace(tmp, out)
    return out


def gpx_document(segments: Sequence[Segment], call_id: str, device_id: str, *,
                 verified: bool) -> bytes:
    """GPX 1.1: one track, one track segment, the manifests' points in seq order."""
    ET.register_namespace("", GPX_NS)

    def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
        element = ET.SubElement(parent, f"{{{GPX_NS}}}{tag}", attrs)
        element.text = text
        return element

    root = ET.Element(f"{{{GPX_NS}}}gpx", {"version": "1.1", "creator": "sos-evidence"})
    metadata = sub(root, "metadata")
    sub(metadata, "name", f"call {call_id}")
    sub(metadata, "desc", f"{device_id}, segments "
                          f"{', '.join(s.stem for s in segments)}; "
                          f"{'verified' if verified else 'NOT VERIFIED'} by sos-evidence")
    if segments:
        sub(metadata, "time", segments[0].data["start_utc"])
    track = sub(root, "trk")
    sub(track, "name", f"call {call_id}")
    trkseg = sub(track, "trkseg")
    for segment in segments:
        for point in segment.data["gps_track"]:
            trkpt = sub(trkseg, "trkpt", lat=f"{point['lat']:.7f}", lon=f"{point['lon']:.7f}")
            if point.get("alt_m") is not None:
                sub(trkpt, "ele", f"{point['alt_m']:.2f}")
            sub(trkpt, "time", point["utc"])
            sub(trkpt, "desc", f"segment {segment.stem}")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def verification_record(export: Export, call_id: str) -> str:
    """The text kept beside an export: what was checked, what was found, the output hashes."""
    lines = [f"sos-evidence export of call {call_id}"]
    if export.forced:
        lines.append("WARNING: EXPORTED WITH --force ALTHOUGH VERIFICATION FAILED")
    lines += [str(f) for f in export.report.findings] + [export.report.summary(), "",
                                                          "segments (seq, file, manifest sha256):"]
    lines += [f"  {s.seq} {s.stem}{SEGMENT_SUFFIX} {s.sha256}" for s in export.segments]
    if export.skipped:
        lines.append(f"MISSING from the video (files not present): {', '.join(export.skipped)}")
    lines += ["", "outputs (sha256):"]
    lines += [f"  {_sha256_file(p)[0]}  {p.name}" for p in (export.video, export.track)]
    return "\n".join(lines) + "\n"


# -- small helpers -------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    return _sha256_file(Path(path))[0]


def _sha256_file(path: Path) -> tuple[str, int]:
    with open_regular(path) as f:
        digest = sha256_of(f)
        return digest, f.tell()


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _seq_list(seqs: range) -> str:
    if len(seqs) <= 5:
        return ", ".join(str(s) for s in seqs)
    return f"{seqs[0]}-{seqs[-1]} ({len(seqs)} segments)"


def _safe_name(call_id: str) -> str:
    """A call id as a file name: anything but letters, digits, '.', '_' and '-' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", call_id).lstrip(".") or "call"
