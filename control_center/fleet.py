"""The fleet registry and its certificate authority: who may connect, and as whom.

A fleet directory holds the CA (`ca.pem`, `ca.key`), `registry.json` (every identity ever issued,
with its serial and status) and the CRL (`crl.pem`), regenerated from the registry on every change.
The broker authenticates clients by certificate, uses the certificate's common name as the user
name and as the client id, and lets each identity do only its job through Mosquitto's
dynamic-security plugin, whose configuration `render_broker_access` derives from the registry
(docs/DESIGN.md, "Broker: each identity does only its job").

Identities: a device is its device id (`tok-amb-0412`); a control-centre instance is
`centre.<name>`, which can never be a device id (device ids have no dots); the fleet's own broker
administrator (it tells a running broker who was enrolled or revoked) is `admin.fleet`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from control_center import pki
from control_center.live import MAX_HEADER_CHARS
from control_center.live import MAX_PAYLOAD_BYTES as LIVE_MAX_PAYLOAD_BYTES
from control_center.pki import CertPair
from evidence_format import bech32
from evidence_format.files import atomic_write
from protocol import signing
from protocol.topics import LIVE, PREFIX

# The largest packet the broker takes: a live chunk (the protocol's largest message) plus its
# signed header in a user property (at most MAX_HEADER_CHARS, so at most 4x that in UTF-8), its
# topic and MQTT's own framing, rounded up to 64 KiB. Anything bigger is no message of ours: the
# broker drops the connection instead of forwarding it (JSON messages are at most 16 KiB).
MAX_PACKET_BYTES = LIVE_MAX_PAYLOAD_BYTES + 64 * 1024
MAX_PACKET_HEADROOM = 4 * MAX_HEADER_CHARS + 1024  # what the 64 KiB must hold (checked in tests)

DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
CENTRE_ID = re.compile(r"^centre\.[a-z0-9][a-z0-9-]{0,62}$")
ADMIN_ID = re.compile(r"^admin\.[a-z0-9][a-z0-9-]{0,62}$")
KINDS = ("token", "pillar", "centre")  # what an operator enrols (`sos-center ca sign --kind`)
ADMIN = "admin"  # the kind of the fleet's broker administrator, made by Fleet.broker_admin()
ADMIN_NAME = "admin.fleet"
PATTERNS = {"token": DEVICE_ID, "pillar": DEVICE_ID, "centre": CENTRE_ID, ADMIN: ADMIN_ID}
DEVICE_LEAVES = ("alert", "position", "event", "status", LIVE)  # what a device publishes
DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
CENTRE_SIGNING_KEY = "centre-signing.key"  # the fleet's shared command key (centre_signer)
DYNSEC_FILE = "dynamic-security.json"  # in the broker's data directory: the broker rewrites it


class FleetError(ValueError):
    """A request the fleet refuses; the text says why and what to do."""


@dataclass
class Identity:
    name: str
    kind: str  # "token" | "pillar" | "centre"
    serial: str  # hex
    status: str  # "active" | "revoked"
    issued_at: str
    not_after: str
    revoked_at: str | None = None
    signing_key: str | None = None  # base64 Ed25519 public key its messages are signed with


class Fleet:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.ca = CertPair(self.directory / "ca.pem", self.directory / "ca.key")
        if not self.ca.cert_file.exists():
            raise FleetError(f"{self.directory}: no fleet CA here (run: sos-center ca init)")
        self._registry_file = self.directory / "registry.json"
        self._read_stamp = registry_stamp(self._registry_file)
        self.identities: list[Identity] = [
            Identity(**entry) for entry in json.loads(self._registry_file.read_text())["identities"]
        ]

    @property
    def registry_file(self) -> Path:
        """`registry.json`: every identity with its status and signing key (read by FleetTrust)."""
        return self._registry_file

    @property
    def crl_file(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def admin_directory(self) -> Path:
        """Where the fleet keeps its broker administrator's key and certificate."""
        return self.directory / "admin"

    @classmethod
    def create(cls, directory: str | Path, name: str = "SOS fleet CA") -> Fleet:
        directory = Path(directory)
        if (directory / "ca.pem").exists():
            return cls(directory)  # re-running init is safe: the CA is never replaced
        pki.make_ca(directory, name)
        (directory / "registry.json").write_text(json.dumps({"identities": []}))
        fleet = cls(directory)
        fleet._save()
        return fleet

    # -- issuing ---------------------------------------------------------------------------------
    def issue_server(self, name: str, hosts: list[str]) -> CertPair:
        return pki.issue_server_cert(self.ca, self.directory / "servers", name, hosts)

    def sign_csr(self, csr_pem: bytes, kind: str, signing_key: str | None = None) -> bytes:
        """Certificate (PEM) for the identity named in the CSR; `signing_key` is the base64
        Ed25519 public key the identity signs its messages with.

        Re-enrolling the same key returns its current certificate; a new key for a known name
        gets a new certificate and the old one is revoked, so one name has one valid key.
        """
        if signing_key is not None:
            try:
                signing.public_key_from_b64(signing_key)
            except ValueError as exc:
                raise FleetError(str(exc)) from None
        if kind not in PATTERNS:
            raise FleetError(f"unknown kind '{kind}' (one of {', '.join(KINDS)})")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            name = pki.common_name(csr)
        except ValueError as exc:
            raise FleetError(f"not a usable certificate signing request: {exc}") from None
        pattern = PATTERNS[kind]
        if not pattern.match(name):
            raise FleetError(f"'{name}' is not a valid {kind} identity ({pattern.pattern})")
        current = self.active(name)
        if current is not None:
            existing = x509.load_pem_x509_certificate(self._cert_path(current).read_bytes())
            if existing.public_key() == csr.public_key() and current.kind == kind:
                if signing_key and current.signing_key != signing_key:
                    current.signing_key = signing_key
                    self._save()
                return self._cert_path(current).read_bytes()
        try:
            cert = pki.sign_client_csr(self.ca, csr_pem)
        except ValueError as exc:
            raise FleetError(str(exc)) from None
        pem = cert.public_bytes(serialization.Encoding.PEM)
        identity = Identity(name, kind, f"{cert.serial_number:x}", "active",
                            _iso(cert.not_valid_before_utc), _iso(cert.not_valid_after_utc),
                            signing_key=signing_key)
        path = self._cert_path(identity)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, pem)
        if current is not None:
            self._mark_revoked(current)
        self.identities.append(identity)
        self._save()
        return pem

    def enrol_local(self, name: str, kind: str, directory: Path) -> CertPair:
        """Make the TLS key and the signing key in `directory` (where the identity will live)
        and enrol both; the signing key is `directory / "signing.key"`."""
        key = pki.load_or_make_key(directory / "identity.key")
        signer = signing.Signer(signing.load_or_make_key(directory / "signing.key"))
        pair = CertPair(directory / "identity.pem", directory / "identity.key")
        atomic_write(pair.cert_file,
                     self.sign_csr(pki.make_csr(key, name), kind, signer.public_key_b64))
        return pair

    def broker_admin(self) -> CertPair:
        """The identity that tells a running broker about enrolments and revocations
        (control_center/broker_admin.py); made here on first use. Its key stays in the fleet
        directory, next to the CA key that could mint any identity anyway."""
        return self.enrol_local(ADMIN_NAME, ADMIN, self.admin_directory)

    # -- message signing keys --------------------------------------------------------------------
    def signing_keys(self, name: str) -> list[Ed25519PublicKey]:
        """The keys `name`'s messages may be signed with (none if unknown or revoked)."""
        current = self.active(name)
        if current is None or current.signing_key is None:
            return []
        return [signing.public_key_from_b64(current.signing_key)]

    def reload(self) -> None:
        """Re-read the registry (another process may have enrolled or revoked someone)."""
        stamp = registry_stamp(self._registry_file)
        self.identities = [Identity(**entry) for entry in
                           json.loads(self._registry_file.read_text())["identities"]]
        self._read_stamp = stamp

    def reload_if_changed(self) -> bool:
        """Re-read the registry if its file changed since it was last read (one stat); whether
        it did. `sos-center ca` enrols, re-keys and revokes from another process."""
        stamp = registry_stamp(self._registry_file)
        if stamp == getattr(self, "_read_stamp", None):
            return False
        self.reload()
        return True

    def centre_signer(self) -> signing.Signer:
        """The key the control centre signs commands with, shared by its instances."""
        return signing.Signer(signing.load_or_make_key(self.directory / CENTRE_SIGNING_KEY))

    def centre_public_keys(self) -> list[str]:
        """What devices trust for commands and delivery receipts (`trust.centre_keys`): the
        fleet's command key (`centre-signing.key`, which the project's centre instances and the
        ingest share) and the signing key of every active centre identity, ours or a partner's
        (each has its own replay window on the device)."""
        keys = [self.centre_signer().public_key_b64]
        keys += sorted({i.signing_key for i in self.identities
                        if i.kind == "centre" and i.status == "active" and i.signing_key}
                       - set(keys))
        return keys

    # -- evidence (video) encryption -------------------------------------------------------------
    @property
    def evidence_identity_file(self) -> Path:
        """The centre's age identity: the secret that decrypts evidence; it never leaves."""
        return self.directory / "evidence-identity.txt"

    @property
    def evidence_pub_file(self) -> Path:
        return self.directory / "evidence.pub"

    def evidence_recipients(self) -> list[str]:
        """The age recipients (`age1...`) devices encrypt evidence to: one a line of
        `evidence.pub` (a list, so the key can be rotated); none before `sos-center ca init`."""
        return _recipients(self.evidence_pub_file)

    def ensure_evidence_key(self) -> str:
        """Make the age X25519 identity (0600) if there is none and make sure its recipient is
        in `evidence.pub`; returns the recipient. `age -d -i evidence-identity.txt` decrypts."""
        return _ensure_age_key(self.evidence_identity_file, self.evidence_pub_file)

    # -- live view (low-resolution video during an SOS, docs/LIVE.md) ------------------------------
    # A key pair of its own: the live identity must sit on the serving centre to decrypt chunks as
    # they arrive, while the evidence identity stays offline.
    @property
    def live_identity_file(self) -> Path:
        """The centre's age identity for live chunks; on the serving centre (0600)."""
        return self.directory / "live-identity.txt"

    @property
    def live_pub_file(self) -> Path:
        return self.directory / "live.pub"

    def live_recipients(self) -> list[str]:
        """The age recipients devices encrypt live chunks to: one a line of `live.pub`; none
        before `ensure_live_key()`."""
        return _recipients(self.live_pub_file)

    def ensure_live_key(self) -> str:
        """Make the live age X25519 identity (0600) if there is none and make sure its recipient
        is in `live.pub`; returns the recipient. `age -d -i live-identity.txt` decrypts a chunk."""
        return _ensure_age_key(self.live_identity_file, self.live_pub_file)

    def write_broker_files(self) -> None:
        """Rewrite the CRL (it expires: pki.write_crl's `days`) from the registry."""
        self._save()

    # -- revoking --------------------------------------------------------------------------------
    def revoke(self, name: str) -> Identity:
        """Revoke the active certificate of `name`: it leaves the CRL's good side and the broker's
        access list (`render_broker_access`). A running broker learns it from a CRL reload
        (refuses new connections) and `BrokerAdmin.sync` (disconnects the open one)."""
        current = self.active(name)
        if current is None:
            raise FleetError(f"no active identity '{name}'")
        self._mark_revoked(current)
        self._save()
        return current

    def active(self, name: str) -> Identity | None:
        return next((i for i in self.identities if i.name == name and i.status == "active"), None)

    # -- files -----------------------------------------------------------------------------------
    def _mark_revoked(self, identity: Identity) -> None:
        identity.status = "revoked"
        identity.revoked_at = _iso(dt.datetime.now(dt.UTC))

    def _cert_path(self, identity: Identity) -> Path:
        return self.directory / "issued" / f"{identity.serial}.pem"

    def _save(self) -> None:
        atomic_write(self._registry_file, (json.dumps(
            {"identities": [asdict(i) for i in self.identities]}, indent=2) + "\n").encode())
        revoked = [(int(i.serial, 16), dt.datetime.fromisoformat(i.revoked_at))
                   for i in self.identities if i.status == "revoked" and i.revoked_at]
        pki.write_crl(self.ca, revoked, self.crl_file)


