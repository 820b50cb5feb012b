"""A small tus 1.0.0 client (core, creation, creation-with-upload) over one HTTPS connection
with mutual TLS.

    client = TusClient("https://ingest.example:8443/files/", mutual_tls_context(ca, cert, key))
    created = client.create(size, {"device_id": b"tok-001", "seq": b"12", ...})     # POST
    with open(path, "rb") as f:                      # or: POST with the first chunk as body
        created = client.create(size, metadata, source=f, body_length=chunk)
    offset, length = client.head(created.location)                                  # HEAD
    with open(path, "rb") as f:
        f.seek(offset)
        result = client.patch(location, offset, f, min(chunk, size - offset))       # PATCH
    client.receipt(location, wait_s=20)  # GET {location}/receipt: the receipt, or None

`respond_async=True` on the request that sends the last byte asks the server (RFC 7240
`Prefer: respond-async`) to answer as soon as the bytes are in and to check and store the
segment afterwards; the receipt is then fetched with `receipt(location, wait_s)`, which asks the
server to hold the answer until the receipt exists (`Prefer: wait=N`).

Every failure is a typed exception (all `TusError`): `ConnectionLost` (the connection or TLS
broke; the next call reconnects), `RetryLater(after_s, reason)` (503/507/429/5xx or a JSON body
saying `"retry": true`), `SegmentRefused(reason)` (a 4xx the server will answer the same way
again, e.g. 422 for a corrupted segment), `Unauthorized` (401/403: this device's certificate is
not accepted; a SegmentRefused that is not the segment's fault), `OffsetMismatch` (409: ask HEAD
again), `UploadGone` (404/410: the server forgot the upload; create it again), `NotTus` (an
answer that is not tus), `SourceChanged` (the local file ended before the bytes announced).

Limits, stated plainly (like umqtt.simple's):
- HTTP/1.1, one persistent connection, one request at a time, blocking with a socket timeout
  (`timeout_s`, per socket operation, not per request). Not thread-safe.
- tus core, creation and creation-with-upload only: no checksum, termination, expiration or
  concatenation. No `Expect: 100-continue`: a server that refuses a body before reading it makes
  us lose the connection, which is then a `ConnectionLost`.
- No redirects, no proxies, no cookies, no compression. A `Location` on another host or scheme
  is a NotTus. Response bodies are read up to 64 KiB.
- Bodies are streamed from the caller's file in `blocksize` reads; nothing holds a whole chunk
  or segment in memory.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

from firmware.uplink.upload_plan import parse_retry_after
from protocol.untrusted import JsonLimits, loads_untrusted

TUS_VERSION = "1.0.0"
MAX_RESPONSE_BYTES = 64 * 1024
# The ingest's answers (errors, receipts) are small: anything bigger or deeper is not one.
REPLY_LIMITS = JsonLimits(max_bytes=MAX_RESPONSE_BYTES, max_depth=16)
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 507})


# -- errors ----------------------------------------------------------------------------------
class TusError(Exception):
    """Anything that stopped a tus request; `status` is the HTTP status when there was one."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class ConnectionLost(TusError):
    """The TCP or TLS connection failed or was cut; the next request opens a new one."""


class RetryLater(TusError):
    """The server is busy or short of space; come back after `after_s` (None: not said)."""

    def __init__(self, after_s: float | None, reason: str, status: int | None = None) -> None:
        super().__init__(reason, status)
        self.after_s = after_s


class SegmentRefused(TusError):
    """The server refuses this segment and would refuse it again (e.g. 422 corrupted)."""


class Unauthorized(SegmentRefused):
    """401/403: the server does not accept this device; no segment can go until that is fixed."""


class OffsetMismatch(TusError):
    """409: our offset is not the server's; HEAD for the right one."""


class UploadGone(TusError):
    """404/410 for an upload we created: the server no longer knows it; POST again."""


class NotTus(TusError):
    """An answer that does not follow tus (missing or bad header, unexpected status)."""


class SourceChanged(TusError):
    """The local file ended before the announced chunk was read (it shrank under us)."""


