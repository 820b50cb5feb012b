"""Helpers for the ingest tests (no tests here): a fleet with enrolled devices, a device card
of signed, age-encrypted segments written the way the recorder writes them, and a minimal tus
client on http.client with the device's own TLS certificate."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_center.fleet import Fleet
from control_center.ingest import DirectoryStore, EvidenceStore, IngestServer
from control_center.pki import CertPair
from evidence_format.age_stream import AgeStreamWriter
from evidence_format.manifest import build_manifest, manifest_sha256, sign_manifest
from firmware.camera.store import SegmentStore
from protocol.signing import load_or_make_key


def make_fleet(root: Path) -> Fleet:
    fleet = Fleet.create(root / "fleet")
    fleet.ensure_evidence_key()
    return fleet


@dataclass
class Device:
    name: str
    tls: CertPair
    signing_key_file: Path
    home: Path


def enrol(fleet: Fleet, root: Path, name: str, kind: str = "token") -> Device:
    home = root / "devices" / name
    home.mkdir(parents=True, exist_ok=True)
    pair = fleet.enrol_local(name, kind, home)
    return Device(name, pair, home / "signing.key", home)


@dataclass(frozen=True)
class Seg:
    """One segment as it sits on the device card."""

    device_id: str
    seq: int
    ciphertext: Path
    manifest: bytes
    signature: bytes
    manifest_sha256: str
    ciphertext_sha256: str
    size: int

    def data(self) -> bytes:
        return self.ciphertext.read_bytes()


class Card:
    """A device's recordings directory, filled like SegmentRecorder fills it: age stream
    encryption to the fleet's evidence key, a chained manifest, its minisign signature."""

    def __init__(self, fleet: Fleet, device: Device, directory: Path,
                 device_id: str | None = None) -> None:
        self.fleet = fleet
        self.device_id = device_id or device.name
        self.key = load_or_make_key(device.signing_key_file)
        self.store = SegmentStore(directory)
        self.directory = directory
        self.prev: str | None = None
        self.next_seq = 1

    def record(self, plaintext: bytes, *, seq: int | None = None, flags: tuple[str, ...] = (),
               prev: str | bool | None = True, call_id: str | None = None) -> Seg:
        """Segment `seq` (default: the next one) chained to the last one recorded here
        (`prev=True`), or to the given hash."""
        seq = self.next_seq if seq is None else seq
        f = self.store.open_segment(seq)
        writer = AgeStreamWriter(f, self.fleet.evidence_recipients())
        writer.write(plaintext)
        writer.close()
        f.flush()
        part = self.store.path(seq, ".ts.age.part")
        raw = part.read_bytes()
        chained = self.prev if prev is True else prev
        minute = f"2026-03-01T08:{seq % 60:02d}"
        manifest = build_manifest(
            device_id=self.device_id, seq=seq, start_utc=f"{minute}:00.000Z",
            end_utc=f"{minute}:10.000Z", start_mono=10.0 * seq, end_mono=10.0 * seq + 10,
            frames=100, gps_track=[{"lat": 52.37, "lon": 4.9, "utc": f"{minute}:05.000Z"}],
            call_id=call_id, flags=list(flags), ciphertext_sha256=hashlib.sha256(raw).hexdigest(),
            ciphertext_bytes=len(raw), prev_manifest_sha256=chained,
            chain_restart=None if chained is not None or seq == 1 else "test restart")
        data, signature = sign_manifest(manifest, self.key)
        digest = manifest_sha256(manifest)
        self.store.commit(seq, f, manifest=data, signature=signature, manifest_sha256=digest,
                          evidence="evidence" in flags, call_id=call_id)
        self.prev = digest
        self.next_seq = seq + 1
        return Seg(self.device_id, seq, self.store.path(seq, ".ts.age"), data, signature, digest,
                   manifest["ciphertext_sha256"], len(raw))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def client_context(fleet: Fleet, pair: CertPair) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(fleet.ca.cert_file))
    ctx.load_cert_chain(str(pair.cert_file), str(pair.key_file))
    return ctx


def metadata(seg: Seg, **override: bytes | str) -> str:
    values: dict[str, bytes | str] = {"device_id": seg.device_id, "seq": str(seg.seq),
                                      "manifest": seg.manifest, "signature": seg.signature}
    values.update(override)
    return ",".join(f"{k} {base64.b64encode(v.encode() if isinstance(v, str) else v).decode()}"
                    for k, v in values.items())


