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

The chain alone shows a line that was edited, deleted, inserted or moved, but not the newest
lines cut off the end, nor one forged and appended with a correct `prev`. So the head is also
anchored outside the file (docs/UPLOAD.md, "The audit log"):

- every receipt the ingest signs carries `audit_head`, the hash of the `receipt_issued` line
  that records that receipt (written and fsynced before the receipt is signed);
- `AuditHeads` appends a statement signed with the centre's command key to `FILE.heads`
  (`{"type": "audit_head", "bytes", "lines", "head", "time", "stored", "sig"}`) every
  `interval_s` seconds from `start()` (whoever appended) or every `every_lines` appends of
  its own, if the log grew, and when it is closed; the log is fsynced before its head is
  signed, so a signed head never names bytes a power cut can take.

Reading never holds more than one line's limit in memory: a line over it (a hostile file with
gigabytes and no newline) is a finding, hashed as it streams past.

`check_audit` (and `sos-center audit verify`) checks the links, the signed heads and any
receipts; lines after the newest anchor are reported as unanchored (a NOTE): nothing outside
the file vouches for them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol import utc_iso
from protocol.signing import SignatureError, Signer, public_key_from_b64, verify
from protocol.untrusted import MANIFEST_LIMITS, MESSAGE_LIMITS, JsonLimits, loads_untrusted

log = logging.getLogger("control_center.audit")

EVENTS = ("upload_created", "upload_resumed", "upload_interrupted", "segment_stored",
          "segment_refused", "receipt_issued", "access_refused", "decrypted", "exported")
RESERVED = ("time", "event", "actor", "prev")
EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
HEADS_SUFFIX = ".heads"
HEAD_TYPE = "audit_head"
HEAD_VERSION = 1
HEAD_INTERVAL_S = 60.0
HEAD_EVERY_LINES = 100
LINE_LIMITS = MANIFEST_LIMITS  # an `exported` line lists a call's segments: room for many
HEAD_LIMITS = JsonLimits(max_bytes=1024 * 1024, max_depth=4)
ERROR = "error"
NOTE = "note"
_TAIL_CHUNK = 64 * 1024
_HASH_CHUNK = 1024 * 1024
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFLNK: "a symbolic link",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


def line_hash(line: bytes) -> str:
    """What the next line's `prev` holds: SHA-256 of a line without its trailing newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def encode(entry: dict[str, Any]) -> bytes:
    """An entry as its line is written (canonical JSON, no newline)."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    """The hash of the line `AuditLog.append` wrote for `entry` (what it returned)."""
    return line_hash(encode(entry))


# -- reading files that may be hostile ----------------------------------------------------------
class NotARegularFile(OSError):
    """A path that is a FIFO, directory, symlink, device or socket: never opened for reading."""


def open_regular(path: str | Path) -> IO[bytes]:
    """`path` opened for reading only if it is a regular file: not followed if a symlink, not
    blocked on if a FIFO (O_NONBLOCK), checked with fstat after opening (no race with a
    rename). Raises NotARegularFile (saying what it is instead) or OSError."""
    kind = _kind(os.lstat(path).st_mode)
    if kind is not None:
        raise NotARegularFile(f"{Path(path).name} is {kind}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise NotARegularFile(f"{Path(path).name} is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, limit: int) -> bytes:
    """A regular file's bytes (see `open_regular`); OSError if it is over `limit` bytes."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{Path(path).name} is over {limit} bytes")
    return data


