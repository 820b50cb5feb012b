"""`sos-center audit verify LOG`: check the centre's audit log and its anchors.

Checks every line's `prev` link, then the head against what vouches for it outside the file:
the centre's signed heads (`LOG.heads`, written by the ingest server) and, with --receipts,
the `audit_head` of each receipt a device kept. Prints one line per finding and a summary:

  VERIFIED                 every line is linked and the newest line is vouched for;
  VERIFIED UP TO LINE K    linked, but the lines after K are vouched for by nothing outside
                           the file yet (a NOTE `unanchored`: a line forged and appended
                           there, or cut off there, cannot be told from a genuine one);
  UNANCHORED               linked, and no signed head or receipt anchors any line;
  NOT VERIFIED             an ERROR: a broken link, a signed head or receipt whose line is
                           edited or cut, a signature that does not verify.

Exit status: 0 no ERROR (NOTEs do not count); 1 an ERROR; 2 could not run (no log, no key).
Needs no centre config. See docs/UPLOAD.md, "The audit log".
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from control_center.audit import (
    centre_key_from_b64,
    centre_keys_from_fleet,
    check_audit,
    read_receipts,
)

FALLBACK_FLEET = "/var/lib/sos-center/fleet"


class AuditCliError(Exception):
    """The command cannot run; the text says why."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `audit` and its commands to `sos-center`'s subcommands."""
    audit = sub.add_parser("audit", help="check the audit log against its signed heads and "
                           "receipts (needs no centre config)", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = audit.add_subparsers(dest="audit_action", required=True, metavar="AUDIT_COMMAND")
    verify = cmds.add_parser("verify", help="check the links, the signed heads and receipts",
                             description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("log", metavar="FILE", help="the audit log (audit.jsonl)")
    default = os.environ.get("SOS_FLEET_DIR", FALLBACK_FLEET)
    trust = verify.add_mutually_exclusive_group()
    trust.add_argument("--fleet", metavar="DIR", default=default,
                       help=f"fleet directory holding the centre key (default: $SOS_FLEET_DIR "
                            f"or {FALLBACK_FLEET})")
    trust.add_argument("--centre-key", metavar="BASE64", action="append",
                       help="a centre public key as devices trust it (trust.centre_keys); "
                            "repeatable; instead of --fleet")
    verify.add_argument("--heads", metavar="FILE",
                        help="the signed heads (default: FILE.heads beside the log)")
    verify.add_argument("--receipts", metavar="PATH", action="append", default=[],
                        help="receipts as extra anchors: a device's receipts.jsonl, a receipt "
                             "file, or a directory of *.json / *.jsonl; repeatable")


def run(args: argparse.Namespace) -> int:
    """Run `sos-center audit verify`; 0 no error, 1 errors, 2 could not run."""
    try:
        keys = _keys(args)
        check = check_audit(args.log, keys, heads_path=args.heads,
                            receipts=_receipts(args.receipts))
    except (AuditCliError, OSError) as exc:
        print(f"sos-center audit: {exc}", file=sys.stderr)
        return 2
    for finding in check.findings:
        print(finding)
    print(check.summary())
    return 0 if check.ok else 1


def _keys(args: argparse.Namespace) -> list[Ed25519PublicKey]:
    if args.centre_key:
        try:
            return [centre_key_from_b64(k) for k in args.centre_key]
        except ValueError as exc:
            raise AuditCliError(f"--centre-key: {exc}") from None
    try:
        return centre_keys_from_fleet(args.fleet)
    except (OSError, ValueError) as exc:
        raise AuditCliError(f"no centre key to check signed heads and receipts with "
                            f"({exc}); give --fleet DIR or --centre-key BASE64") from None


def _receipts(paths: list[str]) -> list[tuple[str, Any]]:
    """Every receipt named, read up front so a missing path stops the command."""
    for path in paths:
        if not Path(path).exists():
            raise AuditCliError(f"--receipts {path}: no such file or directory")
    return [pair for path in paths for pair in read_receipts(path)]
