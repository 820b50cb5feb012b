"""`sos-evidence`: verify, decrypt and export a device's recorded segments.

Exit status: 0 everything verified (or done); 1 `verify` found problems, or `export --force`
wrote evidence that did not verify; 2 refused or could not run (bad arguments, no key, age
failed, export of unverified evidence without --force).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from control_center import evidence
from control_center.evidence import EvidenceError, KeysFor
from firmware.camera import minisign


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
    verify.set_defaults(run=_verify)

    decrypt = commands.add_parser("decrypt", help="decrypt one .ts.age segment with age")
    decrypt.add_argument("--identity", required=True, help="age identity file (the centre's "
                         "evidence-identity.txt)")
    decrypt.add_argument("input")
    decrypt.add_argument("-o", "--output", required=True)
    decrypt.set_defaults(run=_decrypt)

    export = commands.add_parser("export", help="verify, then write one call's .ts and .gpx")
    export.add_argument("directory")
    export.add_argument("--identity", required=True, help="age identity file")
    export.add_argument("--call", required=True, help="the call id")
    export.add_argument("-o", "--output", required=True, help="output directory")
    export.add_argument("--force", action="store_true",
                        help="export even if verification fails (the record says so)")
    _add_trust(export)
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


def _keys(args: argparse.Namespace) -> KeysFor:
    if args.pubkey:
        return evidence.keys_from_pubkey_file(args.pubkey)
    return evidence.keys_from_fleet(args.fleet)


def _verify(args: argparse.Namespace) -> int:
    report = evidence.verify_directory(args.directory, _keys(args))
    for finding in report.findings:
        print(finding)
    print(report.summary())
    return 0 if report.ok else 1


def _decrypt(args: argparse.Namespace) -> int:
    out = evidence.decrypt_segment(args.input, args.identity, args.output)
    print(f"decrypted {args.input} -> {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    keys = _keys(args)
    try:
        done = evidence.export_call(args.directory, args.call, identity=args.identity,
                                    outdir=args.output, keys_for=keys, force=args.force)
    except evidence.Refused as refused:
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
