"""A private coturn for the simulator and the tests: loopback only, free ports, a fresh secret.

By default configured as a deployment is (hw/turn/turnserver.conf) in what a call needs: the
TURN REST API's shared secret (`use-auth-secret`), fingerprints, no CLI, no multicast peers.
What differs is what loopback needs: it listens and relays on 127.0.0.1 and lets peers on
loopback be reached (`allow-loopback-peers`; a deployment denies them), without TLS.

`TurnServer(deployment_conf=PATH)` runs the deployment's file itself instead, with only its
addresses, ports, files and certificate replaced (a self-signed one for 127.0.0.1), so a test
sees what that file really allows and refuses.

Started as root, coturn keeps running as root (it drops privileges only with `proc-user`;
Debian's coturn.service runs it as the user turnserver instead).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"
REALM = "sim.sos-devices.example"
log = logging.getLogger("sos.sim.turn")

# A STUN Binding request (RFC 8489 section 5): type 0x0001, no attributes, the magic cookie.
_MAGIC_COOKIE = 0x2112A442
_BINDING_REQUEST, _BINDING_SUCCESS = 0x0001, 0x0101


class TurnServerError(RuntimeError):
    pass


def turnserver_binary() -> str:
    found = shutil.which("turnserver") or next(
        (p for p in ("/usr/bin/turnserver", "/usr/sbin/turnserver") if Path(p).exists()), None)
    if found is None:
        raise TurnServerError("turnserver not found: run `make sysdeps` (or apt-get install "
                              "coturn)")
    return found


def free_port() -> int:
    """A port free for both UDP and TCP on loopback (coturn listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port: int = udp.getsockname()[1]
            try:
                with socket.socket() as tcp:
                    tcp.bind((HOST, port))
            except OSError:
                continue
            return port


def render_conf(*, port: int, secret: str, log_file: Path, pid_file: Path, db_file: Path,
                min_port: int, max_port: int, realm: str = REALM) -> str:
    """The loopback server's turnserver.conf (comments on each line: hw/turn/turnserver.conf)."""
    return "\n".join([
        f"listening-ip={HOST}",
        f"listening-port={port}",
        f"relay-ip={HOST}",
        f"min-port={min_port}",
        f"max-port={max_port}",
        # RFC 5780 would bind port+1 too, which is not ours to take.
        "no-rfc5780",
        "no-tls",
        "no-dtls",
        "use-auth-secret",
        f"static-auth-secret={secret}",
        f"realm={realm}",
        "fingerprint",
        "no-multicast-peers",
        "allow-loopback-peers",  # both ends of a test call are on 127.0.0.1
        "no-cli",  # else every instance binds the CLI's fixed port 5766
        "relay-threads=1",  # two shared cores; one call at a time
        "user-quota=10",
        "total-quota=50",
        "no-software-attribute",
        f"pidfile={pid_file}",
        f"userdb={db_file}",  # else it opens /var/lib/turn/turndb
        f"log-file={log_file}",
        "simple-log",  # the file name as given, not one with a date added
        "no-stdout-log",
        "",
    ])


# Lines of a deployment's file that name its host: replaced or dropped on loopback.
_HOST_KEYS = ("listening-ip", "relay-ip", "external-ip", "listening-port", "tls-listening-port",
              "min-port", "max-port", "cert", "pkey", "pidfile", "userdb", "log-file", "syslog",
              "simple-log", "no-stdout-log", "static-auth-secret", "relay-threads")


def on_loopback(conf: str, *, port: int, tls_port: int, secret: str, log_file: Path,
                pid_file: Path, db_file: Path, min_port: int, max_port: int, cert: Path,
                key: Path) -> str:
    """A deployment's turnserver.conf with what names its host replaced by loopback's, and the
    secret appended as the install step appends it; every other line kept as it is."""
    kept = [line for line in conf.splitlines()
            if line.strip().split("=", 1)[0].strip() not in _HOST_KEYS]
    return "\n".join([*kept,
                      f"listening-ip={HOST}", f"relay-ip={HOST}", f"listening-port={port}",
                      f"tls-listening-port={tls_port}", f"min-port={min_port}",
                      f"max-port={max_port}", f"cert={cert}", f"pkey={key}",
                      f"pidfile={pid_file}", f"userdb={db_file}", f"log-file={log_file}",
                      "simple-log", "no-stdout-log", "relay-threads=1",
                      f"static-auth-secret={secret}", ""])


def self_signed(cert: Path, key: Path) -> None:
    """A certificate for 127.0.0.1 signed by its own key (the loopback server's 5349)."""
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5))
                   .not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.IPAddress(IPv4Address(HOST))]), critical=False)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))


