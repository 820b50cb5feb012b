"""HTTP for the ingest server: TLS per connection, tus requests mapped onto IngestServer.

`HTTPServer` caps connections at accept (in all, and per address still in its handshake),
does the TLS handshake in each connection's own thread within a deadline (so a slow client
cannot hold up the others), caps connections per device certificate after it (one over the
cap is answered 429 at once and closed, never kept waiting for a request), and can cut every
open connection at stop(). `PacedSocketIO` holds each connection to a pace: headers within a
deadline, bodies above a minimum rate. `_Handler` parses and answers requests; what
an upload is and how it is checked and stored is `server.IngestServer`'s job.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import io
import logging
import os
import re
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from cryptography import x509

from control_center import pki
from control_center.ingest.identity import certificate_name
from control_center.ingest.receipts import receipt_bytes, receipt_header
from control_center.ingest.tus import (
    EXTENSIONS,
    OFFSET_CONTENT_TYPE,
    TUS_VERSION,
    Refusal,
    header_int,
    parse_prefer,
    preferred_wait,
)
from control_center.ingest.uploads import REFUSED, STORED, UPLOADING, Upload
from evidence_format.files import fsync_dir

if TYPE_CHECKING:
    from control_center.ingest.server import IngestServer, Limits

log = logging.getLogger("control_center.ingest")

CHUNK = 1 << 20  # bytes read from the socket per write to the part file
CHECKPOINT = 32 << 20  # fsync (and commit the offset) at least this often within one body
DRAIN_LIMIT = 64 << 20  # a refused request's body up to this size is read and dropped
FILES = "/files/"
RAW_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")
REFUSAL_LOG_EVERY_S = 10.0  # connections closed at accept are logged at most this often
TIMEOUT_SLACK_S = 0.25  # a read's socket timeout is re-set only when off by more than this
MIN_READ_WAIT_S = 0.01  # never a zero socket timeout (that would make the socket non-blocking)
TURN_AWAY_LINGER_S = 1.0  # a connection turned away at once: the most it is given to read it
TURN_AWAY_BYTES = 64 << 10  # ... and the most of its request read and dropped meanwhile
SERVER_VERSION = "sos-ingest/1"
IDLE, HEADERS, BODY = "idle", "headers", "body"


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for handlers: stop() leaves nothing running
    block_on_close = True
    request_queue_size = 128  # listen backlog: a burst of docking devices waits, is not reset

    def __init__(self, address: tuple[str, int], ingest: IngestServer) -> None:
        self.ingest = ingest
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        # Connection slots: accepted sockets, those still in their handshake by address, and
        # (after the handshake) open connections per device certificate.
        self._slots = threading.Condition()
        self._admitted: set[socket.socket] = set()
        self._handshaking: dict[socket.socket, str] = {}
        self._handshakes_from: Counter[str] = Counter()
        self._by_device: Counter[str] = Counter()
        self._closed_at_accept = _AcceptRefusals()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's would look up the host's FQDN
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    # -- connection slots ----------------------------------------------------------------------
    def verify_request(self, request, client_address) -> bool:
        """At accept, in the accepting thread: take a connection slot, or close the socket
        before its TLS handshake costs any CPU (a TLS client cannot read a plain 503; it sees
        the connection reset and backs off)."""
        limits = self.ingest.limits
        address = str(client_address[0])
        with self._slots:
            if len(self._admitted) >= limits.max_connections:
                reason = f"{len(self._admitted)} connections are open, max_connections"
            elif self._handshakes_from[address] >= limits.max_handshakes_per_address:
                reason = (f"{address} has {self._handshakes_from[address]} connections in their "
                          f"TLS handshake, max_handshakes_per_address")
            else:
                self._admitted.add(request)
                self._handshaking[request] = address
                self._handshakes_from[address] += 1
                return True
        self._closed_at_accept.note(reason)
        return False

    def shutdown_request(self, request) -> None:
        """The connection is over (or was never served): give back its slots."""
        with self._slots:
            self._handshake_over(request)
            self._admitted.discard(request)
            self._slots.notify_all()
        super().shutdown_request(request)

    def _handshake_over(self, request) -> None:
        """Under self._slots: `request` no longer counts as in its handshake."""
        address = self._handshaking.pop(request, None)
        if address is not None:
            self._handshakes_from[address] -= 1
            if not self._handshakes_from[address]:
                del self._handshakes_from[address]

    def _take_device_slot(self, device: str | None) -> Refusal | None:
        """Count a connection against its device certificate's max_device_connections; the
        refusal (429) its requests get if the device already holds that many."""
        if device is None:
            return None  # not a device: DeviceGate refuses its requests
        limits = self.ingest.limits
        with self._slots:
            held = self._by_device[device]
            if held < limits.max_device_connections:
                self._by_device[device] += 1
                return None
        log.info("ingest: %s opened a connection over its limit of %d", device,
                 limits.max_device_connections)
        return Refusal(429, f"device {device} already has {held} connections open, its limit; "
                            f"close one or try again later", retry=True,
                       retry_after=limits.retry_after_s)

    def _give_device_slot(self, device: str) -> None:
        with self._slots:
            self._by_device[device] -= 1
            if not self._by_device[device]:
                del self._by_device[device]
            self._slots.notify_all()

    def open_connections(self) -> int:
        with self._slots:
            return len(self._admitted)

    def wait_connections(self, at_most: int, timeout: float) -> bool:
        """Wait until at most `at_most` connections are open; False if `timeout` passed."""
        with self._slots:
            return self._slots.wait_for(lambda: len(self._admitted) <= at_most, timeout)

    # -- serving one connection ----------------------------------------------------------------
    def finish_request(self, request, client_address) -> None:
        """TLS handshake in the connection's own thread, within handshake_timeout_s (Python's
        ssl applies a socket timeout to the whole handshake, not to each read), then the HTTP
        exchange."""
        limits = self.ingest.limits
        request.settimeout(limits.handshake_timeout_s)
        with self.connections_lock:
            self.connections.add(request)
        try:
            tls = self.ingest.gate.context().wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:
            log.info("TLS refused for %s:%s: %s", *client_address[:2], exc)
            with self.connections_lock:
                self.connections.discard(request)
            return
        finally:
            with self._slots:
                self._handshake_over(request)
        tls.settimeout(limits.timeout_s)
        with self.connections_lock:
            self.connections.discard(request)
            self.connections.add(tls)
        device = certificate_name(tls.getpeercert(binary_form=True))
        refusal = self._take_device_slot(device)
        try:
            if refusal is None:
                self.RequestHandlerClass(tls, client_address, self)
            else:
                self._turn_away(tls, refusal)
        finally:
            if refusal is None and device is not None:
                self._give_device_slot(device)
            with self.connections_lock:
                self.connections.discard(tls)
            with contextlib.suppress(OSError):
                tls.close()

    def _turn_away(self, tls: socket.socket, refusal: Refusal) -> None:
        """Answer a connection over its device's max_device_connections as soon as its
        handshake ends, without waiting for a request (a connection that waited would hold a
        slot of max_connections, and one certificate reconnecting could hold them all), and
        end it. Its reader gets at most TURN_AWAY_LINGER_S (and header_timeout_s) to take the
        answer: what it sends meanwhile is read and dropped, so that closing does not reset
        the connection under the answer."""
        linger = min(TURN_AWAY_LINGER_S, self.ingest.limits.header_timeout_s)
        deadline = time.monotonic() + linger
        with contextlib.suppress(OSError, ValueError):
            tls.settimeout(linger)
            tls.sendall(answer_at_once(refusal))
            socket.socket.shutdown(tls, socket.SHUT_WR)  # the client sees the end at once
            dropped = 0
            while dropped < TURN_AWAY_BYTES and (left := deadline - time.monotonic()) > 0:
                tls.settimeout(max(left, MIN_READ_WAIT_S))
                data = tls.recv(TURN_AWAY_BYTES)
                if not data:
                    break
                dropped += len(data)

    def cut_all(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            cut(connection)


class _AcceptRefusals:
    """Connections closed at accept, logged the first at once and then at most one line per
    REFUSAL_LOG_EVERY_S with their count: a flood must not flood the log too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._logged = -REFUSAL_LOG_EVERY_S

    def note(self, reason: str) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._logged < REFUSAL_LOG_EVERY_S:
                return
            count, self._count, self._logged = self._count, 0, now
        log.warning("ingest: closed %d connection(s) at accept, the last because %s", count,
                    reason)