class Tus:
    """A bare tus client over http.client, one connection per request."""

    def __init__(self, url: str, fleet: Fleet, pair: CertPair) -> None:
        host, port = url.removeprefix("https://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.ctx = client_context(fleet, pair)

    def connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> Reply:
        conn = self.connect()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                         response.read())
        finally:
            conn.close()

    def options(self) -> Reply:
        return self.request("OPTIONS", "/files/")

    def create(self, seg: Seg, *, length: int | None = None, body: bytes | None = None,
               **override: bytes | str) -> Reply:
        """POST; with `body`, creation-with-upload."""
        headers = {"Tus-Resumable": "1.0.0",
                   "Upload-Length": str(seg.size if length is None else length),
                   "Upload-Metadata": metadata(seg, **override)}
        if body is not None:
            headers["Content-Type"] = "application/offset+octet-stream"
        return self.request("POST", "/files/", headers, body)

    def head(self, location: str) -> Reply:
        return self.request("HEAD", location, {"Tus-Resumable": "1.0.0"})

    def patch(self, location: str, offset: int, data: bytes, *,
              prefer: str | None = None) -> Reply:
        headers = {"Tus-Resumable": "1.0.0", "Upload-Offset": str(offset),
                   "Content-Type": "application/offset+octet-stream"}
        if prefer:
            headers["Prefer"] = prefer
        return self.request("PATCH", location, headers, data)

    def receipt(self, location: str, *, wait: int | None = None) -> Reply:
        return self.request("GET", f"{location}/receipt",
                            {"Prefer": f"wait={wait}"} if wait is not None else {})

    def upload(self, seg: Seg, data: bytes | None = None) -> Reply:
        """POST then one PATCH with every byte; the PATCH's reply."""
        created = self.create(seg)
        assert created.status == 201, created.body
        location = created.header("location")
        assert location
        return self.patch(location, 0, seg.data() if data is None else data)

    def send_and_drop(self, location: str, offset: int, data: bytes, announced: int) -> None:
        """Start a PATCH announcing `announced` bytes, send only `data`, then end the stream
        (FIN after the data), as a device does when its link goes away mid-upload."""
        conn = self.connect()
        conn.putrequest("PATCH", location)
        for name, value in (("Tus-Resumable", "1.0.0"), ("Upload-Offset", str(offset)),
                            ("Content-Type", "application/offset+octet-stream"),
                            ("Content-Length", str(announced))):
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(data)
        assert conn.sock is not None
        socket.socket.shutdown(conn.sock, socket.SHUT_WR)
        self._dropped = conn  # closed by close_dropped(), once the server has seen the end

    def close_dropped(self) -> None:
        self._dropped.close()


def decode_receipt(header: str) -> dict[str, Any]:
    return json.loads(base64.b64decode(header, validate=True))


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


