"""The console's evidence browser: what the ingest stored, whether it verifies, and exports.

The evidence is the ingest's DirectoryStore (control_center/ingest/stores.py): one directory per
device under `evidence_dir`, holding each segment's `NNNNNN.ts.age`, `NNNNNN.json` and
`NNNNNN.json.minisig` exactly as the device wrote them. Checking and exporting are
control_center/evidence.py's (`verify_directory`, `export_call`), the same code as `sos-evidence
verify` and `export`, so the console cannot come to another verdict than the command line.

Every view and every export is written to the audit log with the operator's name
(`console_evidence_view`, `console_evidence_export`, and `console_evidence_export_refused` for
an export that was asked for and not made): the evidence right lets operators look, and the log
shows who looked at what and when.

Export ids and device ids reach this module from URLs: a device id must be a fleet device name
and a directory that exists under `evidence_dir` (no symlink), a call id must be one that a
valid manifest of that device names, and a served file must be a plain name of a regular file
in an export directory whose name has the form this module generates. Nothing a client sends is
joined into a path before it passed those checks, so `..`, `/`, absolute paths and odd names
find nothing.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_center.audit import AuditLog
from control_center.evidence import (
    EvidenceError,
    ExportRefused,
    Report,
    export_call,
    file_sha256,
    keys_from_loaded_fleet,
    verify_directory,
)
from control_center.fleet import DEVICE_ID, Fleet

log = logging.getLogger(__name__)

EXPORT_ID = re.compile(r"[0-9a-f]{32}")  # what `_new_export_id` makes: 128 random bits, hex
# A served file: what export_call names its outputs (evidence._safe_name + a suffix); no
# separator, no leading dot (so neither `.` nor `..`).
FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
MAX_CALL_ID = 200  # as the manifest schema allows (evidence_format/manifest.py)
STAGING_PREFIX = ".staging-"  # an export being written: never matches EXPORT_ID, never served
MAX_AUDITED_ERRORS = 20  # of a refused export's findings, in its audit line (the rest: a count)
MAX_AUDITED_TEXT = 300  # characters of a client-sent value or a reason kept in an audit line

VIEW_EVENT = "console_evidence_view"
EXPORT_EVENT = "console_evidence_export"
REFUSED_EVENT = "console_evidence_export_refused"

# What makes a device directory's verification result stale: for each entry, its name, file
# type, size, mtime_ns, ctime_ns and inode. mtime can be set back by anyone who can write the
# file (`touch -r`), ctime cannot, and a replace (the ingest's rename) changes the inode.
Fingerprint = tuple[tuple[str, int, int, int, int, int], ...]


class InvalidId(ValueError):
    """A device id or call id that is not one (bad form, too long): 400, not 404."""


class CallRefused(ExportRefused):
    """The call's evidence does not verify, so it is not exported (there is no force here:
    `sos-evidence export --force` is for an expert at a terminal, with its warnings).
    `errors`: the verification's error findings, one line each."""

    def __init__(self, device_id: str, call_id: str, report: Report) -> None:
        self.errors = [_finding_line(f) for f in report.errors]
        first = f": {self.errors[0]}" if self.errors else ""
        super().__init__(f"call {call_id!r} of {device_id} is not exported: its evidence does "
                         f"not verify ({len(self.errors)} error(s)){first}", report)


@dataclass(frozen=True)
class _Checked:
    """One device directory's verification, with the fingerprint it was made for."""

    fingerprint: Fingerprint
    keys: tuple[tuple[str | None, ...], ...]
    summary: dict[str, Any]


