"""The upload of one segment as two pure state machines: events in, actions out (h11 style).

`SegmentUpload` is the byte connection's part (from wherever the server is to every byte sent),
`ReceiptFetch` the settler's (from every byte sent to a receipt, a refusal or a resend). They
hold no socket, file, database, thread or clock: `uploader.py` performs each action and feeds
back what happened as the next event, so every decision of the protocol is in the two tables
below, which are the dispatch data itself (`SENDER` and `SETTLER`; a test checks that this text
is theirs). `*` is any phase. A rule names its next phase; one whose last action is a request
(`Begin`, `TakePrepared`, `Head`, `Create`, `Patch`, `Fetch`) waits for that request's answer.

Byte connection (`SegmentUpload`):

phase     event            what happens
--------  ---------------  --------------------------------------------------------------------
start     attempt          the creator's POST is ready: take it -> taking; else a saved location:
                           HEAD -> heading; else create
taking    prepared         a receipt: hand it to the settler -> done; else send from its offset
heading   offset_known     a length that is not the segment's: forget, fail as not_tus; else send
                           from the offset
heading   upload_gone      forget the location; create (no failure counted)
creating  created          save the location; a receipt or every byte there: hand to the settler ->
                           done; else send from the offset (a dropped body is resent)
creating  refused          400/415 to a POST with a body (no creation-with-upload): POST without one
                           -> creating, then PATCH; otherwise as `* refused`
sending   patched          no progress: fail as not_tus; a receipt or the last byte: hand to the
                           settler -> done; else PATCH the next chunk -> sending
*         retry_later      fail, waiting at least the Retry-After -> start
*         connection_lost  fail -> start
*         not_tus          fail -> start
*         offset_mismatch  fail without waiting -> start (HEAD for the server's offset)
*         upload_gone      forget the location; failures + 1 (progress does not reset them); at
                           max_attempts end the pass; else at once -> start (POST again)
*         refused          refuse the segment (kept, not offered again) -> done; the pass goes on
*         unauthorized     end the pass ("not authorised"): no segment is blamed
*         source_changed   forget; defer the segment ("segment file changed") -> done
*         file_gone        forget; skip it (deleted on the device meanwhile) -> done
*         card_error       defer the segment ("cannot read the segment") -> done
*         stopped          end the pass ("stopped")

create:       POST with the first chunk as its body (creation-with-upload, `Prefer:
              respond-async`), or without a body if an earlier one may have sent bytes (a "sent
              up to" mark) -> creating.
send from n:  n beyond the segment: forget, fail as not_tus. Bytes marked sent beyond n count as
              resent and the mark goes back to n. n = size: hand to the settler -> done; else
              PATCH `chunk_bytes` from n, `Prefer: respond-async` on the last one -> sending.
fail:         failures = 1 if the server's offset moved in this attempt, else failures + 1; at
              `max_attempts` end the pass (the rest deferred); else wait `Backoff.delay` (the
              Retry-After a floor), then a new attempt -> start.

Settler (`ReceiptFetch`), one segment at a time in send order:

phase     event            what happens
--------  ---------------  --------------------------------------------------------------------
start     handed           the byte connection had the receipt: accept it -> done; else GET
                           .../receipt with `Prefer: wait=20` -> fetching
fetching  receipt          accept it (check, keep, mark uploaded, delete) -> done
fetching  still_storing    GET again at once, 30 times in all; after that each one is a failure
fetching  refused          refuse the segment (kept, not offered again) -> done
fetching  offset_mismatch  the centre lost its last bytes: send it again at the end of the pass
                           (once; twice: deferred) -> done
fetching  upload_gone      forget the location; send it again at the end of the pass -> done
fetching  unauthorized     defer the segment ("not authorised") -> done
fetching  retry_later      failures + 1; at max_attempts defer ("no receipt"); else wait
                           `Backoff.delay` (the Retry-After a floor), GET again -> fetching
fetching  connection_lost  as retry_later
fetching  not_tus          as retry_later
*         stopped          defer the segment ("stopped") -> done
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware.uplink.upload_plan import Backoff
from protocol.signing import SignatureError, verify

STOPPED = "stopped"  # the reason a segment waits when the pass was stopped: not a fault

RECEIPT_WAIT_S = 20.0  # a receipt request asks the server to hold it this long (Prefer: wait)
MAX_STORING_WAITS = 30  # receipt requests answered "still storing" before they count as failures
ANY = "*"
RECEIPT_TYPE = "segment_receipt"
# Field names follow the manifest's (protocol/schemas/receipt.schema.json): the size is
# `ciphertext_bytes`, not `size`.
RECEIPT_FIELDS = ("v", "type", "receipt_id", "device_id", "seq", "ciphertext_sha256",
                  "manifest_sha256", "ciphertext_bytes", "stored_at", "store", "sig")


# -- the receipt check (the settler's Accept) ----------------------------------------------
def receipt_problems(receipt: Any, keys: Iterable[Ed25519PublicKey], *, device_id: str,
                     seq: int, ciphertext_sha256: str, manifest_sha256: str,
                     ciphertext_bytes: int) -> list[str]:
    """Why `receipt` does not prove that the centre stored this segment, or [] if it does."""
    if not isinstance(receipt, dict):
        return ["not a JSON object"]
    missing = [f for f in RECEIPT_FIELDS if f not in receipt]
    if missing:
        return [f"missing {', '.join(missing)}"]
    try:
        verify(receipt, keys)
    except SignatureError as exc:
        return [f"signature: {exc} (not signed by a centre key in trust.centre_keys)"]
    problems = []
    expected = {"v": 1, "type": RECEIPT_TYPE, "device_id": device_id, "seq": seq,
                "ciphertext_sha256": ciphertext_sha256, "manifest_sha256": manifest_sha256,
                "ciphertext_bytes": ciphertext_bytes}
    for name, want in expected.items():
        got = receipt[name]
        if got != want or type(got) is not type(want):
            problems.append(f"{name} is {got!r}, expected {want!r}")
    return problems


# -- events: what happened ------------------------------------------------------------------
@dataclass(frozen=True)
class Attempt:
    """The start of an attempt: what the device holds for the segment right now."""

    kind: ClassVar[str] = "attempt"
    location: str | None  # the saved upload location
    sent_to: int  # the "sent up to" mark: bytes that may have left the device
    prepared: bool = False  # the creator made the upload on its own connection


@dataclass(frozen=True)
class Prepared:
    """The creator's POST answered (its error comes as `Failed`)."""

    kind: ClassVar[str] = "prepared"
    location: str
    offset: int | None
    receipt: Any = None


