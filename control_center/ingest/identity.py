"""Who is at the other end: mutual TLS with the fleet CA, its CRL, and the fleet registry.

The TLS context requires a client certificate from the fleet CA that is not on the fleet's
CRL (rebuilt whenever `crl.pem` changes, so a revocation takes effect for the next
connection). Then `device()` admits only a device identity whose certificate (name and
serial) is active in the registry (re-read when `registry.json` changes): `centre.*`
identities, server certificates and anything unregistered or revoked get a 403.
"""

from __future__ import annotations

import functools
import os
import ssl
import threading
from pathlib import Path

from cryptography import x509

from control_center import pki
from control_center.fleet import CENTRE_ID, Fleet
from control_center.ingest.tus import Refusal


class DeviceGate:
    def __init__(self, fleet: Fleet, cert_file: str | Path, key_file: str | Path) -> None:
        self.fleet = fleet
        self.cert_file, self.key_file = str(cert_file), str(key_file)
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._crl_stamp: int | None = None
        self._registry_stamp = _mtime(fleet.directory / "registry.json")

    def context(self) -> ssl.SSLContext:
        """The server context, rebuilt if the CRL changed since it was made."""
        stamp = _mtime(self.fleet.crl_file)
        with self._lock:
            if self._context is None or stamp != self._crl_stamp:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_cert_chain(self.cert_file, self.key_file)
                ctx.load_verify_locations(cafile=str(self.fleet.ca.cert_file))
                ctx.load_verify_locations(cafile=str(self.fleet.crl_file))
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
                ctx.verify_mode = ssl.CERT_REQUIRED
                self._context, self._crl_stamp = ctx, stamp
            return self._context

    def device(self, cert_der: bytes | None) -> str:
        """The device id of a peer certificate, or Refusal(403) saying why it is not one."""
        if not cert_der:
            raise Refusal(403, "no client certificate: connect with the device's fleet "
                               "certificate")
        name, serial = _name_and_serial(cert_der)
        if name is None:
            raise Refusal(403, "the client certificate has no single common name")
        if name.startswith("centre.") or CENTRE_ID.match(name):
            raise Refusal(403, f"{name} is a control-centre identity; only devices upload "
                               f"evidence")
        self._reload()
        with self._lock:
            matches = [i for i in self.fleet.identities if i.name == name and i.serial == serial]
        if not matches:
            raise Refusal(403, f"{name} (certificate serial {serial}) is not in the fleet "
                               f"registry")
        identity = matches[-1]
        if identity.status != "active":
            raise Refusal(403, f"the certificate of {name} (serial {serial}) was revoked at "
                               f"{identity.revoked_at}")
        if identity.kind == "centre":
            raise Refusal(403, f"{name} is a control-centre identity; only devices upload "
                               f"evidence")
        return name

    def _reload(self) -> None:
        stamp = _mtime(self.fleet.directory / "registry.json")
        with self._lock:
            if stamp != self._registry_stamp:
                self.fleet.reload()
                self._registry_stamp = stamp


def certificate_name(cert_der: bytes | None) -> str | None:
    """The common name of a peer certificate the TLS handshake accepted (issued by the fleet
    CA, not revoked), or None; whether it may upload is `DeviceGate.device`'s question."""
    if not cert_der:
        return None
    try:
        return _name_and_serial(cert_der)[0]
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)
def _name_and_serial(cert_der: bytes) -> tuple[str | None, str]:
    """(common name or None, serial in hex) of a DER certificate; parsed once per certificate,
    not once per request (the registry is still consulted every time)."""
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        name: str | None = pki.common_name(cert)
    except ValueError:
        name = None
    return name, f"{cert.serial_number:x}"


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None
