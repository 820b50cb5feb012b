"""`sos-evidence`: verify, decrypt and export a device's recorded segments.

Exit status: 0 everything verified (or done; for `decrypt`, also when only the authenticated
part of a segment cut short could be recovered); 1 `verify` found problems, or `export --force`
wrote evidence that did not verify; 2 refused or could not run (bad arguments, no key, age
failed, an altered segment, export of unverified evidence without --force, the audit log could
not be written); 3 `decrypt` recovered nothing (a segment cut off before its first 64 KiB), or
`verify` found no problem but the chain's start is not in the directory and nothing explains
it (INCOMPLETE; --audit with --fleet tells whether the centre ever stored it).

Audit: `decrypt` and `export` append a `decrypted` / `exported` entry to the hash-chained
audit log named by --audit (default: $SOS_AUDIT_LOG; neither: no audit), with the operator
(--operator, default the login name) as its actor. See docs/EVIDENCE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from control_center import evidence
from control_center.audit import AuditCheck, AuditLog, centre_keys_from_fleet, check_audit
from control_center.evidence import EvidenceError, KeysFor
from evidence_format import minisign

AUDIT_ENV = "SOS_AUDIT_LOG"
NOTHING_RECOVERED = 3
INCOMPLETE = 3


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except EvidenceError as exc:
        print(f"sos-evidence: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sos-evidence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    verify = commands.add_parser("verify", help="check signatures, hashes and the chain")
    verify.add_argument("directory")
    _add_trust(verify)
    verify.add_argument("--audit", metavar="FILE", default=None,
                        help="the ingest's audit log: every segment it says it stored must be "
                             "here (deleted first or last segments are found); with --fleet its "
                             "signed heads (FILE.heads) are checked with the centre key too")
    verify.set_defaults(run=_verify)

    decrypt = commands.add_parser(
        "decrypt", help="decrypt one .ts.age segment with age; of one cut short (power loss), "
        "recover the authenticated part",
        description="Decrypt one segment with the stock age binary. If its manifest says it was "
        "cut short (`cut`), or age fails because the file is truncated, write the part that "
        "authenticates (whole 64 KiB chunks) and say how much was recovered. Exit 0 when "
        "anything was written, 3 when nothing could be recovered, 2 when it cannot be "
        "decrypted (wrong key, altered file).")
    decrypt.add_argument("--identity", required=True, help="age identity file (the centre's "
                         "evidence-identity.txt)")
    decrypt.add_argument("input", help="the segment, NNNNNN.ts.age (its NNNNNN.json beside it "
                         "is read for `cut`, device id and seq)")
    decrypt.add_argument("-o", "--output", required=True, help="the decrypted .ts")
    _add_audit(decrypt)
    decrypt.set_defaults(run=_decrypt)

    export = commands.add_parser("export", help="verify, then write one call's .ts and .gpx")
    export.add_argument("directory")
    export.add_argument("--identity", required=True, help="age identity file")
    export.add_argument("--call", required=True, help="the call id")
    export.add_argument("-o", "--output", required=True, help="output directory")
    export.add_argument("--force", action="store_true",
                        help="export even if verification fails (the record says so)")
    _add_trust(export)
    _add_audit(export)
    export.set_defaults(run=_export)

    pubkey = commands.add_parser("pubkey", help="print a device's minisign public key file "
                                 "from the fleet registry (for `minisign -V -p`)")
    pubkey.add_argument("device_id")
    pubkey.add_argument("--fleet", required=True, help="fleet directory")
    pubkey.set_defaults(run=_pubkey)
    return parser


def _add_trust(parser: argparse.ArgumentParser) -> None:
    trust = parser.add_mutually_exclusive_group(required=True)
    trust.add_argument("--pubkey", help="the device's minisign public key file")
    trust.add_argument("--fleet", help="fleet directory: the key is looked up by device id")


def _add_audit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audit", metavar="FILE", default=os.environ.get(AUDIT_ENV) or None,
                        help=f"append who did this to this audit log (control_center.audit; "
                             f"default: ${AUDIT_ENV} if set, otherwise no audit)")
    parser.add_argument("--operator", metavar="NAME", default=None,
                        help="who is doing it, for the audit log (default: the login name)")


def _keys(args: argparse.Namespace) -> KeysFor:
    if args.pubkey:
        return evidence.keys_from_pubkey_file(args.pubkey)
    return evidence.keys_from_fleet(args.fleet)


@contextlib.contextmanager
def _audit_log(args: argparse.Namespace) -> Iterator[AuditLog | None]:
    """The audit log (None without one), opened before any work: a log that cannot be opened
    stops the command before evidence is decrypted."""
    if not args.audit:
        yield None
        return
    try:
        audit = AuditLog(args.audit)
    except OSError as exc:
        raise EvidenceError(f"cannot open the audit log {args.audit}: {exc}") from None
    try:
        yield audit
    finally:
        audit.close()


def _operator(args: argparse.Namespace) -> str:
    if args.operator:
        return args.operator
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment and no passwd entry
        return f"uid-{os.getuid()}"


def _record(audit: AuditLog | None, event: str, args: argparse.Namespace,
            written: list[Path], **fields: Any) -> None:
    """Audit what was done; if that fails, the `written` outputs are removed: no plaintext
    leaves this tool without its audit entry."""
    if audit is None:
        return
    try:
        audit.append(event, _operator(args), **fields)
    except (OSError, ValueError) as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise EvidenceError(f"{event}, but the audit log {args.audit} could not be written "
                            f"({exc}); the output was removed") from None


def _verify(args: argparse.Namespace) -> int:
    report = evidence.verify_directory(args.directory, _keys(args), _audit_check(args))
    for finding in report.findings:
        print(finding)
    print(report.summary())
    return {"VERIFIED": 0, "INCOMPLETE": INCOMPLETE}.get(report.verdict, 1)


def _audit_check(args: argparse.Namespace) -> AuditCheck | None:
    """The audit log given with --audit, checked (its heads only with --fleet: the centre
    key is in the fleet directory)."""
    if not args.audit:
        return None
    keys = None
    if args.fleet:
        try:
            keys = centre_keys_from_fleet(args.fleet)
        except (OSError, ValueError) as exc:
            raise EvidenceError(f"cannot read the centre key in {args.fleet} to check the "
                                f"audit log's signed heads: {exc}") from None
    try:
        return check_audit(args.audit, keys)
    except OSError as exc:
        raise EvidenceError(f"cannot read the audit log {args.audit}: {exc}") from None


def _decrypt(args: argparse.Namespace) -> int:
    with _audit_log(args) as audit:
        done = evidence.decrypt_or_salvage(args.input, args.identity, args.output)
        name = Path(args.input).name
        if done.output is None:
            print(f"sos-evidence: NOTHING RECOVERED from {name}: it was cut short before its "
                  f"first complete 64 KiB chunk ({done.stopped_because}); no output written",
                  file=sys.stderr)
            return NOTHING_RECOVERED
        if done.complete:
            print(f"decrypted {args.input} -> {done.output}")
        else:
            print(f"PARTLY RECOVERED {name} -> {done.output}: {done.plaintext_bytes} bytes in "
                  f"{done.chunks} authenticated 64 KiB chunk(s); the rest of the segment was "
                  f"lost (cut short: {done.stopped_because})")
        manifest = done.manifest or {}
        stem = name.removesuffix(".ts.age")
        _record(audit, "decrypted", args, [done.output], device_id=manifest.get("device_id"),
                seq=manifest.get("seq", int(stem) if stem.isdigit() else None),
                sha256=done.sha256, input=str(Path(args.input).resolve()),
                output=str(done.output.resolve()),
                output_sha256=evidence.file_sha256(done.output), complete=done.complete,
                plaintext_bytes=done.plaintext_bytes,
                method="salvage" if done.salvaged else "age")
    return 0


def _export(args: argparse.Namespace) -> int:
    keys = _keys(args)
    with _audit_log(args) as audit:
        try:
            done = evidence.export_call(args.directory, args.call, identity=args.identity,
                                        outdir=args.output, keys_for=keys, force=args.force)
        except evidence.ExportRefused as refused:
            for finding in refused.report.findings:
                print(finding)
            print(refused.report.summary())
            raise
        for finding in done.report.findings:
            print(finding)
        print(done.report.summary())
        if done.forced:
            print("!" * 78, file=sys.stderr)
            print(f"WARNING: --force: call {args.call} EXPORTED ALTHOUGH VERIFICATION FAILED "
                  f"({len(done.report.errors)} error(s)); {done.record.name} says so",
                  file=sys.stderr)
            print("!" * 78, file=sys.stderr)
        print(f"exported call {args.call}: {len(done.segments)} segment(s) -> {done.video}; "
              f"{done.track_points} track point(s) -> {done.track}; record {done.record}")
        inputs = [s.ciphertext_path for s in done.segments if s.ciphertext_path is not None]
        _record(audit, "exported", args, [done.video, done.track, done.record],
                device_id=done.report.device_id, call_id=args.call,
                seqs=[s.seq for s in done.segments],
                sha256=[evidence.file_sha256(p) for p in inputs],
                output=str(done.video.resolve()), output_sha256=evidence.file_sha256(done.video),
                track=str(done.track.resolve()), record=str(done.record.resolve()),
                verified=done.report.ok, forced=done.forced)
    return 1 if done.forced else 0


def _pubkey(args: argparse.Namespace) -> int:
    keys = evidence.keys_from_fleet(args.fleet)(args.device_id)
    active = [k for k in keys if k.revoked_at is None]
    if not active:
        raise EvidenceError(f"{args.device_id} has no active signing key in the fleet registry "
                            f"({len(keys)} revoked)")
    print(minisign.public_key_file(active[0].key.key, f"minisign public key "
                                   f"{active[0].key.key_id_hex} of {args.device_id}"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