@dataclass(frozen=True)
class OffsetKnown:
    """HEAD answered: the server holds `offset` bytes of an upload of `length` (None: unsaid)."""

    kind: ClassVar[str] = "offset_known"
    offset: int
    length: int | None


@dataclass(frozen=True)
class Created:
    """Our POST answered with the upload's location and the bytes the server holds."""

    kind: ClassVar[str] = "created"
    location: str
    offset: int | None
    receipt: Any = None


@dataclass(frozen=True)
class Patched:
    kind: ClassVar[str] = "patched"
    offset: int
    receipt: Any = None


@dataclass(frozen=True)
class Handed:
    """The settler's start: the receipt the byte connection already had, or None."""

    kind: ClassVar[str] = "handed"
    receipt: Any = None


@dataclass(frozen=True)
class Receipt:
    kind: ClassVar[str] = "receipt"
    receipt: Any


@dataclass(frozen=True)
class StillStoring:
    """GET .../receipt answered "not yet" after the server waited `RECEIPT_WAIT_S`."""

    kind: ClassVar[str] = "still_storing"


@dataclass(frozen=True)
class Stopped:
    """The pass was asked to stop (the dock was left, Ctrl-C) before the next request."""

    kind: ClassVar[str] = "stopped"


FAILURES = frozenset({"retry_later", "connection_lost", "not_tus", "offset_mismatch",
                      "upload_gone", "refused", "unauthorized", "source_changed", "file_gone",
                      "card_error"})