class EvidenceBrowser:
    """The evidence browser's backend (docs/CONSOLE-API.md, `/api/evidence`, `/api/exports`).

    Verification results are cached per device directory, keyed by a fingerprint of the
    directory listing (each entry's name, type, size, mtime_ns, ctime_ns and inode: one
    `stat` per file, no reads) and of the device's keys in the fleet registry. A repeat view
    of unchanged evidence therefore re-hashes nothing, while a segment that arrives, vanishes
    or is rewritten (even with its mtime set back: the ctime moves) or a key that is revoked
    makes the next view verify the directory again. The fingerprint is taken before verifying,
    so a change during a verification is seen by the next view. An export never uses the
    cache: `export_call` verifies the directory in full, from the files, every time.

    Thread-safe: the HTTP server may call it from several threads; two views racing on a
    changed directory may both verify it, which costs time, not correctness.
    """

    def __init__(self, evidence_dir: Path, fleet: Fleet, exports_dir: Path,
                 audit: AuditLog) -> None:
        self._evidence_dir = Path(evidence_dir)
        self._fleet = fleet
        self._exports_dir = Path(exports_dir)
        self._audit = audit
        self._cache: dict[str, _Checked] = {}
        self._lock = threading.Lock()

    # -- viewing ---------------------------------------------------------------------------------
    def overview(self, user: str) -> dict[str, Any]:
        """Every device's evidence: `{"devices": [{device_id, verdict, ok, errors, notes,
        segments, calls: [{call_id, segments, first_at, last_at, ok, errors}]}]}`, by device
        id. `verdict` is evidence.Report's (VERIFIED, INCOMPLETE or NOT VERIFIED); the audit
        log's cross-check (`sos-evidence verify --audit`) is not made here. A call's `ok` and
        `errors` are the device's errors that concern that call (`_call_errors`); an export
        is still refused while the device's evidence as a whole does not verify
        (`export_call`). Audited (the view is refused if the line cannot be written). The
        records are the caller's to change: the cache keeps its own."""
        self._follow_registry()
        devices = [copy.deepcopy(self._checked(name)) for name in self._device_names()]
        self._audit.append(VIEW_EVENT, user, count=len(devices))
        return {"devices": devices}

    def _device_names(self) -> list[str]:
        """The device directories under `evidence_dir` (real directories named like a device;
        anything else there is none of the ingest's)."""
        try:
            entries = list(os.scandir(self._evidence_dir))
        except FileNotFoundError:  # nothing uploaded yet
            return []
        return sorted(e.name for e in entries
                      if DEVICE_ID.fullmatch(e.name) and e.is_dir(follow_symlinks=False))

    def _checked(self, device_id: str) -> dict[str, Any]:
        """The device's summary, verified again only if its directory or keys changed."""
        directory = self._evidence_dir / device_id
        fingerprint = _fingerprint(directory)
        keys = self._key_stamp(device_id)
        with self._lock:
            cached = self._cache.get(device_id)
        if cached is not None and (cached.fingerprint, cached.keys) == (fingerprint, keys):
            return cached.summary
        summary = _summarise(device_id, directory, self._fleet)
        with self._lock:
            self._cache[device_id] = _Checked(fingerprint, keys, summary)
        return summary

    def _key_stamp(self, device_id: str) -> tuple[tuple[str | None, ...], ...]:
        """What of the registry decides the device's verification: its identities' keys."""
        return tuple((i.serial, i.status, i.signing_key, i.revoked_at)
                     for i in list(self._fleet.identities) if i.name == device_id)

    def _follow_registry(self) -> None:
        """Re-read the fleet registry if its file changed (an enrolment or revocation by `sos-
        center ca` in another process): verification must use the keys as they are now."""
        try:
            self._fleet.reload_if_changed()
        except (OSError, ValueError, TypeError) as exc:  # keep the last good registry
            log.error("could not re-read the fleet registry %s: %s", self._fleet.registry_file,
                      exc)

    # -- exporting -------------------------------------------------------------------------------
    def export(self, user: str, device_id: str, call_id: str) -> dict[str, Any]:
        """Decrypt and export one call: `{"export_id", "device_id", "call_id", "verified",
        "verdict", "files": [{"name", "size", "sha256", "url"}]}`.

        The call's video (`.ts`), track (`.gpx`) and verification record are written by
        `export_call` into a staging directory, renamed to `exports_dir/<export_id>/` when
        complete (so no half export is ever served), and audited with every file's hash. Raises
        InvalidId (a ValueError) for a malformed id, LookupError for an unknown device or call,
        CallRefused (an EvidenceError) when the evidence does not verify, EvidenceError when it
        cannot be decrypted or the audit line cannot be written (the export is then removed:
        no plaintext leaves without its audit line). Every failure is audited as
        `console_evidence_export_refused`, as far as the log can be written."""
        try:
            return self._export(user, device_id, call_id)
        except (ValueError, LookupError, OSError, EvidenceError) as exc:
            self._audit_refused(user, device_id, call_id, exc)
            raise

    def _export(self, user: str, device_id: str, call_id: str) -> dict[str, Any]:
        directory = self._device_directory(device_id)
        _check_call_id(call_id)
        self._follow_registry()
        if call_id not in {c["call_id"] for c in self._checked(device_id)["calls"]}:
            raise LookupError(f"no call {call_id!r} in the evidence of {device_id}")
        identity = self._fleet.evidence_identity_file
        if not identity.is_file():
            raise EvidenceError(f"the evidence identity {identity} is not on this centre: "
                                f"evidence cannot be decrypted here")
        export_id = secrets.token_hex(16)
        self._exports_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = self._exports_dir / f"{STAGING_PREFIX}{export_id}"
        final = self._exports_dir / export_id
        try:
            done = export_call(directory, call_id, identity=identity, outdir=staging,
                               keys_for=keys_from_loaded_fleet(self._fleet), force=False)
            if done.report.device_id != device_id:  # verified, but another device's segments
                raise EvidenceError(f"the segments in {device_id}'s directory are "
                                    f"{done.report.device_id}'s: not exported")
            os.rename(staging, final)
        except ExportRefused as refused:
            raise CallRefused(device_id, call_id, refused.report) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            files = [{"name": p.name, "size": p.stat().st_size, "sha256": file_sha256(p),
                      "url": f"/api/exports/{export_id}/{p.name}"}
                     for p in sorted(final.iterdir()) if p.is_file()]
            self._audit.append(
                EXPORT_EVENT, user, device_id=device_id, call_id=call_id, export_id=export_id,
                files=[{k: f[k] for k in ("name", "size", "sha256")} for f in files],
                seqs=[s.seq for s in done.segments],
                sha256=[s.data["ciphertext_sha256"] for s in done.segments],
                verified=done.report.ok, verdict=done.report.verdict)
        except (OSError, ValueError) as exc:
            shutil.rmtree(final, ignore_errors=True)
            raise EvidenceError(f"call {call_id!r} of {device_id} was exported, but it could "
                                f"not be hashed and audited ({exc}); the export was removed"
                                ) from None
        return {"export_id": export_id, "device_id": device_id, "call_id": call_id,
                "verified": done.report.ok, "verdict": done.report.verdict, "files": files}

    def _device_directory(self, device_id: str) -> Path:
        """The device's evidence directory; InvalidId for a name that is no device id,
        LookupError if there is no such directory (or it is a symlink)."""
        if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
            raise InvalidId(f"{_clip(device_id)!r} is not a device id")
        directory = self._evidence_dir / device_id
        try:
            is_dir = stat.S_ISDIR(os.lstat(directory).st_mode)
        except OSError:
            is_dir = False
        if not is_dir:
            raise LookupError(f"no evidence of {device_id}")
        return directory

    def _audit_refused(self, user: str, device_id: Any, call_id: Any,
                       exc: BaseException) -> None:
        """One line for an export asked for and not made. A log that cannot be written must
        not hide the refusal itself from the operator, so its failure is only logged."""
        fields: dict[str, Any] = {"device_id": _clip(device_id), "call_id": _clip(call_id),
                                  "reason": _clip(str(exc))}
        if isinstance(exc, CallRefused):
            fields["errors"] = [_clip(e) for e in exc.errors[:MAX_AUDITED_ERRORS]]
            fields["error_count"] = len(exc.errors)
        try:
            self._audit.append(REFUSED_EVENT, user, **fields)
        except (OSError, ValueError) as audit_exc:
            log.error("could not audit a refused export by %s: %s", user, audit_exc)

    # -- serving ---------------------------------------------------------------------------------
    def export_file(self, export_id: str, name: str) -> Path:
        """The file to serve for `/api/exports/<export_id>/<name>`: a regular file (not a
        symlink) directly in an export directory this module made. LookupError otherwise,
        with the same text whatever was wrong, so nothing is learned by probing."""
        missing = LookupError(f"no exported file {_clip(name)!r} in export {_clip(export_id)!r}")
        if not (isinstance(export_id, str) and EXPORT_ID.fullmatch(export_id)
                and isinstance(name, str) and FILE_NAME.fullmatch(name)
                and not name.endswith(".part")):
            raise missing
        directory = self._exports_dir / export_id
        path = directory / name
        try:
            if not (stat.S_ISDIR(os.lstat(directory).st_mode)
                    and stat.S_ISREG(os.lstat(path).st_mode)):
                raise missing
        except OSError:
            raise missing from None
        return path


