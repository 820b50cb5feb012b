"""A private Mosquitto for the simulator and the tests: loopback only, mutual TLS, a free port.

It can be stopped and started again on the same port with its persistence intact, which is how
the `outage` scenario and the outage tests take the broker away from devices.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from control_center import pki
from control_center.broker_admin import BrokerAdmin, admin_config
from control_center.fleet import ADMIN_NAME, Fleet, render_mosquitto_conf, write_broker_access
from control_center.pki import CertPair
from control_center.service import CenterService, FleetTrust
from control_center.store import Store
from protocol.mqtt import BrokerConfig
from protocol.signing import public_key_from_b64

HOST = "127.0.0.1"
log = logging.getLogger("sos.sim.broker")


class BrokerError(RuntimeError):
    pass


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )
    if found is None:
        raise BrokerError("mosquitto not found: run `make sysdeps` (or apt-get install mosquitto)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def is_fleet(directory: Path) -> bool:
    """Whether `directory` already holds a fleet (a CA made by `sos-center ca init`)."""
    return (Path(directory) / "ca.pem").exists()


def sim_enrolments(fleet_dir: Path, device_ids: Iterable[str]) -> list[str]:
    """What the simulator would add to (or change in) the existing fleet at `fleet_dir`, one
    phrase each: its centre identity, the fleet's broker administrator if there is none yet,
    and every device in `device_ids` (those it makes a config for, i.e. not provisioned).
    A device id the fleet already has would be re-keyed: its certificate revoked."""
    fleet = Fleet(fleet_dir)
    added = [f"{PrivateBroker.CENTRE} (a centre identity: reads every device's topics and may "
             "send commands to every device)"]
    if fleet.active(ADMIN_NAME) is None:
        added.append(f"{ADMIN_NAME} (the broker administrator)")
    for device_id in device_ids:
        added.append(f"{device_id} (already enrolled: its certificate would be revoked and "
                     "replaced)" if fleet.active(device_id) else f"{device_id} (a device)")
    return added


class PrivateBroker:
    """`with PrivateBroker(workdir) as broker:` gives a running broker on loopback, configured
    exactly as a deployment is (control_center/fleet.py): mutual TLS, the certificate's name as
    the user name and the client id, the dynamic-security plugin's per-identity access list and a
    CRL. Clients get identities from `identity()`; enrolling or revoking one while the broker runs
    tells it at once, as `sos-center ca sync` does in a deployment."""

    CENTRE = "centre.sim"

    def __init__(self, workdir: Path, *, port: int | None = None,
                 fleet_dir: Path | None = None) -> None:
        """`fleet_dir`: an existing fleet (devices provisioned into it can connect); default a
        new one in the work directory. In an existing fleet this ENROLS identities: `centre.sim`
        (a centre: it reads every device's topics and may command every device), the fleet's
        broker administrator if missing, and whoever `identity()` is asked for; each is logged
        as a warning. `sos-sim run --fleet` refuses that unless given --enrol-sim-identities
        (`sim_enrolments` lists what would be added)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.existing_fleet = fleet_dir is not None and is_fleet(fleet_dir)
        self.fleet = Fleet.create(fleet_dir or self.workdir / "fleet")
        self.fleet.ensure_evidence_key()  # recordings are encrypted to the centre
        self.fleet.ensure_live_key()  # and so is the live view during an SOS
        self.ca: CertPair = self.fleet.ca
        # In the work directory, never FLEET/servers: that holds the deployment's broker
        # certificate (`sos-center ca server broker`), which a loopback one must not replace.
        self.server = pki.issue_server_cert(self.ca, self.workdir / "server", "broker",
                                            [HOST, "localhost"])
        (self.workdir / "data").mkdir(exist_ok=True)
        self.conf = self.workdir / "mosquitto.conf"
        self.log_file = self.workdir / "mosquitto.log"
        self.conf.write_text(render_mosquitto_conf(
            self.fleet, self.server, host=HOST, port=self.port, data_dir=self.workdir / "data",
            log_file=self.log_file,
            run_as=getpass.getuser(),  # do not drop to 'mosquitto': these files are ours
        ))
        self._identities: dict[str, BrokerConfig] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self.centre = self.identity(self.CENTRE, "centre")  # known before the broker starts
        self.admin = admin_config(self.fleet, HOST, self.port)

    def identity(self, name: str, kind: str = "token") -> BrokerConfig:
        """How `name` reaches this broker: its own key (made in its own directory) and a
        certificate from the fleet CA, with a quick reconnect for tests. The broker's client id
        for it is `name`, whatever id the client asks for."""
        if name not in self._identities:
            pair = self.fleet.enrol_local(name, kind, self.workdir / "identities" / name)
            if self.existing_fleet:
                log.warning("enrolled %s (%s) in the existing fleet %s", name, kind,
                            self.fleet.directory)
            self._identities[name] = BrokerConfig(
                HOST, self.port, ca_file=str(self.ca.cert_file), cert_file=str(pair.cert_file),
                key_file=str(pair.key_file), reconnect_min_s=0.2, reconnect_max_s=1.0)
            self.sync()
        return self._identities[name]

    def sync(self) -> list[str]:
        """Tell the running broker what the registry says (nothing to do if it is stopped: it
        reads the registry's access list when it starts)."""
        if not self.running:
            return []
        self.fleet.reload()  # another Fleet object may have enrolled or revoked someone
        with BrokerAdmin(self.admin) as admin:
            return admin.sync(self.fleet)

    def signing_key_file(self, name: str) -> Path:
        """Where `identity(name)` made the key `name` signs its messages with."""
        return self.workdir / "identities" / name / "signing.key"

    def centre_keys(self) -> list[Ed25519PublicKey]:
        """What a device trusts for commands and delivery receipts (trust.centre_keys)."""
        return [public_key_from_b64(k) for k in self.fleet.centre_public_keys()]

    def centre_service(self, store: Store, *, identity: str = CENTRE,
                       **kwargs: Any) -> CenterService:
        """A control centre on this broker, with the fleet's keys (as `sos-center serve`).
        `identity`: the instance's own `centre.<name>` (enrolled on first use); two instances
        need two identities, since the broker makes the identity the client id."""
        broker = self.centre if identity == self.CENTRE else self.identity(identity, "centre")
        kwargs.setdefault("client_id", identity)
        kwargs.setdefault("signer", self.fleet.centre_signer())
        return CenterService(broker, store, trust=FleetTrust(self.fleet), **kwargs)

    def anonymous(self) -> BrokerConfig:
        """A client that checks the broker but shows no certificate of its own."""
        return BrokerConfig(HOST, self.port, ca_file=str(self.ca.cert_file),
                            reconnect_min_s=0.2, reconnect_max_s=1.0)

    def revoke(self, name: str) -> None:
        """Revoke `name`'s certificate as the operator procedure does (docs/FLASHING.md): reload
        the broker (it re-reads the CRL, so the certificate cannot connect again), then sync
        (the plugin forgets `name` and disconnects it). The broker keeps running."""
        self.fleet.revoke(name)
        self._identities.pop(name, None)
        if self.running:
            self.reload()
            self.sync()

    def reload(self) -> None:
        """SIGHUP, as `systemctl reload mosquitto`: the broker re-reads the CRL for new
        connections. It handles the signal in its main loop before it serves the next packet
        (src/loop.c), so a request sent after this returns sees the new CRL."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGHUP)

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        self.fleet.reload()
        write_broker_access(self.fleet, self.workdir / "data")  # who may do what, from the registry
        self._proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready(timeout_s)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut does: what was not autosaved is gone."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait()
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll until a TLS handshake succeeds: readiness has no event to wait on."""
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_file))
        ctx.load_cert_chain(self.centre.cert_file, self.centre.key_file)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise BrokerError(f"mosquitto exited ({self._proc.returncode}): {err.strip()} "
                                  f"(log: {self.log_file})")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as raw, \
                        ctx.wrap_socket(raw, server_hostname=HOST):
                    return
            except OSError:
                time.sleep(0.05)
        raise BrokerError(f"mosquitto did not listen on {HOST}:{self.port} within {timeout_s} s "
                          f"(log: {self.log_file})")

    def __enter__(self) -> PrivateBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