def registry_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the registry is rewritten (an atomic replace gives a new inode)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def render_broker_access(fleet: Fleet) -> dict[str, Any]:
    """The dynamic-security plugin's configuration: one client per active identity (its user
    name is its certificate's common name), each with one role saying what it may do; nothing
    else is allowed (every default is deny, unsubscribing aside). Mosquitto 2.0.11's ACL file
    cannot refuse a SUBSCRIBE, the plugin can, and it sees `$share/<group>/...` whole, so a
    device's role, which names only its own command topic, keeps it out of the centre's group."""
    active = sorted((i for i in fleet.identities if i.status == "active"), key=lambda i: i.name)
    roles = [_centre_role(), _admin_role()]
    clients = []
    for identity in active:
        if identity.kind == "centre":
            role = CENTRE_ROLE
        elif identity.kind == ADMIN:
            role = ADMIN_ROLE
        else:
            role = identity.name
            roles.append(_device_role(identity.name))
        clients.append({"username": identity.name, "roles": [{"rolename": role}]})
    return {"defaultACLAccess": DEFAULT_ACCESS, "clients": clients, "groups": [],
            "roles": roles}


DEFAULT_ACCESS = {"publishClientSend": False, "publishClientReceive": False,
                  "subscribe": False, "unsubscribe": True}