@dataclass(frozen=True)
class Failed:
    """A request failed: `kind` is one of FAILURES (the tus exceptions, and the card's)."""

    kind: str
    reason: str
    status: int | None = None  # the HTTP status, if there was an answer
    after_s: float | None = None  # Retry-After, for retry_later

    def __post_init__(self) -> None:
        if self.kind not in FAILURES:
            raise ValueError(f"unknown failure {self.kind!r}")


Event = (Attempt | Prepared | OffsetKnown | Created | Patched | Handed | Receipt
         | StillStoring | Stopped | Failed)


# -- actions: what to do ---------------------------------------------------------------------
# Effects: done at once, nothing comes back.
@dataclass(frozen=True)
class Forget:
    """Drop the saved location and the "sent up to" mark."""


@dataclass(frozen=True)
class SaveLocation:
    location: str


@dataclass(frozen=True)
class MarkSent:
    """Set the "sent up to" mark to `offset`."""

    offset: int


@dataclass(frozen=True)
class CountResent:
    """`nbytes` sent before that the server did not keep."""

    nbytes: int


@dataclass(frozen=True)
class Report:
    """Progress: the server holds `offset` bytes of the segment."""

    offset: int


@dataclass(frozen=True)
class Log:
    level: int
    message: str


@dataclass(frozen=True)
class Wait:
    seconds: float


# Requests: the answer (or the failure) is the next event.
@dataclass(frozen=True)
class Begin:
    """Start an attempt: answer with `Attempt` (what the device holds now)."""


@dataclass(frozen=True)
class TakePrepared:
    """Take the creator's POST: answer with `Prepared`."""


@dataclass(frozen=True)
class Head:
    location: str


@dataclass(frozen=True)
class Create:
    """POST the upload, with its first `body_length` bytes as body (0: none), respond-async."""

    body_length: int


@dataclass(frozen=True)
class Patch:
    location: str
    offset: int
    length: int
    respond_async: bool  # Prefer: respond-async, on the request that sends the last byte


@dataclass(frozen=True)
class Fetch:
    """GET {location}/receipt with `Prefer: wait=<wait_s>`."""

    wait_s: float


# Outcomes: the machine is done with the segment.
@dataclass(frozen=True)
class Handoff:
    """Every byte is at the server: the settler takes it (with the receipt, if given)."""

    location: str
    receipt: Any = None


@dataclass(frozen=True)
class Accept:
    """Check the receipt; if it holds, keep it, mark the segment uploaded and delete it."""

    receipt: Any


@dataclass(frozen=True)
class Refuse:
    """The centre refuses the segment for good: keep it on the device, do not offer it again."""

    reason: str


@dataclass(frozen=True)
class Defer:
    """Leave the segment for a later pass."""

    reason: str


@dataclass(frozen=True)
class Skip:
    """Nothing to do any more (the segment was deleted on the device)."""


@dataclass(frozen=True)
class Resend:
    """Send the segment again at the end of this pass."""


@dataclass(frozen=True)
class EndPass:
    """Stop the pass: this segment and the rest are deferred with `reason`."""

    reason: str


Action = (Forget | SaveLocation | MarkSent | CountResent | Report | Log | Wait | Begin
          | TakePrepared | Head | Create | Patch | Fetch | Handoff | Accept | Refuse | Defer
          | Skip | Resend | EndPass)
REQUESTS = (Begin, TakePrepared, Head, Create, Patch, Fetch)
OUTCOMES = (Handoff, Accept, Refuse, Defer, Skip, Resend, EndPass)


class UnexpectedEvent(ValueError):
    """An event the table has no rule for in the machine's phase (a bug in the adapter)."""


@dataclass(frozen=True)
class Rule:
    does: str  # the table's cell
    handler: Callable[[Any, Any], list[Any]]