def answer_at_once(refusal: Refusal) -> bytes:
    """A complete HTTP/1.1 answer carrying `refusal`, sent before any request was read (the
    client reads it as the answer to the request it sends), with `Connection: close`."""
    body = refusal.body()
    head = [f"HTTP/1.1 {refusal.status} {HTTPStatus(refusal.status).phrase}",
            f"Server: {SERVER_VERSION}", f"Date: {email.utils.formatdate(usegmt=True)}",
            f"Tus-Resumable: {TUS_VERSION}"]
    if refusal.retry_after is not None:
        head.append(f"Retry-After: {refusal.retry_after}")
    head += ["Connection: close", "Content-Type: application/json",
             f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def cut(connection: socket.socket) -> None:
    """Make the connection's reader see the end of the stream, from another thread."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(connection, socket.SHUT_RDWR)


class PacedSocketIO(socket.SocketIO):
    """A connection's raw reader (under the handler's `rfile`) that holds the client to a pace:

    - idle, between requests: the next request's first byte within `timeout_s`;
    - headers: the request line and headers complete within `header_timeout_s` of that first
      byte, however slowly they trickle in (slowloris, which a timeout per read never stops);
    - body (from `start_body()`): at least `min_body_rate` bytes/s averaged over each
      `body_rate_window_s` that its reads spent waiting for the client (so a window without a
      byte fails it); with no minimum rate, never `timeout_s` without a byte.

    Only the time spent waiting in `recv` counts against a body: not the server's own time
    before its first read (creating the upload, waiting for its lock, checking space) or
    between reads (writing, fsyncing), so a slow server never cuts a client that sent at
    full speed, and bytes already in the socket buffer count as soon as they are read. The
    rate is judged after each read returns, its bytes included.

    Idle or headers over their time: TimeoutError, which http.server answers by closing (as it
    did a socket timeout). A body too slow: the reader reports the end of the stream instead
    (after handing over the bytes of the read that showed it), so the bytes already read are
    kept (and stay resumable), and `cut_reason` says why; the handler then closes the
    connection. Each wait is bounded by the socket timeout, re-set only when it is off by
    more than TIMEOUT_SLACK_S; a body's read costs two clock readings and a comparison (an
    upload is thousands of 16 KiB TLS records).
    """

    def __init__(self, sock: socket.socket, limits: Limits, peer: str) -> None:
        super().__init__(sock, "rb")
        self.limits = limits
        self.peer = peer
        self.cut_reason: str | None = None
        self._phase = IDLE
        self._deadline = 0.0  # idle: the next request's first byte; headers: their end
        self._waited = 0.0  # body: seconds this window's reads waited in recv
        self._window_bytes = 0
        self._timeout = sock.gettimeout()

    def await_request(self) -> None:
        self._phase = IDLE
        self._deadline = time.monotonic() + self.limits.timeout_s

    def start_body(self) -> None:
        """The request's headers are in: what is read now is its body, paced by its rate from
        its first read on."""
        self._phase = BODY
        self._waited = 0.0
        self._window_bytes = 0

    def ended(self) -> str:
        """Why a body ended early, for the log and the audit line."""
        return self.cut_reason or "the connection ended before the body was complete"

    def readinto(self, b) -> int:  # type: ignore[override]
        self._checkClosed()
        if self._phase == BODY:
            return self._read_body(b)
        while (wait := self._time_left(time.monotonic())) is not None:
            self._wait_at_most(wait)
            try:
                n = self._sock.recv_into(b)
            except TimeoutError:
                continue  # _time_left decides whether that was too long
            if n and self._phase == IDLE:
                self._phase = HEADERS
                self._deadline = time.monotonic() + self.limits.header_timeout_s
            return n
        raise TimeoutError(self.cut_reason)

    def _read_body(self, b) -> int:
        """One read of a body: its bytes, or 0 at its end or once it was cut."""
        limits = self.limits
        while self.cut_reason is None:
            if not limits.min_body_rate:
                self._wait_at_most(limits.timeout_s)
                try:
                    return self._sock.recv_into(b)
                except TimeoutError:
                    self.cut_reason = f"no byte of the body for {limits.timeout_s:g} s"
                    break
            self._wait_at_most(limits.body_rate_window_s - self._waited)
            started = time.monotonic()
            try:
                n: int | None = self._sock.recv_into(b)
            except TimeoutError:
                n = None
            self._waited += time.monotonic() - started
            self._window_bytes += n or 0
            self._judge_rate()
            if n is not None:
                return n  # even if it showed the body too slow: what arrived is kept
        return 0

    def _judge_rate(self) -> None:
        """Once this window's reads have waited `body_rate_window_s`: `cut_reason` if too few
        bytes came in it, else a new window begins."""
        limits = self.limits
        waited = self._waited
        if waited < limits.body_rate_window_s:
            return
        if self._window_bytes < limits.min_body_rate * waited:
            self.cut_reason = (f"the body came at {self._window_bytes / waited:.0f} bytes/s "
                               f"over {waited:.1f} s, below the minimum of "
                               f"{limits.min_body_rate} bytes/s")
            return
        self._waited, self._window_bytes = 0.0, 0

    def _wait_at_most(self, seconds: float) -> None:
        """The socket timeout for the next read, re-set only when it is off by more than
        TIMEOUT_SLACK_S."""
        seconds = max(seconds, MIN_READ_WAIT_S)
        if self._timeout is None or abs(self._timeout - seconds) > TIMEOUT_SLACK_S:
            self._sock.settimeout(seconds)
            self._timeout = seconds

    def _time_left(self, now: float) -> float | None:
        """Idle or headers: how long the next read may wait, or None (and `cut_reason`) if
        the time is up."""
        limits = self.limits
        if self._phase == IDLE:
            return self._left(self._deadline - now, f"no request for {limits.timeout_s:g} s")
        return self._left(self._deadline - now, f"the request line and headers took over "
                                                f"{limits.header_timeout_s:g} s")

    def _left(self, seconds: float, reason: str) -> float | None:
        if seconds > 0:
            return seconds
        self.cut_reason = reason
        if self._phase == HEADERS:
            log.info("ingest: %s: %s; connection closed", self.peer, reason)
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = SERVER_VERSION
    sys_version = ""
    server: HTTPServer
    disable_nagle_algorithm = True  # an answer's body is not held back behind its headers
    body_read = False  # whether this request's body was consumed (else a refusal closes)

    pace: PacedSocketIO

    @property
    def ingest(self) -> IngestServer:
        return self.server.ingest

    def setup(self) -> None:
        """The plain reader StreamRequestHandler makes is replaced by a paced one."""
        super().setup()
        self.rfile.close()
        peer = certificate_name(self.connection.getpeercert(binary_form=True)) or "unknown"
        self.pace = PacedSocketIO(self.connection, self.ingest.limits,
                                  f"{peer} at {self.client_address[0]}")
        self.rfile = io.BufferedReader(self.pace)

    def handle_one_request(self) -> None:
        self.pace.await_request()
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- plumbing --------------------------------------------------------------------------------
    def _reply(self, status: int, headers: dict[str, str] | None = None,
               body: bytes = b"", content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Tus-Resumable", TUS_VERSION)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        if body or (status not in (204, 304) and self.command != "HEAD"):
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _refuse(self, refusal: Refusal, *, body_unread: bool = False) -> None:
        """Answer `refusal`; a body not yet read is drained first, unless the connection is
        closing anyway (then reading it would only keep the answer waiting)."""
        if body_unread and not self.close_connection:
            self._drain()
        headers = {}
        if refusal.retry_after is not None:
            headers["Retry-After"] = str(refusal.retry_after)
        if refusal.status == 412:
            headers["Tus-Version"] = TUS_VERSION
        if refusal.offset is not None:
            headers["Upload-Offset"] = str(refusal.offset)
        self._reply(refusal.status, headers, refusal.body())

    def _drain(self) -> None:
        """Read and drop an unread request body, so the client (which sends all of it before
        it reads an answer) gets the refusal and the connection stays usable; a body over
        DRAIN_LIMIT, or one not announced by Content-Length, closes the connection instead."""
        self.body_read = True
        text = self.headers.get("Content-Length")
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if text is None and not chunked:
            return
        if chunked or not re.fullmatch(r"[0-9]{1,19}", text.strip()) or int(text) > DRAIN_LIMIT:
            self.close_connection = True
            return
        left = int(text)
        try:
            while left:
                chunk = self.rfile.read(min(left, CHUNK))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        if left:
            self.close_connection = True

    def _device(self) -> str:
        try:
            return self.ingest.gate.device(self.connection.getpeercert(binary_form=True))
        except Refusal as refusal:
            self.ingest.event("access_refused", _peer_name(self.connection),
                              method=self.command, path=self.path[:200], reason=refusal.message)
            raise

    def _tus(self) -> None:
        version = self.headers.get("Tus-Resumable")
        if version != TUS_VERSION:
            raise Refusal(412, f"this server speaks tus {TUS_VERSION}; the request says "
                               f"Tus-Resumable: {version}")

    def _upload(self, device: str, upload_id: str, *, refused: int = 410) -> Upload:
        """The device's own upload; `refused` is the status for one that was refused (410:
        gone; a receipt request gets 422 and the reason instead)."""
        upload = self.ingest.upload(upload_id)
        if upload is None:
            raise Refusal(404, f"no upload {upload_id[:40]} on this server")
        if upload.device_id != device:
            raise Refusal(403, f"upload {upload_id} belongs to another device")
        if upload.state == REFUSED:
            if refused == 422:
                raise Refusal(422, upload.error or f"segment {upload.seq} was refused")
            raise Refusal(410, f"upload {upload_id} was refused and discarded: {upload.error}")
        return upload

    def _prefer(self) -> dict[str, str]:
        return parse_prefer(self.headers.get("Prefer"))

    def _body_size(self) -> int:
        """The request body's size; a body must be announced by Content-Length."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise Refusal(411, "send the body with a Content-Length; chunked bodies are not "
                               "supported")
        return header_int(self.headers.get("Content-Length") or "0", "Content-Length",
                          status=411)

    def _route(self) -> tuple[str, str | None, str | None]:
        """(kind, id, rest) for /files/, /files/<id>, /files/<id>/receipt, /raw/<name>."""
        path = self.path.split("?", 1)[0]
        if path in ("/files", FILES):
            return "files", None, None
        match = re.fullmatch(r"/files/([0-9a-f]{32})(/receipt)?", path)
        if match:
            return "upload", match.group(1), match.group(2)
        match = re.fullmatch(r"/raw/([^/]+)", path)
        if match:
            return "raw", match.group(1), None
        return "none", None, None

    def _dispatch(self, handler: Callable[[], None]) -> None:
        self.body_read = False
        self.pace.start_body()
        try:
            handler()
        except Refusal as refusal:
            self._refuse(refusal, body_unread=not self.body_read)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("ingest: %s %s failed", self.command, self.path)
            self.close_connection = True
            self._refuse(Refusal(500, "the ingest server failed on this request (see its log)",
                                 retry=True, retry_after=self.ingest.limits.retry_after_s))

    # -- methods ---------------------------------------------------------------------------------
    def do_OPTIONS(self) -> None:
        self._dispatch(self._options)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def do_HEAD(self) -> None:
        self._dispatch(self._head)

    def do_PATCH(self) -> None:
        self._dispatch(self._patch)

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_PUT(self) -> None:
        self._dispatch(self._put)

    def _options(self) -> None:
        self._device()
        self._reply(204, {"Tus-Version": TUS_VERSION, "Tus-Extension": EXTENSIONS,
                          "Tus-Max-Size": str(self.ingest.limits.max_size)})

    def _post(self) -> None:
        kind, _, _ = self._route()
        if kind != "files":
            raise Refusal(404, f"POST {self.path[:80]}: uploads are created at {FILES}")
        device = self._device()
        self.ingest.check_open()
        self.ingest.check_busy()
        self._tus()
        size = self._body_size()
        if size:  # early; receiving() checks again when the body is taken
            self.ingest.check_device_busy(device)
        if size and self._content_type() != OFFSET_CONTENT_TYPE:
            raise Refusal(415, f"a creation request's body (creation-with-upload) must be "
                               f"Content-Type: {OFFSET_CONTENT_TYPE}")
        length = header_int(self.headers.get("Upload-Length"), "Upload-Length")
        if size > length:
            raise Refusal(400, f"a {size}-byte body would pass Upload-Length {length}")
        upload = self.ingest.create(device, self.headers.get("Upload-Metadata"), length)
        headers = {"Location": f"{FILES}{upload.id}"}
        if size and upload.state == UPLOADING and upload.offset == 0:
            taken = self._take_body(device, upload, 0, size)
            if taken is None:
                return  # the connection broke: the device asks HEAD
            upload = taken
        elif size:  # the device did not know it had begun this one: resume from HEAD
            self._drain()
        headers["Upload-Offset"] = str(upload.offset)
        receipt = self._settle(upload) if upload.offset == upload.length else None
        if receipt is not None:
            headers["Upload-Receipt"] = receipt_header(receipt)
        self._reply(201, headers)

    def _head(self) -> None:
        kind, upload_id, rest = self._route()
        if kind != "upload" or rest:
            raise Refusal(404, f"HEAD {self.path[:80]}: not an upload")
        device = self._device()
        self._tus()
        upload = self._upload(device, upload_id or "")
        self._reply(200, {"Upload-Offset": str(upload.offset),
                          "Upload-Length": str(upload.length), "Cache-Control": "no-store"})

    def _get(self) -> None:
        kind, upload_id, rest = self._route()
        if kind != "upload" or not rest:
            raise Refusal(404, f"GET {self.path[:80]}: only /files/<id>/receipt can be read")
        device = self._device()
        upload = self._upload(device, upload_id or "", refused=422)
        stored = self.ingest.await_settled(upload.id, preferred_wait(self._prefer()))
        if stored is None or stored.receipt is None:
            raise Refusal(404, f"upload {upload.id} is being checked and stored; ask again "
                               f"(Prefer: wait=N waits for it)", retry=True, retry_after=1)
        self._reply(200, {"Cache-Control": "no-store"}, receipt_bytes(stored.receipt))

    def _patch(self) -> None:
        kind, upload_id, rest = self._route()
        if kind != "upload" or rest:
            raise Refusal(404, f"PATCH {self.path[:80]}: not an upload")
        device = self._device()
        self.ingest.check_open()
        self._tus()
        if self._content_type() != OFFSET_CONTENT_TYPE:
            raise Refusal(415, f"a PATCH body must be Content-Type: {OFFSET_CONTENT_TYPE}")
        offset = header_int(self.headers.get("Upload-Offset"), "Upload-Offset")
        size = self._body_size()
        upload = self._take_body(device, self._upload(device, upload_id or ""), offset, size)
        if upload is None:
            return  # the connection broke: the device asks HEAD
        if upload.offset < upload.length:
            self._reply(204, {"Upload-Offset": str(upload.offset)})
            return
        receipt = self._settle(upload)
        headers = {"Upload-Offset": str(upload.length)}
        if receipt is not None:
            headers["Upload-Receipt"] = receipt_header(receipt)
        elif "respond-async" in self._prefer():
            headers["Preference-Applied"] = "respond-async"
        self._reply(204, headers)

    def _take_body(self, device: str, upload: Upload, offset: int, size: int) -> Upload | None:
        """Receive a body of `size` bytes at `offset` under the upload's lock (an older
        connection still sending it is cut); the upload as it is then, or None if this
        connection broke (what arrived is kept)."""
        ingest = self.ingest
        lock = ingest.upload_lock(upload.id, self.connection)
        if lock is None:
            raise Refusal(423, f"upload {upload.id} is receiving on another connection",
                          retry=True, retry_after=1)
        try:
            upload = self._upload(device, upload.id)  # as it is now that we hold it
            if upload.state == STORED:
                if offset != upload.length or size:
                    raise Refusal(409, f"upload {upload.id} is complete and stored",
                                  offset=upload.length)
                return upload
            if offset != upload.offset:
                raise Refusal(409, f"Upload-Offset is {offset}, but upload {upload.id} has "
                                   f"{upload.offset} bytes: resume from there",
                              offset=upload.offset)
            if offset + size > upload.length:
                raise Refusal(400, f"{size} bytes at offset {offset} would pass Upload-Length "
                                   f"{upload.length}")
            if size:
                ingest.check_space(upload.length - offset)
                with ingest.receiving(device):
                    reached = self._receive(upload, size)
                ingest.done_receiving(upload.id)
                self.body_read = True
                if reached is None:
                    self.close_connection = True
                    return None
            return upload
        finally:
            ingest.release_upload(upload.id, lock)

    def _receive(self, upload: Upload, size: int) -> int | None:
        """`IngestServer.receive`; if it refuses (the disk failed) part of the body may be
        read, so its end cannot be found: the connection closes after the answer."""
        try:
            return self.ingest.receive(upload, self.rfile, size, self.pace.ended)
        except Refusal:
            self.close_connection = True
            raise

    def _settle(self, upload: Upload) -> dict[str, Any] | None:
        """Every byte is in: queue the completion; with `Prefer: respond-async` answer at
        once (the receipt is then fetched with GET .../receipt), else wait for the receipt
        (None if it takes longer than the server's timeout). Raises the completion's
        Refusal (422 refused, 503 store failed)."""
        if upload.state == STORED:
            return upload.receipt
        self.ingest.request_completion(upload.id)
        if "respond-async" in self._prefer():
            return None
        stored = self.ingest.await_settled(upload.id, self.ingest.limits.timeout_s)
        return stored.receipt if stored is not None else None

    def _content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip()

    def _put(self) -> None:
        ingest = self.ingest
        kind, name, _ = self._route()
        if kind != "raw" or not ingest.raw_put:
            raise Refusal(404, f"PUT {self.path[:80]}: not served here")
        device = self._device()
        ingest.check_open()
        if not RAW_NAME.match(name or ""):
            raise Refusal(400, "a raw name is 1-100 letters, digits, '.', '_' or '-'")
        size = header_int(self.headers.get("Content-Length"), "Content-Length", status=411)
        ingest.check_space(size)
        directory = ingest.workdir / "raw"
        directory.mkdir(exist_ok=True)
        target = directory / (name or "")
        tmp = target.with_name(target.name + ".part")
        query = self.path.partition("?")[2]
        hasher = hashlib.sha256() if "sha256" in query.split("&") else None  # as an upload
        with ingest.receiving(device), open(tmp, "wb") as f:
            buffer = bytearray(min(CHUNK, max(size, 1)))
            view = memoryview(buffer)
            left, since = size, 0
            while left:
                n = self.rfile.readinto(view[:min(left, len(buffer))])
                if not n:
                    self.close_connection = True
                    return
                f.write(view[:n])
                if hasher is not None:
                    hasher.update(view[:n])
                left -= n
                since += n
                if since >= CHECKPOINT:
                    f.flush()
                    os.fdatasync(f.fileno())
                    since = 0
            f.flush()
            os.fdatasync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(directory)  # stored under its name, durably, before the answer
        self._reply(201, {"Location": f"/raw/{name}"}, b"")


def _peer_name(connection: socket.socket) -> str:
    try:
        der = connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        return pki.common_name(x509.load_der_x509_certificate(der)) if der else "unknown"
    except (ValueError, AttributeError, OSError):
        return "unknown"
