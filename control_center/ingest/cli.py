"""`sos-center ingest`: receive devices' evidence segments over HTTPS (tus, mutual TLS).

Devices upload to https://HOST:PORT/files/ with their fleet certificate (docs/UPLOAD.md).
Prints one line per segment stored or refused; runs until Ctrl-C or SIGTERM.

S3 credentials are read by boto3 from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) or ~/.aws; S3 needs `pip install 'sos-devices[s3]'`.
Exit status: 0 after a clean stop, 2 if it cannot start (bad arguments, fleet, certificate,
port, store).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from control_center.audit import AuditLog
from control_center.fleet import Fleet, FleetError
from control_center.ingest.server import IngestServer, Limits
from control_center.ingest.stores import DirectoryStore, EvidenceStore, S3Store, StoreError

# Waited for with sigwait: a handler setting an Event the main thread waits on can deadlock.
_STOPPING = {signal.SIGINT, signal.SIGTERM}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        host, port = _listen(args.listen)
        fleet = Fleet(args.fleet)
        store = _store(args)
        cert, key = _server_cert(fleet, args, host)
        server = IngestServer(fleet, store, AuditLog(args.audit), workdir=Path(args.workdir),
                              cert_file=cert, key_file=key, host=host, port=port,
                              limits=_limits(args),
                              min_free_bytes=args.reserve_mb * (1 << 20), on_event=_print)
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
        server.start()
    except (OSError, ValueError, FleetError, StoreError) as exc:
        print(f"sos-center ingest: {exc}", file=sys.stderr)
        return 2
    where = (f"s3 {args.s3_endpoint} bucket {args.s3_bucket}" if args.s3_bucket
             else f"directory {args.store}")
    print(f"sos-center ingest: serving {server.url}/files/ (mutual TLS, fleet {args.fleet}), "
          f"store {where}, audit {args.audit}; Ctrl-C stops", flush=True)
    signal.sigwait(_STOPPING)  # blocked before the server's threads started (they inherit it)
    server.stop()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sos-center ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fleet", required=True, help="fleet directory (CA, CRL, registry, centre "
                   "key that signs receipts)")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to serve HTTPS on, e.g. 0.0.0.0:8443")
    p.add_argument("--store", metavar="DIR", help="evidence directory: DIR/<device_id>/"
                   "NNNNNN.ts.age|.json|.json.minisig (required unless --s3-bucket)")
    p.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint, e.g. "
                   "https://minio.example:9000 (default: AWS)")
    p.add_argument("--s3-bucket", metavar="NAME", help="store in this bucket instead of --store")
    p.add_argument("--s3-prefix", default="", metavar="PREFIX",
                   help="key prefix inside the bucket (default none)")
    p.add_argument("--audit", required=True, metavar="FILE",
                   help="append-only audit log (JSON lines, hash-chained)")
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="where partial uploads and their state are kept")
    p.add_argument("--reserve-mb", type=int, default=1024, metavar="N",
                   help="refuse uploads (507) that would leave less than N MiB free in the "
                        "store or work directory (default 1024)")
    limits = p.add_argument_group("limits", "each a field of control_center.ingest.server."
                                  "Limits; docs/UPLOAD.md, \"Limits\", says why each default")
    for limit in dataclasses.fields(Limits):
        kind = float if isinstance(limit.default, float) else int
        limits.add_argument(f"--{limit.name.replace('_', '-')}", type=kind,
                            metavar="SECONDS" if limit.name.endswith("_s") else "N",
                            default=limit.default, dest=limit.name,
                            help=f"{limit.metadata['help']} (default {limit.default})")
    p.add_argument("--cert", metavar="FILE", help="server certificate (PEM); default: "
                   "FLEET/servers/ingest.pem, issued by the fleet CA if missing")
    p.add_argument("--key", metavar="FILE", help="its private key (default: beside --cert)")
    p.add_argument("--name", action="append", default=[], metavar="HOST",
                   help="a DNS name or IP the devices use, put in a newly issued certificate "
                        "(repeatable; the --listen host and localhost are always in it)")
    return p


def _limits(args: argparse.Namespace) -> Limits:
    """The Limits the options give; ValueError names a limit out of its range."""
    return Limits(**{limit.name: getattr(args, limit.name)
                     for limit in dataclasses.fields(Limits)})


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. 0.0.0.0:8443")
    return host.strip("[]"), int(port)


def _store(args: argparse.Namespace) -> EvidenceStore:
    if args.s3_bucket:
        return S3Store(args.s3_bucket, endpoint_url=args.s3_endpoint, prefix=args.s3_prefix)
    if args.s3_endpoint:
        raise ValueError("--s3-endpoint needs --s3-bucket")
    if not args.store:
        raise ValueError("give --store DIR, or --s3-bucket NAME (with --s3-endpoint URL)")
    return DirectoryStore(args.store)


def _server_cert(fleet: Fleet, args: argparse.Namespace, host: str) -> tuple[Path, Path]:
    if args.cert:
        return Path(args.cert), Path(args.key or Path(args.cert).with_suffix(".key"))
    cert = fleet.directory / "servers" / "ingest.pem"
    key = fleet.directory / "servers" / "ingest.key"
    if not cert.exists():
        hosts = list(dict.fromkeys([host, "localhost", *args.name]))
        pair = fleet.issue_server("ingest", [h for h in hosts if h not in ("0.0.0.0", "::")])
        cert, key = pair.cert_file, pair.key_file
    return cert, key


def _print(entry: dict[str, Any]) -> None:
    if entry["event"] == "segment_stored":
        print(f"STORED  {entry['device_id']} seq {entry['seq']}: {entry['size']} bytes, "
              f"sha256 {entry['sha256'][:16]}..., {entry['location']}", flush=True)
    elif entry["event"] == "segment_refused":
        print(f"REFUSED {entry['device_id']} seq {entry['seq']} ({entry['stage']}, "
              f"{entry['status']}): {entry['reason']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
