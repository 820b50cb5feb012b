"""Which sent messages still wait for the centre's delivery receipt, and when to send them again.

Pure: no I/O, no threads, no clock of its own; times are arguments. `MqttUplink` drives it.

A message's life here:

    sent ──PUBACK ok──> awaiting receipt ──receipt──> gone (the outbox row is deleted)
      │                  │ no receipt by `due`
      │                  └──────────────> sent again (the wait doubles, up to `max_wait_s`)
      ├──PUBACK 16 "no matching subscribers"──> sent again after `unrouted_wait_s`, doubling
      └──PUBACK refused (>= 0x80)─────────────> sent again after `refused_wait_s`

A PUBACK only says the broker took the message: the broker may still lose it (a crash before its
next autosave, a subscriber that cannot read it, a stopped centre instance) and only the centre's
signed receipt proves it was stored. While paho holds a message unacknowledged ("in flight") it
is never due: paho itself sends it again after a reconnect, and a second copy would only queue.

Re-sends must not bury a centre that is slow rather than gone (after an outage a device may hold
thousands of positions), so a due message is held back, not sent:
- while the centre is working through this device's messages: the broker took this one, a
  receipt came within the last `first_wait_s`, and none for a later message has overtaken this
  one (it is queued, not lost);
- while no centre is connected (the last answer was PUBACK 16 and no receipt came since): only
  the most important waiting message goes, as a probe; the first receipt releases the rest.
Alerts go before events and positions, older before newer; at most `resend_batch` at a time.

Named limits: `first_wait_s` (2 s) is far above the centre's normal answer (milliseconds) and
small enough that a lost alert is sent again quickly; `max_wait_s` (10 s) bounds how late a
message arrives after an outage ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from firmware.uplink.outgoing import OutboxRow
from protocol import MessageKind, payload_digest


@dataclass
class _Waiting:
    row: OutboxRow
    digest: str
    attempts: int = 0  # re-sends so far: each doubles the wait
    due: float | None = None  # None while in flight (paho holds it, no PUBACK yet)
    taken: bool = False  # the last PUBACK was a success: a centre may have it queued


@dataclass(frozen=True)
class DeliveryWaits:
    first_wait_s: float = 2.0
    unrouted_wait_s: float = 1.0
    refused_wait_s: float = 30.0
    max_wait_s: float = 10.0
    resend_batch: int = 20


class DeliveryTracker:
    def __init__(self, waits: DeliveryWaits | None = None) -> None:
        self.waits = waits or DeliveryWaits()
        self._waiting: dict[int, _Waiting] = {}
        self._last_receipt_at: float | None = None
        self._highest_receipted = 0
        self._centre_absent = False  # PUBACK 16 since the last receipt

    def __contains__(self, seq: int) -> bool:
        return seq in self._waiting

    def sent(self, row: OutboxRow) -> None:
        """`row` was handed to paho for the first time: in flight until its PUBACK."""
        waiting = self._waiting.get(row.seq)
        if waiting is None or waiting.row.payload != row.payload:
            self._waiting[row.seq] = _Waiting(row, payload_digest(row.payload))
        else:
            waiting.due = None

    def still_waiting(self, row: OutboxRow) -> bool:
        """Before a re-send: True (and in flight again) unless a receipt came meanwhile, so a
        late re-send never brings a settled row back."""
        waiting = self._waiting.get(row.seq)
        if waiting is None or waiting.row.payload != row.payload:
            return False
        waiting.due = None
        return True

    def accepted(self, seq: int, now: float) -> None:
        """The broker took it: wait for the receipt."""
        self._wait(seq, now, self.waits.first_wait_s, taken=True)

    def unrouted(self, seq: int, now: float) -> None:
        """No subscriber (no centre connected): the broker dropped it; offer it again soon."""
        self._centre_absent = True
        self._wait(seq, now, self.waits.unrouted_wait_s, taken=False)

    def refused(self, seq: int, now: float) -> None:
        """The broker refused it (ACL, size): offer it again, slowly."""
        waiting = self._waiting.get(seq)
        if waiting is not None:
            waiting.due, waiting.taken = now + self.waits.refused_wait_s, False

    def receipted(self, seq: int, digest: str, now: float) -> OutboxRow | None:
        """A verified receipt names `seq`: the row, now done, if the digest is the row's own;
        None for a row not waiting here or a receipt of other bytes (a reused seq)."""
        waiting = self._waiting.get(seq)
        if waiting is None or waiting.digest != digest:
            return None
        del self._waiting[seq]
        self._last_receipt_at = now
        self._highest_receipted = max(self._highest_receipted, seq)
        if self._centre_absent:  # a centre is back: what waited for it goes now
            self._centre_absent = False
            for other in self._waiting.values():
                if other.due is not None:
                    other.due = min(other.due, now)
        return waiting.row

    def due(self, now: float) -> list[OutboxRow]:
        """Rows to send again now, most important first; each counts as in flight from here.
        Rows held back (see the module's docstring) are due again `first_wait_s` later."""
        ready = sorted((w for w in self._waiting.values() if w.due is not None and w.due <= now),
                       key=lambda w: (w.row.kind is not MessageKind.ALERT, w.row.seq))
        limit = 1 if self._centre_absent else self.waits.resend_batch
        taken: list[OutboxRow] = []
        for waiting in ready:
            if len(taken) >= limit or self._queued_at_centre(waiting, now):
                waiting.due = now + self.waits.first_wait_s
                continue
            waiting.due = None
            waiting.attempts += 1
            taken.append(waiting.row)
        return taken

    def next_due(self) -> float | None:
        dues = [w.due for w in self._waiting.values() if w.due is not None]
        return min(dues) if dues else None

    def forget(self, seq: int) -> None:
        """The row left the outbox another way (shed, as old positions are): stop waiting."""
        self._waiting.pop(seq, None)

    def _queued_at_centre(self, waiting: _Waiting, now: float) -> bool:
        """The broker took this row, the centre is answering, and it has not answered anything
        sent after this row yet: the row is most likely in the centre's queue."""
        recent = (self._last_receipt_at is not None
                  and now - self._last_receipt_at < self.waits.first_wait_s)
        return waiting.taken and recent and waiting.row.seq > self._highest_receipted

    def _wait(self, seq: int, now: float, base_s: float, *, taken: bool) -> None:
        waiting = self._waiting.get(seq)
        if waiting is not None:
            waiting.due = now + min(base_s * 2 ** waiting.attempts, self.waits.max_wait_s)
            waiting.taken = taken