CENTRE_ROLE = "centre"
ADMIN_ROLE = "fleet-admin"
DYNSEC_TOPIC = "$CONTROL/dynamic-security/#"


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def _device_role(device_id: str) -> dict[str, Any]:
    """A device publishes only under its own topics and reads only its own commands."""
    own = f"{PREFIX}/{device_id}"
    return {"rolename": device_id, "acls": [
        *(_acl("publishClientSend", f"{own}/{leaf}") for leaf in DEVICE_LEAVES),
        _acl("subscribeLiteral", f"{own}/cmd"),
        _acl("publishClientReceive", f"{own}/cmd"),
    ]}


def _centre_role() -> dict[str, Any]:
    """A centre instance reads every device's messages, alone or in a shared group, and sends
    commands."""
    acls = [_acl("publishClientSend", f"{PREFIX}/+/cmd")]
    for leaf in DEVICE_LEAVES:
        acls += [_acl("subscribePattern", f"{PREFIX}/+/{leaf}"),
                 _acl("subscribePattern", f"$share/+/{PREFIX}/+/{leaf}"),
                 _acl("publishClientReceive", f"{PREFIX}/+/{leaf}")]
    return {"rolename": CENTRE_ROLE, "acls": acls}


def _admin_role() -> dict[str, Any]:
    """The fleet's administrator talks to the plugin and nothing else."""
    return {"rolename": ADMIN_ROLE, "acls": [_acl("publishClientSend", DYNSEC_TOPIC),
                                             _acl("subscribePattern", DYNSEC_TOPIC),
                                             _acl("publishClientReceive", DYNSEC_TOPIC)]}


