"""An append-only, hash-chained audit log of what happened to evidence (JSON lines).

Each line is one event as canonical JSON (keys sorted, no spaces, ASCII) with at least:

    time    RFC 3339 UTC with milliseconds, taken under the log's lock (so it never goes back
            within one log, unless the wall clock is stepped)
    event   what happened: upload_created, upload_resumed, upload_interrupted, segment_stored,
            segment_refused, receipt_issued, access_refused, decrypted, exported, ...
    actor   who: a device id, an operator's name, or a `centre.<name>` identity
    prev    SHA-256 (hex) of the previous line's bytes without its newline; null on line 1

plus the event's own fields (`device_id`, `seq`, `sha256` of the ciphertext, `reason`, ...).
Each line is written with one write() and, unless the caller says `durable=False`, fsynced
before `append` returns (a line written without its own fsync is made durable by the next
fsynced one, as the file is append-only; a power cut can cut only the newest lines). Appends are
serialised by a thread lock and an flock on the file, so several threads and processes (the
ingest server and `sos-evidence`) can share one log.

`verify_log` finds a line that was edited (the next line's `prev` no longer matches), deleted,
inserted or moved (a `prev` names the wrong predecessor). It cannot see the newest lines cut
off the end, nor a log rewritten from scratch by someone who recomputes every hash: keep a
copy of the newest line's hash elsewhere (docs/UPLOAD.md, "Audit log").
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocol import utc_iso

EVENTS = ("upload_created", "upload_resumed", "upload_interrupted", "segment_stored",
          "segment_refused", "receipt_issued", "access_refused", "decrypted", "exported")
RESERVED = ("time", "event", "actor", "prev")
EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_TAIL_CHUNK = 64 * 1024


def line_hash(line: bytes) -> str:
    """What the next line's `prev` holds: SHA-256 of a line without its trailing newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        self._known: tuple[int, str | None] | None = None  # (file size, hash of its last line)

    def append(self, event: str, actor: str, *, durable: bool = True,
               **fields: Any) -> dict[str, Any]:
        """Write one event and return it as written (with `time` and `prev`); `durable=False`
        leaves the fsync to the next durable append (for steps nothing else depends on)."""
        if not EVENT_NAME.match(event):
            raise ValueError(f"audit event {event!r} is not a lower-case word ([a-z0-9_])")
        if not actor:
            raise ValueError("an audit event needs an actor (device id or operator name)")
        clash = sorted(set(fields) & set(RESERVED))
        if clash:
            raise ValueError(f"audit fields {clash} are reserved")
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                size, prev = self._tail()
                lead = b""
                if size and os.pread(self._fd, 1, size - 1) != b"\n":
                    lead = b"\n"  # a line torn by a crash stays (verify_log reports it)
                entry = {"time": _now(), "event": event, "actor": actor, "prev": prev, **fields}
                line = json.dumps(entry, sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=True, allow_nan=False).encode() + b"\n"
                os.write(self._fd, lead + line)
                if durable:
                    os.fsync(self._fd)
                self._known = (size + len(lead) + len(line), line_hash(line))
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return entry

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _tail(self) -> tuple[int, str | None]:
        """(file size, hash of the last line); re-read only if another writer appended."""
        size = os.fstat(self._fd).st_size
        if self._known is not None and self._known[0] == size:
            return self._known
        if size == 0:
            return 0, None
        end = size
        data = b""
        while True:  # read backwards until the start of the last line is in `data`
            start = max(0, end - _TAIL_CHUNK)
            data = os.pread(self._fd, end - start, start) + data
            end = start
            body = data[:-1] if data.endswith(b"\n") else data
            if b"\n" in body or start == 0:
                break
        body = data[:-1] if data.endswith(b"\n") else data
        last = body.rsplit(b"\n", 1)[-1]
        return size, line_hash(last)


def verify_log(path: str | Path) -> list[str]:
    """Every problem found in the log at `path`, one sentence each naming the line; [] if none."""
    problems: list[str] = []
    prev: str | None = None
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                problems.append(f"line {number}: incomplete (no newline): a write was cut "
                                f"short, or the line was edited")
            try:
                entry = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                problems.append(f"line {number}: not JSON")
                prev = line_hash(line)
                continue
            if not isinstance(entry, dict) or any(k not in entry for k in RESERVED):
                problems.append(f"line {number}: not an audit event (needs "
                                f"{', '.join(RESERVED)})")
            elif entry["prev"] != prev:
                if number == 1:
                    problems.append("line 1: it names a predecessor, so the lines before it "
                                    "were deleted")
                else:
                    problems.append(f"line {number}: prev does not match the SHA-256 of line "
                                    f"{number - 1}: line {number - 1} was edited, or lines "
                                    f"were deleted, inserted or moved here")
            prev = line_hash(line)
    return problems


def _now() -> str:
    return utc_iso(datetime.now(UTC))