def _kind(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


# -- writing -------------------------------------------------------------------------------------
class AuditLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        self._known: tuple[int, str | None] | None = None  # (file size, hash of its last line)
        self._watchers: list[Callable[[dict[str, Any]], None]] = []

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
        with self._locked():
            size, prev = self._tail()
            lead = b""
            if size and os.pread(self._fd, 1, size - 1) != b"\n":
                lead = b"\n"  # a line torn by a crash stays (verify_log reports it)
            entry = {"time": _now(), "event": event, "actor": actor, "prev": prev, **fields}
            line = encode(entry) + b"\n"
            os.write(self._fd, lead + line)
            if durable:
                os.fsync(self._fd)
            self._known = (size + len(lead) + len(line), line_hash(line))
        for watcher in list(self._watchers):
            try:
                watcher(entry)
            except Exception:  # the line is written: a watcher's failure must not undo that
                log.exception("audit: a watcher of %s failed", self.path)
        return entry

    def watch(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call `callback(entry)` after each append by this object (not other processes')."""
        self._watchers.append(callback)

    def tail(self) -> tuple[int, str | None]:
        """(file size, hash of its last line), read under the file lock: a consistent head."""
        with self._locked():
            return self._tail()

    def durable_tail(self) -> tuple[int, str | None]:
        """As `tail()`, with the file fsynced first under the same locks: every byte of the
        head returned is on disk. Lines appended with `durable=False` are in the page cache
        only; a head signed over them without this could name bytes a power cut takes, and
        the log would then look cut."""
        with self._locked():
            os.fsync(self._fd)
            return self._tail()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The thread lock and the file's flock (other processes append too)."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _tail(self) -> tuple[int, str | None]:
        """(file size, hash of the last line); re-read only if another writer appended. The
        last line is found and hashed in pieces, however long it is."""
        size = os.fstat(self._fd).st_size
        if self._known is not None and self._known[0] == size:
            return self._known
        if size == 0:
            return 0, None
        end = size - 1 if os.pread(self._fd, 1, size - 1) == b"\n" else size
        start = _line_start(self._fd, end)
        return size, _hash_range(self._fd, start, end)


def _line_start(fd: int, end: int) -> int:
    """The offset just after the last newline before byte `end` (0 if there is none)."""
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _hash_range(fd: int, start: int, end: int) -> str:
    """SHA-256 (hex) of bytes [start, end) of the file, read in pieces."""
    digest = hashlib.sha256()
    while start < end:
        piece = os.pread(fd, min(_HASH_CHUNK, end - start), start)
        if not piece:
            break
        digest.update(piece)
        start += len(piece)
    return digest.hexdigest()


# -- signed heads --------------------------------------------------------------------------------
def heads_path_for(log_path: str | Path) -> Path:
    return Path(str(log_path) + HEADS_SUFFIX)


class AuditHeads:
    """Signs the log's head with the centre key into `LOG.heads`, every `interval_s` seconds
    or `every_lines` appends by `log` (whichever comes first), if the log has grown, and once
    more on `close()`. Each statement also lists, per device, the highest `seq` of the
    `segment_stored` lines since the previous statement (`stored`), so a verifier knows how
    far each device's evidence went even if the log's tail is cut later.

    The timer thread starts with `start()` (the ingest server's start: lines other writers
    append while the server is idle are signed within `interval_s` too) or the first append
    it sees, and stops on `close()` (a later `start()` or append starts it again). A signing
    that fails (the heads file cannot be written) is logged once per run of failures and
    tried again after `interval_s`, not sooner."""

    def __init__(self, audit: AuditLog, signer: Signer, *, path: str | Path | None = None,
                 interval_s: float = HEAD_INTERVAL_S,
                 every_lines: int = HEAD_EVERY_LINES) -> None:
        self.audit = audit
        self.signer = signer
        self.path = Path(path) if path is not None else heads_path_for(audit.path)
        self.interval_s = interval_s
        self.every_lines = max(1, every_lines)
        self._lock = threading.Lock()  # one signing at a time
        self._state = threading.Condition()
        self._appended = 0  # appends seen since the last statement
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failing = False  # the last signing failed (logged once per run of failures)
        self._signed = self._last_signed()  # (bytes, lines) covered by the newest statement
        audit.watch(self._seen)

    def start(self) -> None:
        """Start the timer, if it is not running."""
        with self._state:
            self._start_timer()

    def sign_now(self) -> dict[str, Any] | None:
        """Sign the current head if the log grew since the last statement; the statement.
        The appends counted toward `every_lines` start again from 0, even if it fails."""
        try:
            with self._lock:
                return self._sign()
        finally:
            with self._state:
                self._appended = 0

    def _sign(self) -> dict[str, Any] | None:
        size, head = self.audit.durable_tail()
        start, lines = self._signed
        if head is None or size == start:
            return None
        if size < start:
            log.error("audit: %s is shorter (%d bytes) than its last signed head (%d); "
                      "signing from its start again", self.audit.path, size, start)
            start, lines = 0, 0
        added, stored = _scan_span(self.audit.path, start, size)
        statement = self.signer.sign({
            "v": HEAD_VERSION, "type": HEAD_TYPE, "log": self.audit.path.name,
            "bytes": size, "lines": lines + added, "head": head, "time": _now(),
            "stored": stored})
        _append_line(self.path, encode(statement) + b"\n")
        self._signed = (size, lines + added)
        return statement

    def close(self) -> None:
        """Stop the timer and sign the final head."""
        with self._state:
            self._stopping = True
            self._state.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self._sign_logged()

    def _start_timer(self) -> None:
        """Under self._state."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, daemon=True, name="audit-heads")
            self._thread.start()

    def _seen(self, entry: dict[str, Any]) -> None:
        with self._state:
            self._appended += 1
            self._start_timer()
            if self._appended >= self.every_lines:
                self._state.notify_all()

    def _due(self) -> bool:
        """Under self._state: sign before the interval is over? Not after a failure."""
        return not self._failing and self._appended >= self.every_lines

    def _run(self) -> None:
        while True:
            with self._state:
                self._state.wait_for(lambda: self._stopping or self._due(), self.interval_s)
                if self._stopping:
                    return
            self._sign_logged()

    def _sign_logged(self) -> None:
        """sign_now, its failure logged once per run of failures (the next interval tries
        again; the log itself is unaffected)."""
        try:
            self.sign_now()
        except Exception:  # the timer thread must not die of it
            if not self._failing:
                log.exception("audit: cannot sign the head of %s into %s; trying again every "
                              "%g s", self.audit.path, self.path, self.interval_s)
            self._failing = True
            return
        if self._failing:
            log.warning("audit: signing the head of %s into %s again", self.audit.path,
                        self.path)
            self._failing = False

    def _last_signed(self) -> tuple[int, int]:
        """(bytes, lines) of the newest statement in our heads file that still matches the
        log, else (0, 0): the first statement then covers the whole log."""
        try:
            statements = [s for _, s, _ in read_heads(self.path)
                          if isinstance(s, dict) and s.get("type") == HEAD_TYPE]
        except OSError:
            return 0, 0
        for statement in reversed(statements):
            size, lines = statement.get("bytes"), statement.get("lines")
            if isinstance(size, int) and isinstance(lines, int) and size > 0 \
                    and _hash_of_line_ending_at(self.audit.path, size) == statement.get("head"):
                return size, lines
        return 0, 0


def _scan_span(path: Path, start: int, end: int) -> tuple[int, dict[str, int]]:
    """(number of lines, {device: highest seq stored}) in bytes [start, end) of the log."""
    lines = 0
    stored: dict[str, int] = {}
    with open_regular(path) as f:
        f.seek(start)
        position = start
        for raw in bounded_lines(f, LINE_LIMITS.max_bytes):
            if position >= end:
                break
            position += raw.size
            lines += 1
            entry = _parse(raw.data) if raw.data is not None else None
            if isinstance(entry, dict) and entry.get("event") == "segment_stored":
                device, seq = entry.get("device_id"), entry.get("seq")
                if isinstance(device, str) and type(seq) is int:
                    stored[device] = max(seq, stored.get(device, seq))
    return lines, stored


def _hash_of_line_ending_at(path: Path, offset: int) -> str | None:
    """The hash of the line that ends (with its newline) at byte `offset`, if one does."""
    try:
        with open_regular(path) as f:
            start = max(0, offset - LINE_LIMITS.max_bytes - 2)
            f.seek(start)
            data = f.read(offset - start)
    except OSError:
        return None
    if len(data) != offset - start or not data.endswith(b"\n"):
        return None
    return line_hash(data[:-1].rsplit(b"\n", 1)[-1])


def _append_line(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_heads(path: str | Path) -> Iterator[tuple[int, Any, str]]:
    """(line number, parsed statement or None, why not) for each line of a heads file."""
    with open_regular(path) as f:
        for number, raw in enumerate(bounded_lines(f, HEAD_LIMITS.max_bytes), start=1):
            if raw.data is None:
                yield number, None, raw.too_long(HEAD_LIMITS.max_bytes)
                continue
            try:
                yield number, loads_untrusted(raw.data, HEAD_LIMITS), ""
            except ValueError as exc:
                yield number, None, str(exc)


@dataclass(frozen=True)
class RawLine:
    """One line of a file as `bounded_lines` read it."""

    data: bytes | None  # with its newline; None if over the limit (not kept)
    size: int  # bytes, with its newline
    hash: str  # line_hash: of the line without its newline
    complete: bool  # it ends with a newline

    def too_long(self, limit: int) -> str:
        return (f"{self.size - self.complete} bytes is over the size limit of {limit} for one "
                f"line; not read")


def bounded_lines(f: IO[bytes], limit: int) -> Iterator[RawLine]:
    """Each line of `f` from where it stands, never holding more than about `limit` bytes: a
    line longer than `limit` (without its newline) comes without its `data`, hashed and
    measured as it streams past to the next newline."""
    while raw := f.readline(limit + 1):
        complete = raw.endswith(b"\n")
        if complete or len(raw) <= limit:
            yield RawLine(raw, len(raw), line_hash(raw), complete)
            continue
        digest, size = hashlib.sha256(raw), len(raw)
        del raw  # the rest streams past in small pieces
        while piece := f.readline(_TAIL_CHUNK):
            size += len(piece)
            complete = piece.endswith(b"\n")
            digest.update(piece[:-1] if complete else piece)
            if complete:
                break
        yield RawLine(None, size, digest.hexdigest(), complete)


# -- reading and checking ------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    number: int
    end: int  # byte offset just after its newline
    hash: str
    entry: dict[str, Any] | None  # None if it is not a JSON audit event
    problem: str = ""  # why `entry` is None
    complete: bool = True  # it ends with a newline


@dataclass(frozen=True)
class AuditFinding:
    level: str
    kind: str
    text: str

    def __str__(self) -> str:
        return f"{self.level.upper():5} {self.kind}: {self.text}"


@dataclass(frozen=True)
class Head:
    """A signed statement that checked out, and the line it names (None: not in the file)."""

    statement: dict[str, Any]
    line: Line | None


@dataclass
class AuditCheck:
    """What `check_audit` found in one log; `lines` are the parsed lines, in order."""

    path: Path
    lines: list[Line] = field(default_factory=list)
    findings: list[AuditFinding] = field(default_factory=list)
    heads: list[Head] = field(default_factory=list)  # signature checked
    anchor: str = ""  # what vouches for line `anchored`
    anchored: int = 0  # the newest line something outside the file vouches for
    receipts: int = 0  # receipts used as anchors
    anchors_checked: bool = False  # with a centre key: the heads and receipts were checked

    @cached_property
    def by_hash(self) -> dict[str, Line]:
        """Each line by its hash (the first, if two lines are identical)."""
        found: dict[str, Line] = {}
        for line in self.lines:
            found.setdefault(line.hash, line)
        return found

    @property
    def ok(self) -> bool:
        return not any(f.level == ERROR for f in self.findings)

    def add(self, level: str, kind: str, text: str) -> None:
        self.findings.append(AuditFinding(level, kind, text))

    def stored(self) -> dict[str, int]:
        """{device: highest seq} that the centre's signed heads say the ingest stored."""
        highest: dict[str, int] = {}
        for head in self.heads:
            for device, seq in (head.statement.get("stored") or {}).items():
                if isinstance(device, str) and type(seq) is int:
                    highest[device] = max(seq, highest.get(device, seq))
        return highest

    def summary(self) -> str:
        errors = sum(f.level == ERROR for f in self.findings)
        notes = len(self.findings) - errors
        total = len(self.lines)
        if errors:
            verdict = "NOT VERIFIED"
        elif self.anchored == total and total:
            verdict = "VERIFIED"
        else:
            verdict = f"VERIFIED UP TO LINE {self.anchored}" if self.anchored else "UNANCHORED"
        return (f"{verdict}: {self.path}: {total} line(s), {len(self.heads)} signed head(s), "
                f"{self.receipts} receipt(s); {errors} error(s), {notes} note(s)")


def read_lines(path: str | Path) -> list[Line]:
    """Every line of the log, hashed and parsed with the untrusted decoder."""
    lines = []
    offset = 0
    with open_regular(path) as f:
        for number, raw in enumerate(bounded_lines(f, LINE_LIMITS.max_bytes), start=1):
            offset += raw.size
            entry, problem = _audit_entry(raw)
            lines.append(Line(number, offset, raw.hash, entry, problem, raw.complete))
    return lines


def _audit_entry(raw: RawLine) -> tuple[dict[str, Any] | None, str]:
    """(the line's audit event, "") or (None, why it is not one)."""
    if raw.data is None:
        return None, raw.too_long(LINE_LIMITS.max_bytes)
    try:
        parsed = loads_untrusted(raw.data, LINE_LIMITS)
    except ValueError as exc:
        return None, str(exc)
    if isinstance(parsed, dict) and all(k in parsed for k in RESERVED):
        return parsed, ""
    return None, f"not an audit event (needs {', '.join(RESERVED)})"


def verify_log(path: str | Path) -> list[str]:
    """Every problem found in the links of the log at `path`, one sentence each naming the
    line; [] if none. (`check_audit` also checks the head against its anchors.)"""
    return _link_problems(read_lines(path))


def _link_problems(lines: list[Line]) -> list[str]:
    problems: list[str] = []
    prev: str | None = None
    for line in lines:
        number = line.number
        if not line.complete:
            problems.append(f"line {number}: incomplete (no newline): a write was cut "
                            f"short, or the line was edited")
        if line.entry is None:
            problems.append(f"line {number}: not JSON" if line.problem.startswith("not JSON")
                            or line.problem.startswith("not UTF-8")
                            else f"line {number}: {line.problem}")
        elif line.entry["prev"] != prev:
            if number == 1:
                problems.append("line 1: it names a predecessor, so the lines before it "
                                "were deleted")
            else:
                problems.append(f"line {number}: prev does not match the SHA-256 of line "
                                f"{number - 1}: line {number - 1} was edited, or lines "
                                f"were deleted, inserted or moved here")
        prev = line.hash
    return problems


def check_audit(path: str | Path, keys: Iterable[Ed25519PublicKey] | None, *,
                heads_path: str | Path | None = None,
                receipts: Iterable[tuple[str, Any]] = ()) -> AuditCheck:
    """The log's links, its signed heads (`LOG.heads` unless `heads_path`) and the
    `audit_head` of each receipt ((where, parsed receipt or None) pairs), checked against each
    other with the centre's `keys` (None: the links only, and a NOTE saying so). Raises
    OSError if the log cannot be read."""
    check = AuditCheck(Path(path), read_lines(path))
    for problem in _link_problems(check.lines):
        check.add(ERROR, "link", problem)
    heads = heads_path_for(path) if heads_path is None else Path(heads_path)
    if keys is None:
        check.add(NOTE, "heads-unchecked", f"the signed heads ({heads.name}) and receipts were "
                                           f"not checked (no centre key): only the links were")
        return check
    keys = list(keys)
    check.anchors_checked = True
    _check_heads(check, heads, keys)
    for where, receipt in receipts:
        _check_receipt(check, where, receipt, keys)
    _report_unanchored(check)
    return check


def _check_heads(check: AuditCheck, path: Path, keys: list[Ed25519PublicKey]) -> None:
    by_hash = check.by_hash
    size = check.lines[-1].end if check.lines else 0
    try:
        statements = list(read_heads(path))
    except FileNotFoundError:
        return
    except OSError as exc:
        check.add(ERROR, "heads-unreadable", f"{path}: {exc}")
        return
    for number, statement, why in statements:
        where = f"{path.name} line {number}"
        if not _is_head(statement):
            check.add(ERROR, "bad-head", f"{where} is not a signed audit head "
                                         f"({why or 'fields missing or wrong'})")
            continue
        try:
            verify(statement, keys)
        except SignatureError as exc:
            check.add(ERROR, "bad-head-signature",
                      f"{where} (head at {statement['time']}) does not verify with the centre "
                      f"key ({exc}): forged or damaged; not used as an anchor")
            continue
        line = by_hash.get(statement["head"])
        check.heads.append(Head(statement, line))
        if line is None:
            _missing_anchor(check, f"the head signed at {statement['time']} ({where})",
                            statement["lines"], statement["bytes"], size)
        elif line.number != statement["lines"] or line.end != statement["bytes"]:
            check.add(ERROR, "head-moved",
                      f"the head signed at {statement['time']} ({where}) is line "
                      f"{statement['lines']}, but that line is now line {line.number}: lines "
                      f"before it were deleted or inserted")
        else:
            _anchor(check, line.number, f"the last signed head at {statement['time']}")


def _is_head(statement: Any) -> bool:
    return (isinstance(statement, dict) and statement.get("type") == HEAD_TYPE
            and isinstance(statement.get("head"), str)
            and SHA256_HEX.match(statement["head"]) is not None
            and type(statement.get("bytes")) is int and type(statement.get("lines")) is int
            and isinstance(statement.get("time"), str)
            and isinstance(statement.get("stored", {}), dict))


def _missing_anchor(check: AuditCheck, what: str, line: int, end: int, size: int) -> None:
    total = len(check.lines)
    if line > total:
        check.add(ERROR, "cut", f"{what} vouches for line {line} (byte {end}), but the log ends "
                                f"at line {total} (byte {size}): its last line(s) were removed")
    else:
        check.add(ERROR, "edited", f"{what} vouches for line {line}, but no line of the log "
                                   f"has that hash: line {line} was edited or removed")


def _check_receipt(check: AuditCheck, where: str, receipt: Any,
                   keys: list[Ed25519PublicKey]) -> None:
    if not isinstance(receipt, dict) or receipt.get("type") != "segment_receipt":
        check.add(ERROR, "bad-receipt", f"{where}: not a segment receipt")
        return
    name = (f"receipt {str(receipt.get('receipt_id'))[:36]} ({receipt.get('device_id')} seq "
            f"{receipt.get('seq')}, {where})")
    try:
        verify(receipt, keys)
    except SignatureError as exc:
        check.add(ERROR, "bad-receipt", f"{name} does not verify with the centre key ({exc}): "
                                        f"not used as an anchor")
        return
    head = receipt.get("audit_head")
    if head is None:
        return  # issued before receipts carried the audit head
    check.receipts += 1
    line = check.by_hash.get(head) if isinstance(head, str) else None
    if line is None:
        size = check.lines[-1].end if check.lines else 0
        check.add(ERROR, "receipt-line-missing",
                  f"{name}, issued at {receipt.get('stored_at')}, names audit line "
                  f"{str(head)[:16]}... as its receipt_issued line; no line of {check.path.name} "
                  f"(ending at line {len(check.lines)}, byte {size}) has that hash: the line was "
                  f"edited or removed (its tail cut, if it was among the last)")
        return
    entry = line.entry or {}
    if (entry.get("event"), entry.get("receipt_id")) != ("receipt_issued",
                                                         receipt.get("receipt_id")):
        check.add(ERROR, "receipt-line-mismatch",
                  f"{name} names line {line.number}, which is not its receipt_issued line")
        return
    _anchor(check, line.number, f"the last anchoring {name}")


def _anchor(check: AuditCheck, number: int, what: str) -> None:
    if number > check.anchored:
        check.anchored, check.anchor = number, what


def _report_unanchored(check: AuditCheck) -> None:
    total = len(check.lines)
    if not total:
        check.add(NOTE, "empty", f"{check.path} has no lines")
    elif not check.anchored and (check.heads or check.receipts):
        return  # every anchor there is contradicts the log: reported as ERRORs above
    elif not check.anchored:
        check.add(NOTE, "unanchored",
                  f"{total} line(s) and no signed head or receipt in the file vouches for any "
                  f"of them: only the links between lines were checked, so lines forged and "
                  f"appended, or cut off the end, would not show")
    elif check.anchored < total:
        check.add(NOTE, "unanchored",
                  f"{total - check.anchored} line(s) after {check.anchor} (line "
                  f"{check.anchored}): nothing outside the file vouches for them yet, so a line "
                  f"forged and appended there, or one cut off the end, would not show")


# -- keys and receipts ---------------------------------------------------------------------------
def centre_keys_from_fleet(fleet_dir: str | Path) -> list[Ed25519PublicKey]:
    """The centre's public command key, read from the fleet directory's private key file
    (never created here, unlike Fleet.centre_signer). OSError/ValueError if unusable."""
    from control_center.fleet import CENTRE_SIGNING_KEY  # the log's module stays below fleet

    path = Path(fleet_dir) / CENTRE_SIGNING_KEY
    key = serialization.load_pem_private_key(read_regular(path, 64 * 1024), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return [key.public_key()]


def centre_key_from_b64(text: str) -> Ed25519PublicKey:
    """A centre public key as devices hold it (trust.centre_keys): base64 of 32 bytes.
    Raises ValueError."""
    return public_key_from_b64(text)


def read_receipts(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed receipt or None) from a file (JSON, or JSON lines as a device keeps
    `receipts.jsonl`) or every `*.json`/`*.jsonl` file of a directory. Unparsable lines come
    back as None so the caller can report them."""
    path = Path(path)
    files = (sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
             if path.is_dir() else [path])
    for file in files:
        try:
            data = read_regular(file, 64 * 1024 * 1024)
        except OSError as exc:
            yield f"{file.name}: {exc}", None
            continue
        for number, raw in enumerate(data.splitlines(), start=1):
            if raw.strip():
                try:
                    yield f"{file.name} line {number}", loads_untrusted(raw, MESSAGE_LIMITS)
                except ValueError as exc:
                    yield f"{file.name} line {number}: {exc}", None


def _parse(raw: bytes) -> Any:
    try:
        return loads_untrusted(raw, LINE_LIMITS)
    except ValueError:
        return None


def _now() -> str:
    return utc_iso(datetime.now(UTC))