# -- helpers ---------------------------------------------------------------------------------
def mutual_tls_context(ca_file: str | None, cert_file: str | None,
                       key_file: str | None) -> ssl.SSLContext:
    """TLS 1.2+ that trusts only `ca_file` (the fleet CA), checks the host name, and shows the
    device's certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def encode_metadata(metadata: Mapping[str, bytes | str]) -> str:
    """`Upload-Metadata`: `key base64(value)` pairs joined by commas, in the given order."""
    parts = []
    for key, value in metadata.items():
        if not key or any(c in key for c in " ,") or not key.isascii():
            raise ValueError(f"bad tus metadata key {key!r}")
        raw = value.encode() if isinstance(value, str) else value
        parts.append(f"{key} {base64.b64encode(raw).decode()}")
    return ",".join(parts)


def error_from_response(status: int, headers: Mapping[str, str], body: bytes, *,
                        now: datetime | None = None) -> TusError:
    """The exception for an unsuccessful answer: pure, so each status is tested exactly.

    A JSON body `{"error": ..., "retry": bool}` gives the reason and, when `retry` is present,
    decides between RetryLater and SegmentRefused; otherwise the status does.
    """
    reason, retry = f"HTTP {status}", None
    try:
        data = loads_untrusted(body, REPLY_LIMITS) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        if isinstance(data.get("error"), str) and data["error"]:
            reason = data["error"]
        if isinstance(data.get("retry"), bool):
            retry = data["retry"]
    elif body:
        text = body[:200].decode("utf-8", "replace").strip()
        if text:
            reason = f"HTTP {status}: {text}"
    if status in (401, 403):
        return Unauthorized(reason, status)
    if status == 409:
        return OffsetMismatch(reason, status)
    if status in (404, 410):
        return UploadGone(reason, status)
    if status < 400:
        return NotTus(f"unexpected answer {reason}", status)
    if retry is None:
        retry = status in RETRY_STATUSES or status >= 500
    if retry:
        return RetryLater(parse_retry_after(headers.get("Retry-After"), now), reason, status)
    return SegmentRefused(reason, status)


def decode_receipt(value: str) -> dict[str, Any]:
    """The JSON object in an `Upload-Receipt` header (standard base64)."""
    try:
        data = loads_untrusted(base64.b64decode(value.strip(), validate=True), REPLY_LIMITS)
    except (binascii.Error, ValueError) as exc:
        raise NotTus(f"Upload-Receipt is not base64 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise NotTus("Upload-Receipt is not a JSON object")
    return data


def _says_retry(body: bytes) -> bool:
    try:
        data = loads_untrusted(body, REPLY_LIMITS)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("retry") is True


_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII digits only: str.isdigit() accepts "²"


def _offset_header(headers: Mapping[str, str], name: str, *, required: bool = True) -> int | None:
    value = headers.get(name)
    if value is None:
        if required:
            raise NotTus(f"answer without {name}")
        return None
    if not _DIGITS.fullmatch(value.strip()):
        raise NotTus(f"{name} is not a non-negative integer: {value[:40]!r}")
    return int(value)


class _Window:
    """`length` bytes of `source` from its current position, read in the caller's sizes;
    `on_read(bytes read so far)` is called before each piece is handed to the connection."""

    def __init__(self, source: BinaryIO, length: int,
                 on_read: Callable[[int], None] | None = None) -> None:
        self._source = source
        self.remaining = length
        self.read_bytes = 0
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        take = self.remaining if size < 0 else min(size, self.remaining)
        data = self._source.read(take)
        if not data:
            raise _ShortRead(self.remaining)
        self.remaining -= len(data)
        self.read_bytes += len(data)
        if self._on_read is not None:
            self._on_read(self.read_bytes)
        return data


class _ShortRead(Exception):
    pass


@dataclass(frozen=True)
class PatchResult:
    offset: int  # the server's offset after this PATCH
    receipt: dict[str, Any] | None  # set on the final PATCH of a segment the server stored


@dataclass(frozen=True)
class Created:
    location: str  # the upload's path on this server
    offset: int | None  # bytes the server holds (None: it did not say; assume 0)
    receipt: dict[str, Any] | None  # the segment was stored already (or with this request)


@dataclass(frozen=True)
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes


# -- the client ------------------------------------------------------------------------------
class TusClient:
    """tus client for one server (`files_url`, e.g. "https://host:8443/files/")."""

    def __init__(self, files_url: str, context: ssl.SSLContext, *, timeout_s: float = 30.0,
                 blocksize: int = 64 * 1024,
                 utc_now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        parts = urlsplit(files_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"need an https:// URL, not {files_url!r}")
        self.files_url = files_url if files_url.endswith("/") else files_url + "/"
        self._host = parts.hostname
        self._port = parts.port or 443
        self._context = context
        self._timeout_s = timeout_s
        self._blocksize = blocksize
        self._utc_now = utc_now
        self._conn: http.client.HTTPSConnection | None = None
        self.body_bytes_sent = 0  # body bytes handed to the connection, for accounting

    # -- tus requests --------------------------------------------------------------------------
    def create(self, length: int, metadata: Mapping[str, bytes | str], *,
               source: BinaryIO | None = None, body_length: int = 0,
               respond_async: bool = False,
               on_sent: Callable[[int], None] | None = None) -> Created:
        """POST a new upload of `length` bytes; with `source`, its first `body_length` bytes
        go in the same request (creation-with-upload, `source` positioned at 0)."""
        headers = {"Upload-Length": str(length), "Upload-Metadata": encode_metadata(metadata),
                   "Content-Length": str(body_length if source is not None else 0)}
        window = None
        if respond_async:  # also without a body: a POST may find a complete upload
            headers["Prefer"] = "respond-async"
        if source is not None and body_length:
            headers["Content-Type"] = "application/offset+octet-stream"
            window = _Window(source, body_length, on_sent)
        response = self._send("POST", urlsplit(self.files_url).path, headers, window)
        if response.status != 201:
            raise self._error(response)
        location = response.headers.get("Location")
        if not location:
            raise NotTus("201 Created without a Location", 201)
        offset = _offset_header(response.headers, "Upload-Offset", required=False)
        if offset is not None and offset > length:
            raise NotTus(f"Upload-Offset {offset} beyond Upload-Length {length}")
        receipt = response.headers.get("Upload-Receipt")
        return Created(self._path_of(location), offset,
                       decode_receipt(receipt) if receipt else None)

    def head(self, location: str) -> tuple[int, int | None]:
        """(Upload-Offset, Upload-Length) of an upload the server knows."""
        response = self._request("HEAD", location, {})
        if response.status not in (200, 204):
            raise self._error(response)
        offset = _offset_header(response.headers, "Upload-Offset")
        assert offset is not None
        return offset, _offset_header(response.headers, "Upload-Length", required=False)

    def patch(self, location: str, offset: int, source: BinaryIO, length: int, *,
              respond_async: bool = False,
              on_sent: Callable[[int], None] | None = None) -> PatchResult:
        """Send `length` bytes read from `source` (positioned at `offset`) as one PATCH;
        `on_sent(n)` hears how much of it was handed to the connection so far."""
        headers = {"Content-Type": "application/offset+octet-stream",
                   "Upload-Offset": str(offset), "Content-Length": str(length)}
        if respond_async:
            headers["Prefer"] = "respond-async"
        response = self._send("PATCH", location, headers, _Window(source, length, on_sent))
        if response.status not in (200, 204):
            raise self._error(response)
        new_offset = _offset_header(response.headers, "Upload-Offset")
        assert new_offset is not None
        if not offset <= new_offset <= offset + length:
            raise NotTus(f"Upload-Offset {new_offset} after a PATCH of {length} bytes "
                                f"at {offset}")
        receipt = response.headers.get("Upload-Receipt")
        return PatchResult(new_offset, decode_receipt(receipt) if receipt else None)

    def receipt(self, location: str, wait_s: float = 0.0) -> dict[str, Any] | None:
        """GET {location}/receipt: the centre's receipt once the segment is stored, asking the
        server to wait up to `wait_s` for it; None while it is still being stored (404 with
        `retry: true`). A segment the centre refused raises SegmentRefused; one it holds only part
        of, OffsetMismatch; an upload it does not know (404 otherwise, 410), UploadGone."""
        headers = {"Prefer": f"wait={int(wait_s)}"} if wait_s >= 1 else {}
        response = self._request("GET", location.rstrip("/") + "/receipt", headers)
        if response.status == 404 and _says_retry(response.body):
            return None
        if response.status != 200:
            raise self._error(response)
        try:
            data = loads_untrusted(response.body, REPLY_LIMITS)
        except ValueError:
            raise NotTus("receipt is not JSON", 200) from None
        if not isinstance(data, dict):
            raise NotTus("receipt is not a JSON object", 200)
        return data

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> TusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------
    def _error(self, response: _Response) -> TusError:
        return error_from_response(response.status, response.headers, response.body,
                                   now=self._utc_now())

    def _path_of(self, location: str) -> str:
        absolute = urlsplit(urljoin(self.files_url, location))
        base = urlsplit(self.files_url)
        if (absolute.scheme, absolute.hostname, absolute.port or 443) != \
                (base.scheme, base.hostname, base.port or 443):
            raise NotTus(f"Location {location!r} is on another server")
        return absolute.path + (f"?{absolute.query}" if absolute.query else "")

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout_s, context=self._context,
                blocksize=self._blocksize)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send(self, method: str, path: str, headers: dict[str, str],
              window: _Window | None) -> _Response:
        """A request whose body is streamed from `window`; counts the bytes it sent."""
        try:
            return self._request(method, path, headers, body=window)
        except _ShortRead as exc:
            self._drop()
            raise SourceChanged(f"local file ended {exc.args[0]} bytes early") from None
        finally:
            if window is not None:
                self.body_bytes_sent += window.read_bytes

    def _request(self, method: str, path: str, headers: dict[str, str],
                 body: _Window | None = None) -> _Response:
        """One request and its answer. A HEAD, GET or POST that fails on a kept-alive
        connection (the server may have closed it while idle) is tried once more on a new one."""
        for attempt in (0, 1):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                conn.request(method, path, body=body,
                             headers={"Tus-Resumable": TUS_VERSION, **headers})
                raw = conn.getresponse()
                data = raw.read(MAX_RESPONSE_BYTES + 1)
                response = _Response(raw.status, {k.title(): v for k, v in raw.getheaders()},
                                     data[:MAX_RESPONSE_BYTES])
                if raw.will_close or not raw.isclosed():
                    self._drop()
                return response
            except _ShortRead:
                raise
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if attempt == 0 and reused and body is None:
                    continue
                raise ConnectionLost(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        raise AssertionError("unreachable")