def dynsec_plugin() -> Path:
    """Where Debian (or a local build) installed the dynamic-security plugin."""
    candidates = [*sorted(Path("/usr/lib").glob(f"*/{DYNSEC_PLUGIN}")),
                  Path("/usr/lib") / DYNSEC_PLUGIN, Path("/usr/local/lib") / DYNSEC_PLUGIN]
    found = next((p for p in candidates if p.exists()), None)
    if found is None:
        raise FleetError(f"{DYNSEC_PLUGIN} not found: install mosquitto 2.0 (apt-get install "
                         "mosquitto), which ships it")
    return found


def write_broker_access(fleet: Fleet, data_dir: Path) -> Path:
    """Write the plugin's configuration for the broker's next start, from the registry; a
    running broker is brought up to date by BrokerAdmin.sync instead (it rewrites this file
    itself after every change)."""
    path = data_dir / DYNSEC_FILE
    atomic_write(path, (json.dumps(render_broker_access(fleet), indent=2) + "\n").encode())
    return path


def render_mosquitto_conf(fleet: Fleet, server: CertPair, *, host: str, port: int,
                          data_dir: Path, log_file: Path, run_as: str | None = None) -> str:
    """The broker configuration every deployment, the simulator and the tests use.

    Persistence: the in-memory state (sessions, queued QoS 1 messages, retained status) is
    written to `data_dir` every `autosave_interval` seconds and at a clean shutdown, so a broker
    killed with SIGKILL (or a power cut) loses what it accepted in the last second at most.
    Devices keep each message until the centre's signed delivery receipt arrives and send it
    again, so that window costs a re-send, not a message (docs/DESIGN.md).

    `set_tcp_nodelay`: without it Nagle's algorithm holds a small packet (a delivery receipt, a
    command) while the previous one to that client (its PUBACK) is unacknowledged, and the
    client's delayed ACK makes that about 40 ms (measured by `make bench`)."""
    return "\n".join([
        "# Generated by sos-center from the fleet registry.",
        *([f"user {run_as}"] if run_as else []),
        "per_listener_settings false",
        "allow_anonymous false",
        f"plugin {dynsec_plugin()}",
        f"plugin_opt_config_file {data_dir / DYNSEC_FILE}",
        "persistence true",
        f"persistence_location {data_dir}/",
        "autosave_interval 1",
        "autosave_on_changes false",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"log_dest file {log_file}",
        "log_type error", "log_type warning", "log_type notice",
        "connection_messages true",
        "max_queued_messages 10000",
        "set_tcp_nodelay true",
        f"listener {port} {host}",
        "protocol mqtt",
        f"cafile {fleet.ca.cert_file}",
        f"certfile {server.cert_file}",
        f"keyfile {server.key_file}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"crlfile {fleet.crl_file}",
        "tls_version tlsv1.2",
        "",
    ])


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds")


