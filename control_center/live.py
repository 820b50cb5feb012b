"""The control centre's side of the live view: check, decrypt and write live chunks as HLS.

Each chunk arrives as an MQTT 5 publish on `sos/v1/dev/{id}/live` (docs/LIVE.md): the payload is
an age file, the signed header is canonical JSON in the user property `sos-live-header`.
`LiveReceiver.handle` checks the header's shape, that it names the topic's device, its Ed25519
signature against that device's registered key, the ciphertext's length and SHA-256 against the
signed values, and that the chunk is the next one of its alert's stream; then decrypts it with the
centre's live identity. A refused chunk costs one log line and changes nothing on disk.

Layout, stable for the HTTPS server that serves it to operator consoles:

    <out_dir>/<alert_id>/index.m3u8      HLS playlist (EVENT): every chunk received so far
    <out_dir>/<alert_id>/chunk-000000.ts one MPEG-TS file per chunk, named by the device's seq
    <out_dir>/<alert_id>/live.ts         every chunk received, concatenated: plays as one file
    <out_dir>/<alert_id>/stream.json     the receiver's own state (device, chunks, end)

Files are replaced atomically (write, then rename), and a chunk file is in place before the
playlist names it. A chunk lost in transit leaves a gap: the next chunk is preceded by a comment
naming the lost ones and `#EXT-X-DISCONTINUITY`. `#EXT-X-ENDLIST` marks the end of the stream
(the device's final chunk, or `end()` by the centre).

Latency, per accepted chunk (docs/LIVE.md): the moment the chunk's files are written (the
centre's clock) minus the capture time of its newest frame (`last_frame_utc`) and of its first
frame (`first_frame_utc`), both as the device's clock says. Glass-to-glass for the newest frame
is the shortest delay with which the operator can see anything of the chunk; for the first
frame it adds the chunk's duration.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from evidence_format.age_stream import AgeFormatError, decrypt, parse_identities
from protocol.signing import SignatureError, verify
from protocol.topics import LIVE_HEADER_PROPERTY

log = logging.getLogger("sos.center.live")

LIVE_VERSION = 1
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024  # a 1 s chunk at 1 Mbit/s is 125 kB
MAX_HEADER_CHARS = 8192
ALERT_ID = re.compile(r"^[0-9a-f]{32}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
TS_PACKET = 188
LATENCY_SAMPLES = 100_000  # per receiver, newest kept


@dataclass(frozen=True)
class LiveChunkResult:
    """What became of one chunk. Latencies in milliseconds (None when refused or empty)."""

    accepted: bool
    device_id: str
    alert_id: str | None
    seq: int | None
    reason: str | None = None  # why it was refused
    frames: int = 0
    final: bool = False
    lost_before: int = 0  # chunks of this stream that never arrived before this one
    latency_newest_ms: float | None = None
    latency_first_ms: float | None = None
    path: str | None = None  # the chunk file written

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Entry:
    seq: int
    duration_s: float
    first_frame_utc: str
    lost_before: int


@dataclass
class _Stream:
    device_id: str
    alert_id: str
    entries: list[_Entry] = field(default_factory=list)
    last_seq: int = -1
    ended: bool = False
    end_reason: str | None = None
    last_chunk_at: float = 0.0  # receiver clock
    lost: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "alert_id": self.alert_id,
                "entries": [asdict(e) for e in self.entries], "last_seq": self.last_seq,
                "ended": self.ended, "end_reason": self.end_reason, "lost": self.lost}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Stream:
        return cls(device_id=data["device_id"], alert_id=data["alert_id"],
                   entries=[_Entry(**e) for e in data["entries"]], last_seq=data["last_seq"],
                   ended=data["ended"], end_reason=data.get("end_reason"),
                   lost=data.get("lost", 0))


class _ChunkRefused(Exception):
    pass


def header_from_properties(properties: Any) -> dict[str, Any] | None:
    """The live header from a received message's MQTT 5 properties; None if absent, too long or
    not a JSON object (the receiver then refuses the chunk)."""
    pairs = getattr(properties, "UserProperty", None) or []
    for name, value in pairs:
        if name != LIVE_HEADER_PROPERTY:
            continue
        if not isinstance(value, str) or len(value) > MAX_HEADER_CHARS:
            return None
        try:
            header = json.loads(value)
        except ValueError:
            return None
        return header if isinstance(header, dict) else None
    return None


def percentile(samples: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (a value that was measured); None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _replace_for_readers(path: Path, data: bytes) -> None:
    """A player never reads a half-written chunk or playlist. Not fsynced, unlike
    `evidence_format.files.atomic_write`, on purpose: the live view is a viewing copy (the
    evidence is the device's recorded segments, uploaded later) and an fsync per chunk would
    add its latency to every frame the operator sees."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class LiveReceiver:
    """`keys_for(device_id)` gives the keys a device's headers must be signed with (as
    `control_center.service.FleetTrust`); `identity_file` is the fleet's `live-identity.txt`;
    `clock` is the centre's wall clock in epoch seconds (latency is measured against it)."""

    def __init__(self, identity_file: str | Path, out_dir: str | Path,
                 keys_for: Callable[[str], list[Ed25519PublicKey]], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._identities = parse_identities(Path(identity_file).read_text())
        if not self._identities:
            raise ValueError(f"{identity_file}: no AGE-SECRET-KEY-1 identity")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._keys_for = keys_for
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}  # open streams; ended ones live on disk only
        self.chunks = 0
        self.refused = 0
        self.lost = 0
        self.latency_newest_s: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.latency_first_s: deque[float] = deque(maxlen=LATENCY_SAMPLES)

    def stream_dir(self, alert_id: str) -> Path:
        if not ALERT_ID.match(alert_id):
            raise ValueError(f"not an alert id: {alert_id!r}")
        return self.out_dir / alert_id

    # -- one chunk -------------------------------------------------------------------------------
    def handle(self, device_id: str, payload: bytes, header: dict[str, Any] | None
               ) -> LiveChunkResult:
        """Check, decrypt and write one chunk; never raises for a bad chunk (it is refused)."""
        alert_id = seq = None
        if isinstance(header, dict):
            alert_id = header.get("alert_id") if isinstance(header.get("alert_id"), str) else None
            seq = header.get("seq") if type(header.get("seq")) is int else None
        with self._lock:
            try:
                return self._accept(device_id, payload, header)
            except _ChunkRefused as exc:
                self.refused += 1
                log.error("refused live chunk from %s (alert %s, seq %s): %s", device_id,
                          (alert_id or "?")[:8], seq, exc)
                return LiveChunkResult(False, device_id, alert_id, seq, reason=str(exc))

    def _accept(self, device_id: str, payload: bytes, header: Any) -> LiveChunkResult:
        h = _check_header(header)
        if h["device_id"] != device_id:
            raise _ChunkRefused(f"it claims to come from {h['device_id']}")
        try:
            verify(h, self._keys_for(device_id))
        except SignatureError as exc:
            raise _ChunkRefused(f"{exc} (is the device enrolled with its signing key?)") from None
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise _ChunkRefused(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD_BYTES}")
        if (len(payload) != h["ciphertext_bytes"]
                or hashlib.sha256(payload).hexdigest() != h["ciphertext_sha256"]):
            raise _ChunkRefused("the ciphertext is not the one the header signs "
                                "(altered in transit?)")
        alert_id, seq = h["alert_id"], h["seq"]
        stream = self._stream(alert_id, device_id)
        if stream.device_id != device_id:
            raise _ChunkRefused(f"alert {alert_id[:8]} streams from {stream.device_id}")
        if stream.ended:
            raise _ChunkRefused(f"the stream of alert {alert_id[:8]} has ended "
                                f"({stream.end_reason})")
        if seq <= stream.last_seq:
            raise _ChunkRefused(f"chunk {seq} is a duplicate or late "
                                f"(have up to {stream.last_seq})")
        try:
            plaintext = b"".join(decrypt(BytesIO(payload), self._identities))
        except AgeFormatError as exc:
            raise _ChunkRefused(f"cannot decrypt with the live identity: {exc}") from None
        if h["frames"] > 0 and (not plaintext or plaintext[0] != 0x47
                                or len(plaintext) % TS_PACKET):
            raise _ChunkRefused("the decrypted chunk is not MPEG-TS")

        lost = seq - stream.last_seq - 1
        directory = self.stream_dir(alert_id)
        directory.mkdir(exist_ok=True)
        path = None
        if h["frames"] > 0:
            path = directory / f"chunk-{seq:06d}.ts"
            _replace_for_readers(path, plaintext)
            with (directory / "live.ts").open("ab") as f:
                f.write(plaintext)
            stream.entries.append(_Entry(seq, float(h["duration_s"]), h["first_frame_utc"],
                                         lost))
        if lost:
            log.warning("live stream of alert %s from %s: %d chunk(s) lost before chunk %d",
                        alert_id[:8], device_id, lost, seq)
        stream.last_seq = seq
        stream.lost += lost
        stream.last_chunk_at = self._clock()
        self.lost += lost
        if h["final"]:
            stream.ended, stream.end_reason = True, "final chunk from the device"
        self._save(stream)
        written = self._clock()
        self.chunks += 1
        newest = first = None
        if h["frames"] > 0:
            newest = written - _epoch(h["last_frame_utc"])
            first = written - _epoch(h["first_frame_utc"])
            self.latency_newest_s.append(newest)
            self.latency_first_s.append(first)
        if seq == 0 or (len(stream.entries) == 1 and h["frames"] > 0):
            log.info("live stream of alert %s from %s: first chunk at %s", alert_id[:8],
                     device_id, directory / "index.m3u8")
        if stream.ended:
            log.info("live stream of alert %s from %s ended: %d chunk(s), %d lost",
                     alert_id[:8], device_id, len(stream.entries), stream.lost)
            self._streams.pop(alert_id, None)
        return LiveChunkResult(
            True, device_id, alert_id, seq, frames=h["frames"], final=h["final"],
            lost_before=lost,
            latency_newest_ms=None if newest is None else round(newest * 1000, 3),
            latency_first_ms=None if first is None else round(first * 1000, 3),
            path=None if path is None else str(path))

    # -- streams ---------------------------------------------------------------------------------
    def _stream(self, alert_id: str, device_id: str) -> _Stream:
        stream = self._streams.get(alert_id)
        if stream is None:
            state = self.stream_dir(alert_id) / "stream.json"
            if state.exists():  # a restart, or a stream that has ended
                stream = _Stream.from_json(json.loads(state.read_text()))
            else:
                stream = _Stream(device_id, alert_id)
            if not stream.ended:
                self._streams[alert_id] = stream
        return stream

    def end(self, alert_id: str, reason: str = "ended by the centre") -> bool:
        """Mark a stream as ended (`#EXT-X-ENDLIST`), e.g. when its alert is closed or the
        device's final chunk was lost; later chunks are refused. False if there is none open."""
        with self._lock:
            stream = self._streams.pop(alert_id, None)
            if stream is None or stream.ended:
                return False
            stream.ended, stream.end_reason = True, reason
            self._save(stream)
        log.info("live stream of alert %s ended: %s", alert_id[:8], reason)
        return True

    def end_idle(self, idle_s: float) -> list[str]:
        """End every open stream without a chunk for `idle_s` seconds; returns their alert ids
        (call it now and then: a device that lost power sends no final chunk)."""
        now = self._clock()
        with self._lock:
            idle = [a for a, s in self._streams.items() if now - s.last_chunk_at >= idle_s]
        return [a for a in idle if self.end(a, f"no chunk for {idle_s:g} s")]

    def _save(self, stream: _Stream) -> None:
        directory = self.stream_dir(stream.alert_id)
        directory.mkdir(exist_ok=True)
        _replace_for_readers(directory / "index.m3u8", render_playlist(stream).encode())
        _replace_for_readers(directory / "stream.json",
                      (json.dumps(stream.to_json(), indent=1) + "\n").encode())

    # -- numbers ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters and glass-to-glass latency percentiles (ms) over the accepted chunks."""
        with self._lock:
            newest = [s * 1000 for s in self.latency_newest_s]
            first = [s * 1000 for s in self.latency_first_s]
            return {
                "chunks": self.chunks,
                "refused": self.refused,
                "lost": self.lost,
                "open_streams": len(self._streams),
                "latency_newest_ms": {"p50": percentile(newest, 50),
                                      "p95": percentile(newest, 95), "n": len(newest)},
                "latency_first_ms": {"p50": percentile(first, 50),
                                     "p95": percentile(first, 95), "n": len(first)},
            }


def render_playlist(stream: _Stream) -> str:
    """The HLS playlist (RFC 8216, version 3, EVENT) of one stream."""
    longest = max((e.duration_s for e in stream.entries), default=1.0)
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:3",
        "#EXT-X-PLAYLIST-TYPE:EVENT",
        f"#EXT-X-TARGETDURATION:{max(1, math.ceil(longest))}",
        f"#EXT-X-MEDIA-SEQUENCE:{stream.entries[0].seq if stream.entries else 0}",
        f"# sos live view: device {stream.device_id}, alert {stream.alert_id}",
    ]
    for i, entry in enumerate(stream.entries):
        if entry.lost_before:
            lines.append(f"# gap: {entry.lost_before} chunk(s) lost before chunk {entry.seq}")
            if i > 0:
                lines.append("#EXT-X-DISCONTINUITY")
        lines += [f"#EXT-X-PROGRAM-DATE-TIME:{entry.first_frame_utc}",
                  f"#EXTINF:{entry.duration_s:.6f},",
                  f"chunk-{entry.seq:06d}.ts"]
    if stream.ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def _check_header(header: Any) -> dict[str, Any]:
    """The header if it has the shape docs/LIVE.md gives; _ChunkRefused naming the problem if
    not."""
    if not isinstance(header, dict):
        raise _ChunkRefused("no header (user property sos-live-header missing or not JSON)")

    def need(key: str, ok: Callable[[Any], bool], what: str) -> None:
        if key not in header or not ok(header[key]):
            raise _ChunkRefused(f"header field {key!r} missing or not {what}")

    def is_int(v: Any) -> bool:
        return type(v) is int and v >= 0

    def is_number(v: Any) -> bool:
        return type(v) in (int, float) and math.isfinite(v) and v >= 0

    def is_time(v: Any) -> bool:
        if not isinstance(v, str) or not v.endswith("Z"):
            return False
        try:
            datetime.fromisoformat(v.replace("Z", "+00:00")).astimezone(UTC)
        except ValueError:
            return False
        return True

    need("v", lambda v: v == LIVE_VERSION and type(v) is int, f"{LIVE_VERSION}")
    need("device_id", lambda v: isinstance(v, str), "a string")
    need("alert_id", lambda v: isinstance(v, str) and bool(ALERT_ID.match(v)),
         "32 lower-case hex digits")
    need("seq", is_int, "an integer >= 0")
    need("final", lambda v: isinstance(v, bool), "true or false")
    need("frames", is_int, "an integer >= 0")
    need("duration_s", is_number, "a number >= 0")
    need("ciphertext_sha256", lambda v: isinstance(v, str) and bool(SHA256.match(v)),
         "64 lower-case hex digits")
    need("ciphertext_bytes", is_int, "an integer >= 0")
    if header["frames"] > 0:
        need("first_frame_utc", is_time, "a UTC time")
        need("last_frame_utc", is_time, "a UTC time")
    elif not header["final"]:
        raise _ChunkRefused("an empty chunk that is not the final one")
    return header
