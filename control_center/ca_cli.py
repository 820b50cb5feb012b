"""`sos-center ca ...`: the fleet certificate authority, as an operator or engineer runs it.

Every command works on a fleet directory (`--fleet DIR`, default `$SOS_FLEET_DIR` or
/var/lib/sos-center/fleet) and needs no centre config. Each prints one line per result; a
refusal goes to stderr with exit status 2 and says what to do.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pwd
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cryptography import x509

from control_center import pki
from control_center.broker_admin import sync_broker
from control_center.fleet import (
    CENTRE_ID,
    CENTRE_SIGNING_KEY,
    DEVICE_ID,
    KINDS,
    Fleet,
    FleetError,
    render_mosquitto_conf,
    write_broker_access,
)
from control_center.pki import CertPair

FALLBACK_FLEET = "/var/lib/sos-center/fleet"
SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HOST_NAME = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")
RELOAD = ("the broker must re-read the CRL: `systemctl reload mosquitto` refuses new connections "
          "with it")
SYNC = ("tell the running broker: `sos-center ca sync --broker HOST:PORT` (a revoked identity is "
        "disconnected at once, a new one may act)")


class CaError(Exception):
    """A request refused before it reaches the fleet; the text says what to do."""


# -- helpers -------------------------------------------------------------------------------------
def _fleet_dir(args: argparse.Namespace) -> Path:
    return Path(args.fleet).expanduser().resolve()


def _open(args: argparse.Namespace) -> Fleet:
    directory = _fleet_dir(args)
    if not (directory / "ca.pem").exists():
        raise CaError(f"no fleet CA in {directory}: run `sos-center ca init --fleet "
                      f"{shlex.quote(str(directory))}` first, or point --fleet (or "
                      f"$SOS_FLEET_DIR) at the fleet you mean")
    return Fleet(directory)


def _read(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def _csr_name(csr_pem: bytes, kind: str) -> str:
    """The identity the CSR asks for, refused with a clear reason before anything is signed."""
    try:
        name = pki.common_name(x509.load_pem_x509_csr(csr_pem))
    except ValueError as exc:
        raise CaError(f"not a usable certificate signing request (PEM): {exc}") from None
    if kind == "centre" and not CENTRE_ID.match(name):
        raise CaError(f"the CSR names '{name}', not a centre instance: its common name must be "
                      f"'centre.<name>' (lower-case letters, digits, '-'); make a new CSR")
    if kind != "centre" and not DEVICE_ID.match(name):
        raise CaError(f"the CSR names '{name}', which is not a valid device id: its common name "
                      f"must be the device id, 3-63 lower-case letters, digits and '-' "
                      f"(e.g. tok-amb-0412); make a new CSR with the right name")
    return name


def _check_hosts(hosts: list[str]) -> None:
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not HOST_NAME.match(host):
                raise CaError(f"--host '{host}' is neither an IP address nor a DNS name") from None


# -- commands ------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> None:
    directory = _fleet_dir(args)
    existed = (directory / "ca.pem").exists()
    fleet = Fleet.create(directory, args.name)
    if existed:
        print(f"fleet CA already initialised: {fleet.ca.cert_file} kept (nothing replaced)")
    else:
        print(f"fleet CA '{args.name}' created: {fleet.ca.cert_file} "
              f"(its key {fleet.ca.key_file} stays here)")
    had_signer = (directory / CENTRE_SIGNING_KEY).exists()
    signer = fleet.centre_signer()
    print(f"centre command-signing key {'kept' if had_signer else 'created'}: "
          f"{directory / CENTRE_SIGNING_KEY} (public {signer.public_key_b64})")
    had_evidence = fleet.evidence_identity_file.exists()
    recipient = fleet.ensure_evidence_key()
    print(f"evidence key {'kept' if had_evidence else 'created'}: {fleet.evidence_identity_file} "
          f"(recipient {recipient}; the identity never leaves the centre)")
    had_live = fleet.live_identity_file.exists()
    live = fleet.ensure_live_key()
    print(f"live-view key {'kept' if had_live else 'created'}: {fleet.live_identity_file} "
          f"(recipient {live}; on the serving centre, decrypts SOS live video only)")


def cmd_server(args: argparse.Namespace) -> None:
    if not SERVER_NAME.match(args.name):
        raise CaError(f"server name '{args.name}': use letters, digits, '.', '_' or '-' "
                      f"(e.g. broker, ingest)")
    _check_hosts(args.host)
    fleet = _open(args)
    if args.out:
        pair = pki.issue_server_cert(fleet.ca, Path(args.out).resolve(), args.name, args.host)
    else:
        pair = fleet.issue_server(args.name, args.host)
    print(f"server certificate '{args.name}' for {', '.join(args.host)}: "
          f"cert {pair.cert_file}, key {pair.key_file} (0600)")


def cmd_sign(args: argparse.Namespace) -> None:
    fleet = _open(args)
    csr_pem = _read(args.csr)
    name = _csr_name(csr_pem, args.kind)
    before = fleet.active(name)
    pem = fleet.sign_csr(csr_pem, args.kind, args.signing_key)
    identity = fleet.active(name)
    assert identity is not None
    if args.output:
        Path(args.output).write_bytes(pem)
        report, where = sys.stdout, f" -> {args.output}"
    else:
        sys.stdout.buffer.write(pem)
        sys.stdout.flush()
        report, where = sys.stderr, ""
    if before is not None and before.serial == identity.serial:
        print(f"{name} ({identity.kind}) already enrolled with this key: its current "
              f"certificate, serial {identity.serial}{where}", file=report)
    else:
        print(f"signed {name} ({identity.kind}): serial {identity.serial}, valid until "
              f"{identity.not_after}{where}", file=report)
    if before is not None and before.serial != identity.serial:
        print(f"{name}'s previous certificate (serial {before.serial}) is revoked: {RELOAD}",
              file=report)
    if before is None or before.serial != identity.serial:
        print(f"then {SYNC}", file=report)
    if identity.signing_key is None:
        print(f"warning: {name} has no message-signing key, so the centre rejects its messages; "
              f"sign again with --signing-key BASE64", file=sys.stderr)


def cmd_revoke(args: argparse.Namespace) -> None:
    fleet = _open(args)
    if fleet.active(args.name) is None:
        raise CaError(f"no active identity '{args.name}' (see: sos-center ca list --fleet "
                      f"{fleet.directory})")
    identity = fleet.revoke(args.name)
    print(f"revoked {identity.name} (serial {identity.serial}); {RELOAD}")
    if args.broker is None:
        print(f"then {SYNC}")
        return
    for change in sync_broker(fleet, *_host_port(args.broker)):
        print(f"broker: {change}")


def cmd_sync(args: argparse.Namespace) -> None:
    fleet = _open(args)
    changes = sync_broker(fleet, *_host_port(args.broker))
    for change in changes:
        print(f"broker: {change}")
    print(f"broker at {args.broker} is up to date with {fleet.registry_file} "
          f"({len(changes)} change(s))")


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise CaError(f"--broker '{value}': give HOST:PORT (e.g. mqtt.example:8883)")
    return host, int(port)


def cmd_list(args: argparse.Namespace) -> None:
    identities = _open(args).identities
    if args.json:
        print(json.dumps([{**asdict(i), "has_signing_key": i.signing_key is not None}
                          for i in identities], indent=2))
        return
    if not identities:
        print("no identities yet (enrol one: sos-center ca sign CSR_FILE --kind token ...)")
    for i in identities:
        print(f"{i.name:<24} {i.kind:<6} {i.status:<7} serial {i.serial} until {i.not_after} "
              f"signing-key {'yes' if i.signing_key else 'no'}")


def cmd_broker_config(args: argparse.Namespace) -> None:
    fleet = _open(args)
    servers = fleet.directory / "servers"
    server = CertPair(servers / f"{args.server}.pem", servers / f"{args.server}.key")
    if not (server.cert_file.exists() and server.key_file.exists()):
        raise CaError(f"no server certificate '{args.server}' in {servers}: run `sos-center ca "
                      f"server {args.server} --host NAME_DEVICES_USE --fleet {fleet.directory}`")
    out = Path(args.out).resolve()
    data_dir = Path(args.data_dir).resolve() if args.data_dir else out / "data"
    log_file = Path(args.log_file).resolve() if args.log_file else out / "mosquitto.log"
    for directory in (out, data_dir, log_file.parent):
        directory.mkdir(parents=True, exist_ok=True)
    fleet.write_broker_files()
    fleet.broker_admin()  # so `ca sync` can reach the plugin once the broker runs
    access = write_broker_access(fleet, data_dir)
    conf = out / "mosquitto.conf"
    conf.write_text(render_mosquitto_conf(fleet, server, host=args.host, port=args.port,
                                          data_dir=data_dir, log_file=log_file,
                                          run_as=args.run_as))
    print(f"broker config written: {conf} (listener {args.host}:{args.port}, CRL in "
          f"{fleet.directory} rewritten, access list {access} for its next start); "
          f"run: mosquitto -c {conf}")
    _warn_unowned(args.run_as, [server.key_file, data_dir, access, log_file.parent])


def _warn_unowned(run_as: str | None, paths: list[Path]) -> None:
    """Mosquitto started as root drops to `run_as` (default 'mosquitto'), which must own its
    key, its data and its log; say so rather than let it fail at start."""
    user = run_as or ("mosquitto" if os.geteuid() == 0 else None)
    if user is None:
        return  # started as us, it reads what we wrote
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        print(f"warning: no user '{user}' here for mosquitto to run as (--run-as USER)",
              file=sys.stderr)
        return
    unowned = [shlex.quote(str(p)) for p in paths if p.stat().st_uid != uid]
    if unowned:
        print(f"warning: mosquitto will run as '{user}', which must own these: "
              f"chown {user} {' '.join(unowned)}", file=sys.stderr)


def cmd_crl(args: argparse.Namespace) -> None:
    fleet = _open(args)
    fleet.write_broker_files()
    crl = x509.load_pem_x509_crl(fleet.crl_file.read_bytes())
    print(f"CRL rewritten: {fleet.crl_file} ({len(crl)} revoked, valid until "
          f"{crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}); then {RELOAD}")


def cmd_keys(args: argparse.Namespace) -> None:
    fleet = _open(args)
    keys = {"ca_file": str(fleet.ca.cert_file), "centre_keys": fleet.centre_public_keys(),
            "evidence_recipients": fleet.evidence_recipients()}
    if not keys["evidence_recipients"]:
        print(f"warning: no evidence recipient yet: run `sos-center ca init --fleet "
              f"{fleet.directory}`", file=sys.stderr)
    if args.json:
        print(json.dumps(keys, indent=2))
        return
    print(f"CA certificate: {keys['ca_file']}")
    for key in keys["centre_keys"]:
        print(f"centre command key: {key}")
    for recipient in keys["evidence_recipients"]:
        print(f"evidence recipient: {recipient}")


# -- wiring --------------------------------------------------------------------------------------
COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "init": cmd_init, "server": cmd_server, "sign": cmd_sign, "revoke": cmd_revoke,
    "list": cmd_list, "broker-config": cmd_broker_config, "crl": cmd_crl, "keys": cmd_keys,
    "sync": cmd_sync,
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `ca` and its commands to `sos-center`'s subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    default = os.environ.get("SOS_FLEET_DIR", FALLBACK_FLEET)
    common.add_argument("--fleet", metavar="DIR", default=default,
                        help=f"fleet directory (default: $SOS_FLEET_DIR or {FALLBACK_FLEET})")
    ca = sub.add_parser("ca", help="the fleet certificate authority (needs no centre config)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = ca.add_subparsers(dest="ca_action", required=True, metavar="CA_COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return cmds.add_parser(name, help=text, description=text, parents=[common])

    command("init", "create the CA, the centre's command-signing key and the evidence key "
                    "(safe to re-run)").add_argument("--name", default="SOS fleet CA")
    p = command("server", "issue a TLS server certificate for the broker or the ingest")
    p.add_argument("name", metavar="NAME", help="e.g. broker")
    p.add_argument("--host", action="append", required=True,
                   help="DNS name or IP address clients use (repeatable)")
    p.add_argument("--out", metavar="DIR", help="write there (default: FLEET/servers)")
    p = command("sign", "sign a device's (or centre instance's) CSR and register its signing key")
    p.add_argument("csr", metavar="CSR_FILE", help="PEM signing request ('-' reads stdin)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--signing-key", metavar="BASE64",
                   help="the Ed25519 public key its messages are signed with")
    p.add_argument("-o", "--output", metavar="CERT_FILE", help="default: stdout")
    p = command("revoke", "revoke an identity's certificate")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--broker", metavar="HOST:PORT",
                   help="also disconnect it from this running broker now (as `ca sync`)")
    command("list", "list identities").add_argument("--json", action="store_true")
    p = command("broker-config", "write OUT/mosquitto.conf for this fleet")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", required=True, help="address to listen on")
    p.add_argument("--server", required=True, metavar="NAME", help="from `ca server NAME`")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--data-dir", metavar="D", help="persistence (default: OUT/data)")
    p.add_argument("--log-file", metavar="F", help="default: OUT/mosquitto.log")
    p.add_argument("--run-as", metavar="USER",
                   help="user mosquitto drops to when started as root (default: mosquitto)")
    command("crl", "rewrite the CRL from the registry, valid for ten years (pki.write_crl: "
                   "Mosquitto refuses every client once a CRL has expired); every revocation "
                   "already rewrites it")
    command("sync", "tell a running broker who is enrolled and who is revoked (disconnects "
                    "revoked identities)").add_argument("--broker", metavar="HOST:PORT",
                                                        required=True)
    command("keys", "the public material a device needs").add_argument("--json",
                                                                       action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run `sos-center ca ...`; exit status 2 for a refusal, with the reason on stderr."""
    try:
        COMMANDS[args.ca_action](args)
    except (CaError, FleetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''} (check the path and that you "
              f"run as the fleet's owner; --fleet DIR or $SOS_FLEET_DIR picks the fleet)",
              file=sys.stderr)
        return 2
    return 0