def _summarise(device_id: str, directory: Path, fleet: Fleet) -> dict[str, Any]:
    """Verify one device directory and say what the browser shows of it: the device's verdict,
    and each call's own (`ok`, `errors`: see `_call_errors`)."""
    try:
        report = verify_directory(directory, keys_from_loaded_fleet(fleet))
    except (EvidenceError, OSError) as exc:  # the directory vanished, or cannot be listed
        return {"device_id": device_id, "verdict": "NOT VERIFIED", "ok": False,
                "errors": [str(exc)], "notes": [], "segments": 0, "calls": []}
    errors = [_finding_line(f) for f in report.errors]
    device_wide: list[str] = []  # errors about no file: they concern every call
    if report.device_id not in (None, device_id):
        device_wide.append(f"other-device: the segments in {device_id}'s directory are signed "
                           f"as {report.device_id}'s")
        errors.extend(device_wide)
    calls: dict[str, dict[str, Any]] = {}
    call_of: dict[str, str] = {}  # segment stem -> its call id
    for segment in report.segments:
        call_id = segment.data["call_id"]
        if call_id is None:  # recorded outside a call (pre-roll, an SOS without a call)
            continue
        call_of[segment.stem] = call_id
        call = calls.setdefault(call_id, {"call_id": call_id, "segments": 0,
                                          "first_at": segment.data["start_utc"],
                                          "last_at": segment.data["end_utc"]})
        call["segments"] += 1
        call["first_at"] = min(call["first_at"], segment.data["start_utc"])
        call["last_at"] = max(call["last_at"], segment.data["end_utc"])
    per_call = _call_errors(report, call_of, device_wide)
    for call_id, call in calls.items():
        call["ok"] = not per_call[call_id]
        call["errors"] = per_call[call_id]
    return {"device_id": device_id, "verdict": "NOT VERIFIED" if errors else report.verdict,
            "ok": not errors, "errors": errors,
            "notes": [_finding_line(f) for f in report.notes],
            "segments": len(report.segments),
            "calls": sorted(calls.values(), key=lambda c: (c["first_at"], c["call_id"]))}