class Events:
    """What the server audited, with a way to wait for an event (no sleeping)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def record(self, entry: dict[str, Any]) -> None:
        with self._cond:
            self.entries.append(entry)
            self._cond.notify_all()

    def wait(self, event: str, timeout: float = 15.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.entries if e["event"] == event), None)

        with self._cond:
            entry = self._cond.wait_for(found, timeout)
        assert entry, f"no {event} within {timeout} s; saw {[e['event'] for e in self.entries]}"
        return entry

    def names(self) -> list[str]:
        return [e["event"] for e in self.entries]


@dataclass
class Env:
    root: Path
    fleet: Fleet
    device: Device
    server_cert: CertPair
    store: EvidenceStore
    events: Events = field(default_factory=Events)
    servers: list[IngestServer] = field(default_factory=list)

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def workdir(self) -> Path:
        return self.root / "work"

    def start(self, **kwargs: Any) -> IngestServer:
        server = self.make(**kwargs)
        server.start()
        return server

    def make(self, **kwargs: Any) -> IngestServer:
        """A server not yet started (stopped by `stop_all` once it is)."""
        server = IngestServer(self.fleet, self.store, self.audit, workdir=self.workdir,
                              cert_file=self.server_cert.cert_file,
                              key_file=self.server_cert.key_file, host="127.0.0.1", port=0,
                              on_event=self.events.record, **kwargs)
        self.servers.append(server)
        return server

    def client(self, server: IngestServer, pair: CertPair | None = None) -> Tus:
        return Tus(server.url, self.fleet, pair or self.device.tls)

    def card(self, name: str = "card", device: Device | None = None) -> Card:
        return Card(self.fleet, device or self.device, self.root / name)


def new_env(root: Path, store: EvidenceStore | None = None, device: str = "tok-001") -> Env:
    """A fleet with one enrolled device and an ingest server certificate (servers are
    started by `Env.start` and must be stopped by the caller: `stop_all`)."""
    fleet = make_fleet(root)
    enrolled = enrol(fleet, root, device)
    server_cert = fleet.issue_server("ingest", ["127.0.0.1", "localhost"])
    return Env(root, fleet, enrolled, server_cert, store or DirectoryStore(root / "evidence"))


def stop_all(env: Env) -> None:
    for server in env.servers:
        server.stop()


# -- slow and hostile clients (tests/test_ingest_fairness.py) --------------------------------------
def patch_headers(offset: int) -> dict[str, str]:
    return {"Tus-Resumable": "1.0.0", "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream"}


class SlowBody:
    """A PATCH whose body trickles in: the headers and `first` bytes at once, then one byte
    every `interval` s on its own thread, until `stop()` or until the server closes the
    connection (`closed_by_server` is then set)."""

    def __init__(self, client: Tus, location: str, offset: int, data: bytes, *,
                 first: int = 0, interval: float = 0.02) -> None:
        self.data, self.sent, self.interval = data, first, interval
        self.conn = client.connect()
        self.conn.putrequest("PATCH", location)
        for name, value in {**patch_headers(offset), "Content-Length": str(len(data))}.items():
            self.conn.putheader(name, value)
        self.conn.endheaders()
        self.conn.send(data[:first])
        self.stopped = threading.Event()
        self.closed_by_server = threading.Event()
        self._thread = threading.Thread(target=self._dribble, daemon=True)
        self._thread.start()

    def _dribble(self) -> None:
        while self.sent < len(self.data) and not self.stopped.wait(self.interval):
            try:
                self.conn.send(self.data[self.sent:self.sent + 1])
            except OSError:
                self.closed_by_server.set()
                return
            self.sent += 1

    def stop(self) -> None:
        self.stopped.set()
        self._thread.join()
        self.conn.close()


class Receiving:
    """Counts the bodies the server has started to receive; `wait(n)` until it is n."""

    def __init__(self, server: IngestServer) -> None:
        self.count = 0
        self._cond = threading.Condition()
        original = server.receive

        def spy(*args: Any) -> int | None:
            with self._cond:
                self.count += 1
                self._cond.notify_all()
            return original(*args)

        server.receive = spy  # type: ignore[method-assign]

    def wait(self, n: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= n, timeout)


def tcp_from(address: str, port: int) -> socket.socket:
    """A bare TCP connection to the server from `address` (any 127.x.y.z on Linux), which
    never starts TLS: a flood's connection."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the server closes `sock` within `timeout` (its end of stream, or a reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


def still_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed nor reset `sock` (nothing waits)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def idle_connection(client: Tus, timeout: float = 10.0) -> tuple[ssl.SSLSocket | None, bytes]:
    """A TLS connection that never sends a request, and what the server sends on it until it
    ends its side (a read that waits `timeout` also ends it). The socket is left open (the
    caller closes it), as a client holding connections would; (None, b"") if the server
    closed it before its handshake ended (at accept)."""
    try:
        tls = client.ctx.wrap_socket(socket.create_connection((client.host, client.port)),
                                     server_hostname=client.host)
    except (ssl.SSLError, ConnectionError):
        return None, b""
    tls.settimeout(timeout)
    received = b""
    with contextlib.suppress(OSError):
        while data := tls.recv(4096):
            received += data
    return tls, received


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first bytes a TLS client with `ctx` sends (its ClientHello), to trickle them."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def dribble_until_closed(sock: socket.socket, data: bytes, interval: float = 0.02) -> int:
    """Send `data` one byte every `interval` s until the server has closed `sock` (a send
    fails); the bytes sent before that. Fails if the server took all of `data`."""
    for sent in range(len(data)):
        try:
            sock.send(data[sent:sent + 1])
        except OSError:
            return sent
        time.sleep(interval)  # the client's pace, not synchronisation
    raise AssertionError(f"the server took all {len(data)} bytes at one per {interval} s")