# -- age X25519 keys, so the centre needs no `age` binary ----------------------------------------
def _recipients(pub_file: Path) -> list[str]:
    """The `age1...` lines of a recipients file; none if there is no file."""
    try:
        lines = pub_file.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.strip() for line in lines if line.strip().startswith("age1")]


def _ensure_age_key(identity_file: Path, pub_file: Path) -> str:
    """Make an age X25519 identity file (0600) if there is none, make sure its recipient is in
    `pub_file`, and return the recipient."""
    if not identity_file.exists():
        identity, recipient = age_x25519_keypair()
        text = (f"# created: {_iso(dt.datetime.now(dt.UTC))}\n"
                f"# public key: {recipient}\n{identity}\n")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with os.fdopen(os.open(identity_file, flags, 0o600), "w") as f:
            f.write(text)
    found = re.search(r"^# public key: (age1\w+)$", identity_file.read_text(), re.MULTILINE)
    if found is None:
        raise FleetError(f"{identity_file}: no '# public key: age1...' line (add the output of "
                         f"`age-keygen -y {identity_file}` to {pub_file})")
    recipient = found.group(1)
    if recipient not in _recipients(pub_file):
        with pub_file.open("a") as f:
            f.write(recipient + "\n")
    return recipient


def age_x25519_keypair() -> tuple[str, str]:
    """A new age X25519 (identity `AGE-SECRET-KEY-1...`, recipient `age1...`)."""
    key = X25519PrivateKey.generate()
    identity = bech32.encode("age-secret-key-", bech32.words(key.private_bytes_raw())).upper()
    return identity, bech32.encode("age", bech32.words(key.public_key().public_bytes_raw()))