def _call_errors(report: Report, call_of: dict[str, str],
                 device_wide: list[str]) -> dict[str, list[str]]:
    """Each call's errors, in the report's order: those of its findings whose files
    (`000123.ts.age`, `000123.json`, `000123.json.minisig`, `000123.*`) belong to one of the
    call's segments (a finding about two segments, such as a gap or a broken chain link,
    concerns the calls of both), and every error about no file at all (no key for the
    device, segments signed as another device's), which concerns every call. An error about
    files of no call's segment (an unreadable manifest, whose call is unknown; a segment
    recorded outside a call; another device's segment) concerns no call by itself; a segment
    lost that way usually also breaks the chain, which the neighbouring calls show."""
    found: dict[str, list[str]] = {call_id: [] for call_id in set(call_of.values())}
    for finding in report.errors:
        line = _finding_line(finding)
        if not finding.files:
            concerned = set(found)
        else:
            stems = {name.split(".", 1)[0] for name in finding.files}
            concerned = {call_of[stem] for stem in stems if stem in call_of}
        for call_id in concerned:
            found[call_id].append(line)
    for call_id in found:
        found[call_id].extend(device_wide)
    return found


def _fingerprint(directory: Path) -> Fingerprint:
    """The directory listing, as cheaply as it can be had: one lstat per entry, no reads."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return ()
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:  # gone while listing: the next view sees the listing without it
            continue
        found.append((entry.name, stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns,
                      st.st_ctime_ns, st.st_ino))
    return tuple(sorted(found))


def _check_call_id(call_id: Any) -> None:
    """A call id as the manifest schema allows (1-200 characters), and printable: it is looked
    up among the device's signed manifests, never used as a path."""
    if (not isinstance(call_id, str) or not 1 <= len(call_id) <= MAX_CALL_ID
            or not call_id.isprintable()):
        raise InvalidId(f"{_clip(call_id)!r} is not a call id")


def _finding_line(finding: Any) -> str:
    return f"{finding.kind}: {finding.text}"


def _clip(value: Any) -> str:
    """A client-sent value (or a reason) for a message or an audit line: text, bounded."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_AUDITED_TEXT else text[:MAX_AUDITED_TEXT] + "..."