def stun_binding_answered(port: int, timeout_s: float) -> bool:
    """Whether a STUN Binding request to HOST:port gets a success answer within `timeout_s`."""
    transaction = secrets.token_bytes(12)
    request = struct.pack("!HHI", _BINDING_REQUEST, 0, _MAGIC_COOKIE) + transaction
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.sendto(request, (HOST, port))
            answer = sock.recv(2048)
        except OSError:  # timed out, or ICMP port unreachable (nothing listening yet)
            return False
    return (len(answer) >= 20 and struct.unpack("!H", answer[:2])[0] == _BINDING_SUCCESS
            and answer[8:20] == transaction)


class TurnServer:
    """`with TurnServer() as turn:` gives a running coturn on loopback. `turn.urls` are its
    turn: URLs (UDP and TCP), `turn.secret` the shared secret the centre mints credentials
    with (control_center/turn_credentials.py), `turn.relay_ports` where relays are opened."""

    def __init__(self, workdir: Path | None = None, *, port: int | None = None,
                 secret: str | None = None, relay_ports: int = 200,
                 extra_conf: Sequence[str] = (), deployment_conf: Path | None = None) -> None:
        """`extra_conf`: more turnserver.conf lines (a test's, e.g. "stale-nonce=2").
        `deployment_conf`: run that file on loopback instead of the simulator's own (above);
        its TLS port is then `tls_port`, with the certificate `cert_file`."""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sos-turn-")
            workdir = Path(self._tmp.name)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.secret = secret or secrets.token_hex(32)
        self.conf = self.workdir / "turnserver.conf"
        self.log_file = self.workdir / "turnserver.log"
        # A range of its own, apart from the listening port: coturn picks relay ports in it.
        low = 20000 + (self.port * 7919) % 30000
        self.relay_ports = range(low, low + relay_ports)
        self.tls_port: int | None = None
        self.cert_file: Path | None = None
        pid_file, db_file = self.workdir / "turnserver.pid", self.workdir / "turndb"
        if deployment_conf is None:
            text = render_conf(port=self.port, secret=self.secret, log_file=self.log_file,
                               pid_file=pid_file, db_file=db_file, min_port=low,
                               max_port=self.relay_ports[-1])
        else:
            self.tls_port = free_port()
            self.cert_file, key_file = self.workdir / "turn.pem", self.workdir / "turn.key"
            self_signed(self.cert_file, key_file)
            text = on_loopback(Path(deployment_conf).read_text(), port=self.port,
                               tls_port=self.tls_port, secret=self.secret,
                               log_file=self.log_file, pid_file=pid_file, db_file=db_file,
                               min_port=low, max_port=self.relay_ports[-1],
                               cert=self.cert_file, key=key_file)
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # has the secret
        with os.fdopen(fd, "w") as out:
            out.write(text + "".join(f"{line}\n" for line in extra_conf))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def urls(self) -> list[str]:
        return [f"turn:{HOST}:{self.port}?transport=udp", f"turn:{HOST}:{self.port}?transport=tcp"]

    @property
    def pid(self) -> int | None:
        """coturn's process id while it runs (a test freezes it with SIGSTOP: a network
        drop), else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen([turnserver_binary(), "-c", str(self.conf)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("coturn on %s:%d (log: %s)", HOST, self.port, self.log_file)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        """Stop, and remove the work directory if it was a temporary one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll with STUN Binding requests until one is answered: readiness has no event."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise TurnServerError(f"turnserver exited ({self._proc.returncode}): "
                                      f"{err.strip() or self.log_text()[-2000:]} "
                                      f"(log: {self.log_file})")
            if stun_binding_answered(self.port, 0.1):
                return
        raise TurnServerError(f"turnserver did not answer on {HOST}:{self.port} within "
                              f"{timeout_s} s (log: {self.log_file})")

    def __enter__(self) -> TurnServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