def render(rules: Mapping[tuple[str, str], Rule]) -> str:
    """The table as the module docstring shows it."""
    lines = [f"{'phase':<9} {'event':<16} what happens", f"{'-' * 8}  {'-' * 15}  {'-' * 68}"]
    for (phase, event), rule in rules.items():
        cell = textwrap.wrap(rule.does, 73)
        lines.append(f"{phase:<9} {event:<16} {cell[0]}")
        lines += [f"{'':<26} {more}" for more in cell[1:]]
    return "\n".join(lines)


def refusal_reason(event: Failed) -> str:
    return event.reason if event.status is None else f"{event.reason} (HTTP {event.status})"


def wants_creator(location: str | None, sent_to: int) -> bool:
    """Whether the creator should POST this segment ahead: not if the device has its upload, or
    may have sent bytes of it (then the byte connection asks the server where it stands)."""
    return location is None and not sent_to


# -- the byte connection ---------------------------------------------------------------------
_EXCEPTION_NAMES = {"retry_later": "RetryLater", "connection_lost": "ConnectionLost",
                    "not_tus": "NotTus", "offset_mismatch": "OffsetMismatch"}


class SegmentUpload:
    """One segment on the byte connection. `start()`, then `handle(event)` with the answer to
    each request until an outcome comes out. `rand()` in [0, 1) is the backoff's jitter."""

    def __init__(self, seq: int, size: int, *, chunk_bytes: int, max_attempts: int,
                 backoff: Backoff, rand: Callable[[], float]) -> None:
        self.seq, self.size, self.chunk_bytes = seq, size, chunk_bytes
        self.max_attempts, self.backoff, self.rand = max_attempts, backoff, rand
        self.phase = "start"
        self.failures = 0  # attempts in a row that failed without progress
        self.progressed = False  # the server's offset moved in this attempt
        self.location: str | None = None
        self.offset = 0  # the server's, as last heard
        self.high = 0  # the "sent up to" mark: bytes that may have left the device
        self.first = 0  # the body of the POST in flight

    def start(self) -> list[Any]:
        return [Begin()]

    def handle(self, event: Event) -> list[Any]:
        rule = SENDER.get((self.phase, event.kind)) or SENDER.get((ANY, event.kind))
        if rule is None:
            raise UnexpectedEvent(f"segment {self.seq:06d}: {event.kind} while {self.phase}")
        return rule.handler(self, event)

    # -- rules -------------------------------------------------------------------------------
    def _attempt(self, event: Attempt) -> list[Any]:
        self.progressed = False
        self.high = min(event.sent_to, self.size)
        self.location = event.location
        if event.prepared:
            return self._to("taking", TakePrepared())
        if event.location is not None:
            return self._to("heading", Head(event.location))
        return self._create()

    def _prepared(self, event: Prepared) -> list[Any]:
        self.location = event.location
        if event.receipt is not None:
            return self._done(Handoff(event.location, event.receipt))
        return self._send_from(event.offset or 0)

    def _offset_known(self, event: OffsetKnown) -> list[Any]:
        if event.length is not None and event.length != self.size:
            return self._forget() + self._fail(Failed(
                "not_tus", f"the server's upload is {event.length} bytes, the segment "
                           f"{self.size}"))
        return self._send_from(event.offset)

    def _head_gone(self, event: Failed) -> list[Any]:
        return self._forget() + self._create()

    def _created(self, event: Created) -> list[Any]:
        self.high = max(self.high, self.first)  # a body the server dropped is sent again
        self.location = event.location
        offset = event.offset or 0
        if event.offset:
            self.progressed = True
        if event.receipt is not None or offset == self.size:
            return [SaveLocation(event.location), Report(self.size),
                    *self._done(Handoff(event.location, event.receipt))]
        return [SaveLocation(event.location), *self._send_from(offset)]

    def _create_refused(self, event: Failed) -> list[Any]:
        if not self.first or event.status not in (400, 415):
            return self._refused(event)
        self.first = 0
        return [Log(logging.INFO, f"the centre takes no body with a POST ({event.reason}); "
                                  "sending it by PATCH"),
                MarkSent(0), Create(0)]

    def _patched(self, event: Patched) -> list[Any]:
        if event.offset == self.offset:
            return self._fail(Failed("not_tus", f"PATCH at {self.offset} made no progress"))
        self.offset = event.offset
        self.progressed = True
        if event.receipt is not None or event.offset >= self.size:
            assert self.location is not None
            return [Report(event.offset), *self._done(Handoff(self.location, event.receipt))]
        return [Report(event.offset), self._patch()]

    def _fail(self, event: Failed) -> list[Any]:
        self.failures = 1 if self.progressed else self.failures + 1
        if self.failures >= self.max_attempts:
            return [Log(logging.WARNING, f"upload of segment {self.seq:06d}: {event.reason}; "
                                         f"giving up for this pass after {self.failures} "
                                         "attempts"),
                    *self._done(EndPass(f"{_EXCEPTION_NAMES[event.kind]}: {event.reason}"))]
        if event.kind == "offset_mismatch":
            return self._to("start", Begin())  # HEAD at once: nothing is wrong with the server
        delay = self.backoff.delay(self.failures - 1, self.rand(), event.after_s)
        return [Log(logging.WARNING, f"upload of segment {self.seq:06d}: {event.reason}; "
                                     f"trying again in {delay:.1f} s"),
                Wait(delay), *self._to("start", Begin())]

    def _gone(self, event: Failed) -> list[Any]:
        self.failures += 1
        if self.failures >= self.max_attempts:
            return self._forget() + self._done(EndPass("the server keeps forgetting the upload"))
        return self._forget() + self._to("start", Begin())

    def _refused(self, event: Failed) -> list[Any]:
        return self._done(Refuse(refusal_reason(event)))

    def _unauthorized(self, event: Failed) -> list[Any]:
        return [Log(logging.ERROR, f"the ingest server does not accept this device "
                                   f"({event.reason}): check that its certificate "
                                   "(broker.cert_file) is issued by the fleet CA and not "
                                   "revoked; nothing uploaded"),
                *self._done(EndPass(f"not authorised: {event.reason}"))]

    def _source_changed(self, event: Failed) -> list[Any]:
        return [*self._forget(),
                Log(logging.WARNING, f"segment {self.seq:06d} changed while uploading "
                                     f"({event.reason}); left for the next pass"),
                *self._done(Defer(f"segment file changed: {event.reason}"))]

    def _file_gone(self, event: Failed) -> list[Any]:
        return [*self._forget(),
                Log(logging.INFO, f"segment {self.seq:06d} was deleted on the device while "
                                  "uploading"),
                *self._done(Skip())]

    def _card_error(self, event: Failed) -> list[Any]:
        return [Log(logging.ERROR, f"segment {self.seq:06d}: cannot read it from the card "
                                   f"({event.reason}); left for the next pass"),
                *self._done(Defer(f"cannot read the segment: {event.reason}"))]

    def _stopped(self, event: Stopped) -> list[Any]:
        return self._done(EndPass(STOPPED))

    # -- steps -------------------------------------------------------------------------------
    def _create(self) -> list[Any]:
        """POST with the first chunk, unless an earlier POST may have sent bytes already (a
        crash before its answer): then without, and the server says where it is."""
        self.first = min(self.chunk_bytes, self.size) if self.high == 0 else 0
        return self._to("creating", Create(self.first))

    def _send_from(self, offset: int) -> list[Any]:
        if offset > self.size:
            return self._forget() + self._fail(Failed(
                "not_tus", f"the server holds {offset} bytes of a {self.size}-byte segment"))
        actions: list[Any] = []
        if self.high > offset:  # sent before; the server did not keep it
            actions += [CountResent(self.high - offset), MarkSent(offset)]
            self.high = offset
        self.offset = offset
        actions.append(Report(offset))
        if offset >= self.size:
            assert self.location is not None
            return actions + self._done(Handoff(self.location))
        return [*actions, self._patch()]

    def _patch(self) -> Patch:
        assert self.location is not None
        self.phase = "sending"
        length = min(self.chunk_bytes, self.size - self.offset)
        return Patch(self.location, self.offset, length,
                     respond_async=self.offset + length == self.size)

    def _forget(self) -> list[Any]:
        self.location, self.high = None, 0  # forgetting drops the mark too
        return [Forget()]

    def _to(self, phase: str, request: Any) -> list[Any]:
        self.phase = phase
        return [request]

    def _done(self, outcome: Any) -> list[Any]:
        self.phase = "done"
        return [outcome]


