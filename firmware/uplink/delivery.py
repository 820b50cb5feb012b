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

Named limits: `first_wait_s` (2 s) is far above the centre's normal answer (milliseconds) and
small enough that a lost alert is sent again quickly; `max_wait_s` (10 s) bounds how late a
message arrives after an outage ends, at one re-send per waiting message every 10 s meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

from firmware.uplink.outbox import OutboxRow
from protocol import payload_digest


@dataclass
class _Waiting:
    row: OutboxRow
    digest: str
    attempts: int = 0  # re-sends so far: each doubles the wait
    due: float | None = None  # None while in flight (paho holds it, no PUBACK yet)


@dataclass(frozen=True)
class DeliveryWaits:
    first_wait_s: float = 2.0
    unrouted_wait_s: float = 1.0
    refused_wait_s: float = 30.0
    max_wait_s: float = 10.0


class DeliveryTracker:
    def __init__(self, waits: DeliveryWaits | None = None) -> None:
        self.waits = waits or DeliveryWaits()
        self._waiting: dict[int, _Waiting] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, seq: int) -> bool:
        return seq in self._waiting

    def sent(self, row: OutboxRow) -> None:
        """`row` was handed to paho (again): in flight until its PUBACK."""
        waiting = self._waiting.get(row.seq)
        if waiting is None or waiting.row.payload != row.payload:
            self._waiting[row.seq] = _Waiting(row, payload_digest(row.payload))
        else:
            waiting.due = None

    def accepted(self, seq: int, now: float) -> None:
        """The broker took it: wait for the receipt."""
        self._wait(seq, now, self.waits.first_wait_s)

    def unrouted(self, seq: int, now: float) -> None:
        """No subscriber (no centre connected): the broker dropped it; offer it again soon."""
        self._wait(seq, now, self.waits.unrouted_wait_s)

    def refused(self, seq: int, now: float) -> None:
        """The broker refused it (ACL, size): offer it again, slowly."""
        waiting = self._waiting.get(seq)
        if waiting is not None:
            waiting.due = now + self.waits.refused_wait_s

    def receipted(self, seq: int, digest: str) -> OutboxRow | None:
        """A verified receipt names `seq`: the row, now done, if the digest is the row's own;
        None for a row not waiting here or a receipt of other bytes (a reused seq)."""
        waiting = self._waiting.get(seq)
        if waiting is None or waiting.digest != digest:
            return None
        del self._waiting[seq]
        return waiting.row

    def due(self, now: float) -> list[OutboxRow]:
        """Rows to send again now, oldest first; each counts as in flight from here."""
        rows = []
        for seq in sorted(self._waiting):
            waiting = self._waiting[seq]
            if waiting.due is not None and waiting.due <= now:
                waiting.due = None
                waiting.attempts += 1
                rows.append(waiting.row)
        return rows

    def next_due(self) -> float | None:
        dues = [w.due for w in self._waiting.values() if w.due is not None]
        return min(dues) if dues else None

    def forget(self, seq: int) -> None:
        """The row left the outbox another way (shed, as old positions are): stop waiting."""
        self._waiting.pop(seq, None)

    def _wait(self, seq: int, now: float, base_s: float) -> None:
        waiting = self._waiting.get(seq)
        if waiting is not None:
            waiting.due = now + min(base_s * 2 ** waiting.attempts, self.waits.max_wait_s)
