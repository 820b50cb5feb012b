"""Durable outbox: a message is on disk before its first publish and leaves only when the
centre's signed delivery receipt for it arrives (firmware/uplink/mqtt.py).

SQLite in WAL mode with `synchronous=FULL`, so a committed row survives power loss. Every row gets
the next per-device sequence number inside the same transaction that stores it, so sequence numbers
are strictly increasing across crashes and reboots and the pending rows replay in order.

Named limits:
- `max_positions`: position updates are the only messages the outbox may shed; past this many
  pending ones the oldest are dropped (a newer position is worth more). Alerts and events are
  never dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

from firmware.uplink.outgoing import OutboxRow, Outgoing
from protocol import MessageKind, encode
from protocol.signing import Signer

log = logging.getLogger("sos.outbox")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq     INTEGER PRIMARY KEY,
    kind    TEXT NOT NULL,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS device_state (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL
);
"""


class OutboxFull(OSError):
    """The storage refused the write (disk full or read-only): the message is NOT durable."""


class Outbox:
    def __init__(self, path: str | Path, *, max_positions: int = 2000,
                 signer: Signer | None = None) -> None:
        """`signer` signs every message once its sequence number is set (docs/PROTOCOL.md)."""
        self.path = Path(path)
        self._signer = signer
        self.max_positions = max_positions
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._last_seq = self._stored_seq_locked()

    def append(
        self, items: list[Outgoing], *, state: dict[str, Any] | None = None
    ) -> list[OutboxRow]:
        """Store `items` (and optionally the device state) in one durable transaction."""
        rows: list[OutboxRow] = []
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                seq = self._next_seq_locked()
                for item in items:
                    payload = encode(item.kind, self._finish(item.message, seq))
                    self._db.execute(
                        "INSERT INTO outbox(seq, kind, topic, payload) VALUES (?, ?, ?, ?)",
                        (seq, item.kind.value, item.topic, payload),
                    )
                    rows.append(OutboxRow(seq, item.kind, item.topic, payload))
                    seq += 1
                self._db.execute(
                    "INSERT INTO counters(name, value) VALUES ('seq', ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    (seq - 1,),
                )
                if state is not None:
                    self._save_state_locked(state)
                self._shed_positions_locked()
                self._db.execute("COMMIT")
                self._last_seq = seq - 1
            except sqlite3.OperationalError as exc:
                self._rollback_locked()
                raise OutboxFull(f"outbox {self.path}: {exc}") from exc
            except BaseException:
                self._rollback_locked()
                raise
        return rows

    def pending(self) -> list[OutboxRow]:
        """Every message the centre has not receipted yet, oldest first."""
        with self._lock:
            cur = self._db.execute("SELECT seq, kind, topic, payload FROM outbox ORDER BY seq")
            return [OutboxRow(s, MessageKind(k), t, bytes(p)) for s, k, t, p in cur]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def remove(self, seq: int) -> None:
        """The centre's receipt for `seq` arrived: forget it.

        Without an fsync of its own: a delete lost to power loss only means the row is sent again
        after the restart and the centre drops the duplicate. (The next durable commit syncs the
        WAL, delete included.) This runs in paho's network thread, so it must be quick.
        """
        with self._lock:
            try:
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            except sqlite3.OperationalError as exc:
                log.error("outbox %s: could not remove delivered seq=%d: %s", self.path, seq, exc)
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def contains(self, seq: int) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM outbox WHERE seq = ?", (seq,)).fetchone()
        return row is not None

    def load_state(self) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM device_state WHERE id = 1").fetchone()
        return json.loads(row[0]) if row else None

    def save_state(self, state: dict[str, Any]) -> None:
        with self._lock:
            try:
                self._save_state_locked(state)
            except sqlite3.OperationalError as exc:
                raise OutboxFull(f"outbox {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def volatile_rows(self, items: list[Outgoing]) -> list[OutboxRow]:
        """Rows for messages that could not be stored (disk full): sent, but not crash-safe.

        They take sequence numbers too, so numbers stay strictly increasing either way.
        """
        with self._lock:
            rows = []
            for item in items:
                self._last_seq += 1
                payload = encode(item.kind, self._finish(item.message, self._last_seq))
                rows.append(OutboxRow(self._last_seq, item.kind, item.topic, payload,
                                      durable=False))
            return rows

    def _finish(self, message: dict[str, Any], seq: int) -> dict[str, Any]:
        numbered = {**message, "seq": seq}
        return self._signer.sign(numbered) if self._signer else numbered

    def _stored_seq_locked(self) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
        return row[0] if row else 0

    def _next_seq_locked(self) -> int:
        return max(self._stored_seq_locked(), self._last_seq) + 1

    def _save_state_locked(self, state: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT INTO device_state(id, state) VALUES (1, ?) "
            "ON CONFLICT(id) DO UPDATE SET state = excluded.state",
            (json.dumps(state, sort_keys=True),),
        )

    def _shed_positions_locked(self) -> None:
        self._db.execute(
            "DELETE FROM outbox WHERE kind = ? AND seq NOT IN "
            "(SELECT seq FROM outbox WHERE kind = ? ORDER BY seq DESC LIMIT ?)",
            (MessageKind.POSITION.value, MessageKind.POSITION.value, self.max_positions),
        )

    def _rollback_locked(self) -> None:
        with contextlib.suppress(sqlite3.OperationalError):
            self._db.execute("ROLLBACK")