SENDER: dict[tuple[str, str], Rule] = {
    ("start", "attempt"): Rule(
        "the creator's POST is ready: take it -> taking; else a saved location: HEAD -> "
        "heading; else create", SegmentUpload._attempt),
    ("taking", "prepared"): Rule(
        "a receipt: hand it to the settler -> done; else send from its offset",
        SegmentUpload._prepared),
    ("heading", "offset_known"): Rule(
        "a length that is not the segment's: forget, fail as not_tus; else send from the "
        "offset", SegmentUpload._offset_known),
    ("heading", "upload_gone"): Rule(
        "forget the location; create (no failure counted)", SegmentUpload._head_gone),
    ("creating", "created"): Rule(
        "save the location; a receipt or every byte there: hand to the settler -> done; else "
        "send from the offset (a dropped body is resent)", SegmentUpload._created),
    ("creating", "refused"): Rule(
        "400/415 to a POST with a body (no creation-with-upload): POST without one -> "
        "creating, then PATCH; otherwise as `* refused`", SegmentUpload._create_refused),
    ("sending", "patched"): Rule(
        "no progress: fail as not_tus; a receipt or the last byte: hand to the settler -> "
        "done; else PATCH the next chunk -> sending", SegmentUpload._patched),
    (ANY, "retry_later"): Rule("fail, waiting at least the Retry-After -> start",
                               SegmentUpload._fail),
    (ANY, "connection_lost"): Rule("fail -> start", SegmentUpload._fail),
    (ANY, "not_tus"): Rule("fail -> start", SegmentUpload._fail),
    (ANY, "offset_mismatch"): Rule(
        "fail without waiting -> start (HEAD for the server's offset)", SegmentUpload._fail),
    (ANY, "upload_gone"): Rule(
        "forget the location; failures + 1 (progress does not reset them); at max_attempts "
        "end the pass; else at once -> start (POST again)", SegmentUpload._gone),
    (ANY, "refused"): Rule(
        "refuse the segment (kept, not offered again) -> done; the pass goes on",
        SegmentUpload._refused),
    (ANY, "unauthorized"): Rule(
        "end the pass (\"not authorised\"): no segment is blamed", SegmentUpload._unauthorized),
    (ANY, "source_changed"): Rule(
        "forget; defer the segment (\"segment file changed\") -> done",
        SegmentUpload._source_changed),
    (ANY, "file_gone"): Rule(
        "forget; skip it (deleted on the device meanwhile) -> done", SegmentUpload._file_gone),
    (ANY, "card_error"): Rule(
        "defer the segment (\"cannot read the segment\") -> done", SegmentUpload._card_error),
    (ANY, "stopped"): Rule("end the pass (\"stopped\")", SegmentUpload._stopped),
}


# -- the settler -----------------------------------------------------------------------------
class ReceiptFetch:
    """One sent segment on the settler's connection: `start(receipt)` (the receipt the byte
    connection already had, or None), then `handle(event)` until an outcome comes out."""

    def __init__(self, seq: int, *, max_attempts: int, backoff: Backoff,
                 rand: Callable[[], float]) -> None:
        self.seq, self.max_attempts, self.backoff, self.rand = seq, max_attempts, backoff, rand
        self.phase = "start"
        self.failures = 0
        self.storing = 0  # answers "still storing"

    def start(self, receipt: Any = None) -> list[Any]:
        return self.handle(Handed(receipt))

    def handle(self, event: Event) -> list[Any]:
        rule = SETTLER.get((self.phase, event.kind)) or SETTLER.get((ANY, event.kind))
        if rule is None:
            raise UnexpectedEvent(f"segment {self.seq:06d}: {event.kind} while {self.phase}")
        return rule.handler(self, event)

    def _handed(self, event: Handed) -> list[Any]:
        if event.receipt is not None:
            return self._done(Accept(event.receipt))
        return self._fetch()

    def _receipt(self, event: Receipt) -> list[Any]:
        return self._done(Accept(event.receipt))

    def _still_storing(self, event: StillStoring) -> list[Any]:
        self.storing += 1  # a busy centre: it waited RECEIPT_WAIT_S, not a failure
        if self.storing < MAX_STORING_WAITS:
            return self._fetch()
        return self._fail(Failed("retry_later", "the centre is still storing it"))

    def _refused(self, event: Failed) -> list[Any]:
        return self._done(Refuse(refusal_reason(event)))

    def _lost(self, event: Failed) -> list[Any]:
        forget: list[Any] = [Forget()] if event.kind == "upload_gone" else []
        return [*forget,
                Log(logging.WARNING, f"segment {self.seq:06d}: the centre lost its last bytes "
                                     f"({event.reason}); sending them again"),
                *self._done(Resend())]

    def _unauthorized(self, event: Failed) -> list[Any]:
        return self._done(Defer(f"not authorised: {event.reason}"))

    def _fail(self, event: Failed) -> list[Any]:
        self.failures += 1
        if self.failures >= self.max_attempts:
            return [Log(logging.WARNING, f"segment {self.seq:06d}: no receipt ({event.reason}); "
                                         "left for the next pass"),
                    *self._done(Defer(f"no receipt: {event.reason}"))]
        return [Wait(self.backoff.delay(self.failures - 1, self.rand(), event.after_s)),
                *self._fetch()]

    def _stopped(self, event: Stopped) -> list[Any]:
        return self._done(Defer(STOPPED))

    def _fetch(self) -> list[Any]:
        self.phase = "fetching"
        return [Fetch(RECEIPT_WAIT_S)]

    def _done(self, outcome: Any) -> list[Any]:
        self.phase = "done"
        return [outcome]


SETTLER: dict[tuple[str, str], Rule] = {
    ("start", "handed"): Rule(
        "the byte connection had the receipt: accept it -> done; else GET .../receipt with "
        "`Prefer: wait=20` -> fetching", ReceiptFetch._handed),
    ("fetching", "receipt"): Rule(
        "accept it (check, keep, mark uploaded, delete) -> done", ReceiptFetch._receipt),
    ("fetching", "still_storing"): Rule(
        "GET again at once, 30 times in all; after that each one is a failure",
        ReceiptFetch._still_storing),
    ("fetching", "refused"): Rule(
        "refuse the segment (kept, not offered again) -> done", ReceiptFetch._refused),
    ("fetching", "offset_mismatch"): Rule(
        "the centre lost its last bytes: send it again at the end of the pass (once; twice: "
        "deferred) -> done", ReceiptFetch._lost),
    ("fetching", "upload_gone"): Rule(
        "forget the location; send it again at the end of the pass -> done", ReceiptFetch._lost),
    ("fetching", "unauthorized"): Rule(
        "defer the segment (\"not authorised\") -> done", ReceiptFetch._unauthorized),
    ("fetching", "retry_later"): Rule(
        "failures + 1; at max_attempts defer (\"no receipt\"); else wait `Backoff.delay` (the "
        "Retry-After a floor), GET again -> fetching", ReceiptFetch._fail),
    ("fetching", "connection_lost"): Rule("as retry_later", ReceiptFetch._fail),
    ("fetching", "not_tus"): Rule("as retry_later", ReceiptFetch._fail),
    (ANY, "stopped"): Rule("defer the segment (\"stopped\") -> done", ReceiptFetch._stopped),
}


def drive(actions: list[Any], handle: Callable[[Any], list[Any]],
          request: Callable[[Any], Any], effect: Callable[[Any], None]) -> Any:
    """Run a machine to its outcome: `effect` each effect, `request` each request (its answer
    is the next event for `handle`); returns the outcome (one of OUTCOMES)."""
    while True:
        *effects, last = actions
        for action in effects:
            effect(action)
        if isinstance(last, OUTCOMES):
            return last
        actions = handle(request(last))
