"""The control centre's record: alerts, their updates, devices and operator commands, in SQLite.

Ownership: an alert belongs to the device that raised it. A message naming another device's
alert (a duplicate alert id, an update or event, a command result) raises NotYours and changes
nothing.

De-duplication: an alert is stored once per `alert_id` (a re-send, from a device that has no
delivery receipt for it yet, only increments `alerts.duplicates`); updates and
events once per (device_id, seq, created_at). `created_at` is part of the key because messages a
device sent while its storage was full carry sequence numbers that a reboot may hand out again.

Several centre instances splitting the load share one store (this SQLite file, in WAL mode).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_center.shared_sqlite import connect_shared, immediate_transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    alert_id       TEXT PRIMARY KEY,
    device_id      TEXT NOT NULL,
    device_kind    TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    trigger        TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    position       TEXT NOT NULL,
    battery        TEXT,
    stored_at      REAL NOT NULL,
    status         TEXT NOT NULL DEFAULT 'open',
    device_offline INTEGER NOT NULL DEFAULT 0,
    cancel_requested_at TEXT,
    acked_at       REAL,
    acked_by       TEXT,
    closed_at      REAL,
    closed_by      TEXT,
    duplicates     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS updates (
    device_id   TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    alert_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    stored_at   REAL NOT NULL,
    body        TEXT NOT NULL,
    PRIMARY KEY (device_id, seq, created_at)
);
CREATE INDEX IF NOT EXISTS updates_by_alert ON updates(alert_id);
CREATE TABLE IF NOT EXISTS devices (
    device_id   TEXT PRIMARY KEY,
    device_kind TEXT,
    state       TEXT NOT NULL,
    last_seen   REAL NOT NULL,
    status      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS exports (
    export_id   TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    call_id     TEXT NOT NULL,
    operator    TEXT NOT NULL,
    exported_at REAL NOT NULL,
    verified    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    command_id  TEXT PRIMARY KEY,
    alert_id    TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    type        TEXT NOT NULL,
    operator    TEXT NOT NULL,
    issued_at   TEXT NOT NULL,
    result      TEXT,
    result_at   REAL
);
"""
# Added to `commands` after the first release (ALTER TABLE on an older store): when the broker
# took the command, whether anyone was subscribed to take it, and why the device refused it.
# `note`: what the operator gave with it (a close's reason, from the web console).
_COMMAND_COLUMNS = {"sent_at": "REAL", "routed": "INTEGER", "reason_code": "TEXT", "note": "TEXT"}
# Added to `alerts` with the web console: who took (claimed) the alert, and when.
# Added with routing (docs/ROUTING.md): the desks an alert was routed to (JSON list) and the rule
# that matched, written with the alert.
_ALERT_COLUMNS_ADDED = {"claimed_by": "TEXT", "claimed_at": "REAL", "desks": "TEXT",
                        "route_rule": "TEXT", "incident_id": "TEXT", "call_id": "TEXT"}
# Refusals a fresh command (new id, number and time) can overcome: it waited too long in the
# broker's queue, or a centre's numbering went back.
RETRYABLE_REFUSALS = ("expired", "replayed")
DECISIONS = ("ack", "close")
# Copies of one decision sent at most (the first and re-sends); beyond it the operator decides.
MAX_COPIES = 6

ALERT_COLUMNS = (
    "alert_id", "device_id", "device_kind", "seq", "trigger", "created_at", "position", "battery",
    "stored_at", "status", "device_offline", "cancel_requested_at", "acked_at", "acked_by",
    "closed_at", "closed_by", "duplicates", "claimed_by", "claimed_at", "desks", "route_rule",
    "incident_id", "call_id",
)


@dataclass(frozen=True)
class AlertRecord:
    alert_id: str
    device_id: str
    device_kind: str
    seq: int
    trigger: str
    created_at: str
    position: dict[str, Any]
    battery: dict[str, Any] | None
    stored_at: float
    status: str
    device_offline: bool
    cancel_requested_at: str | None
    acked_at: float | None
    acked_by: str | None
    closed_at: float | None
    closed_by: str | None
    duplicates: int
    claimed_by: str | None = None
    claimed_at: float | None = None
    desks: tuple[str, ...] = ()  # where routing sent it (empty: stored before routing)
    route_rule: str | None = None
    incident_id: str | None = None  # incidents.py: the alerts that are one event
    call_id: str | None = None  # the dispatch call its token was on when it was raised

    @classmethod
    def from_row(cls, row: tuple) -> AlertRecord:
        values = dict(zip(ALERT_COLUMNS, row, strict=True))
        values["position"] = json.loads(values["position"])
        values["battery"] = json.loads(values["battery"]) if values["battery"] else None
        values["device_offline"] = bool(values["device_offline"])
        values["desks"] = tuple(json.loads(values["desks"])) if values["desks"] else ()
        return cls(**values)


class AmbiguousAlertId(LookupError):
    pass


class AlreadyClaimed(RuntimeError):
    """Another operator took the alert first; `owner` is who."""

    def __init__(self, alert_id: str, owner: str) -> None:
        super().__init__(f"alert {alert_id[:8]} is taken by {owner}")
        self.owner = owner


class NotYours(ValueError):
    """A device's message names an alert another device raised; it is refused, not stored."""


class NotTheSame(ValueError):
    """A "re-send" whose bytes differ from what was stored under its key: no receipt may claim
    those bytes were stored."""


def _same_bytes(what: str, stored: str | None, received: str | None) -> None:
    if stored is not None and received is not None and stored != received:
        raise NotTheSame(f"{what} was stored before with other bytes")


@dataclass(frozen=True)
class Stored:
    """What storing a device's message did: `new` False for a re-send of one stored before,
    `stored_at` when it was first stored (what its delivery receipt says)."""

    new: bool
    stored_at: float


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = connect_shared(self.path)
        self._db.executescript(_SCHEMA)
        self._add_digest_columns()
        self._add_command_columns()
        self._add_columns("alerts", _ALERT_COLUMNS_ADDED)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _add_digest_columns(self) -> None:
        """Stores made before delivery receipts lack the payload digests; rows stored then keep
        none (a re-send of one is receipted without comparing bytes)."""
        for table in ("alerts", "updates"):
            self._add_columns(table, {"digest": "TEXT"})

    def _add_columns(self, table: str, wanted: dict[str, str]) -> None:
        """Columns a later release added (nullable: rows from before have none)."""
        columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
        for name, kind in wanted.items():
            if name not in columns:
                with contextlib.suppress(sqlite3.OperationalError):  # another instance won
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def _add_command_columns(self) -> None:
        """Stores made before commands were confirmed lack these columns. Their unanswered
        commands count as sent and not taken by a device session, so a device that still shows
        the alert undecided gets the decision again (the release before marked an alert decided
        on the broker's word)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(commands)")}
        self._add_columns("commands", _COMMAND_COLUMNS)
        if "sent_at" not in columns:
            self._db.execute(
                "UPDATE commands SET sent_at = (julianday(rtrim(issued_at, 'Z')) - 2440587.5) "
                "* 86400.0, routed = 0 WHERE sent_at IS NULL AND result IS NULL")

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        """One atomic write of several statements (the caller holds the lock)."""
        return immediate_transaction(self._db)

    # -- writes from devices ---------------------------------------------------------------------
    def add_alert(self, alert: dict[str, Any], stored_at: float,
                  digest: str | None = None,
                  route: tuple[str, tuple[str, ...]] | None = None) -> Stored:
        """Store a new alert, or count a duplicate if this alert id is known (a re-send).

        `digest`: the SHA-256 of the payload as received (what its receipt will name). Raises
        NotYours if the id is another device's alert, and NotTheSame if a re-send brings other
        bytes than were stored: neither is a re-send, and the sender gets no receipt.
        `route`: (the rule that matched, its desks), written in the same row (a re-send keeps
        the first decision)."""
        rule, desks = route if route is not None else (None, None)
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO alerts(alert_id, device_id, device_kind, seq, trigger, "
                "created_at, position, battery, stored_at, digest, route_rule, desks) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (alert["alert_id"], alert["device_id"], alert["device_kind"], alert["seq"],
                 alert["trigger"], alert["created_at"], json.dumps(alert["position"]),
                 json.dumps(alert["battery"]) if alert["battery"] is not None else None,
                 stored_at, digest, rule, json.dumps(list(desks)) if desks is not None else None),
            )
            if cur.rowcount == 1:
                # Messages can overtake each other (a re-offered alert after a broker restart):
                # a cancel request stored before its alert still counts, if its device sent it.
                self._db.execute(
                    "UPDATE alerts SET cancel_requested_at = (SELECT min(created_at) FROM updates "
                    "WHERE alert_id = ? AND device_id = ? "
                    "AND json_extract(body, '$.type') = 'cancel_requested') WHERE alert_id = ?",
                    (alert["alert_id"], alert["device_id"], alert["alert_id"]))
                return Stored(True, stored_at)
            owner, first_stored, first_digest = self._db.execute(
                "SELECT device_id, stored_at, digest FROM alerts WHERE alert_id = ?",
                (alert["alert_id"],)).fetchone()
            if owner != alert["device_id"]:
                raise NotYours(f"alert {alert['alert_id']} was raised by {owner}, not by "
                               f"{alert['device_id']}")
            _same_bytes(f"alert {alert['alert_id']}", first_digest, digest)
            self._db.execute("UPDATE alerts SET duplicates = duplicates + 1 WHERE alert_id = ?",
                             (alert["alert_id"],))
            return Stored(False, first_stored)

    def add_update(self, kind: str, message: dict[str, Any], stored_at: float,
                   digest: str | None = None) -> Stored:
        """Store a position update or an event, or find it stored before (a re-send).

        An update may name only an alert of its own device (raises NotYours otherwise): it may
        arrive before its alert, but never changes another device's alert or command. A re-send
        with other bytes than were stored raises NotTheSame, as for alerts."""
        device_id, alert_id = message["device_id"], message.get("alert_id", "")
        with self._lock, self._transaction():
            owner = self._db.execute("SELECT device_id FROM alerts WHERE alert_id = ?",
                                     (alert_id,)).fetchone() if alert_id else None
            if owner is not None and owner[0] != device_id:
                raise NotYours(f"alert {alert_id} was raised by {owner[0]}, not by {device_id}")
            cur = self._db.execute(
                "INSERT OR IGNORE INTO updates(device_id, seq, alert_id, kind, created_at, "
                "stored_at, body, digest) VALUES (?,?,?,?,?,?,?,?)",
                (device_id, message["seq"], alert_id, kind, message["created_at"], stored_at,
                 json.dumps(message, sort_keys=True), digest),
            )
            if cur.rowcount != 1:
                first_stored, first_digest = self._db.execute(
                    "SELECT stored_at, digest FROM updates WHERE device_id = ? AND seq = ? AND "
                    "created_at = ?", (device_id, message["seq"], message["created_at"])
                ).fetchone()
                _same_bytes(f"{kind} seq={message['seq']} of {device_id}", first_digest, digest)
                return Stored(False, first_stored)
            if kind == "event" and message["type"] == "cancel_requested":
                self._db.execute("UPDATE alerts SET cancel_requested_at = ? WHERE alert_id = ? "
                                 "AND device_id = ?", (message["created_at"], alert_id, device_id))
            if kind == "event" and message["type"] in ("command_applied", "command_rejected"):
                self._record_result(message, stored_at)
            return Stored(True, stored_at)

    def _record_result(self, event: dict[str, Any], at: float) -> None:
        """A device's answer to one of our commands: write it on the command and, for an
        applied ack or close, on the alert. Only the device the command went to can answer it,
        and only about its own alert; `applied` is final (a late refusal of a redelivered copy
        does not undo it)."""
        device_id, command_id = event["device_id"], event["command_id"]
        self._db.execute(
            "UPDATE commands SET result = ?, result_at = ?, reason_code = ? WHERE command_id = ? "
            "AND device_id = ? AND result IS NOT 'command_applied'",
            (event["type"], at, event.get("reason_code"), command_id, device_id))
        row = self._db.execute(
            "SELECT c.type, c.alert_id, c.operator FROM commands c JOIN alerts a "
            "ON a.alert_id = c.alert_id AND a.device_id = c.device_id "
            "WHERE c.command_id = ? AND c.device_id = ?", (command_id, device_id)).fetchone()
        if event["type"] == "command_rejected":
            if (row is not None and row[0] == "close"
                    and event.get("reason_code") == "not_active_alert"):
                # The alert is over on the device already (another centre closed it, and its
                # answer did not reach us): it must not stay open here for good.
                self._mark(row[1], "close", f"{row[2]} (already ended on the device)", at)
            return
        if row is not None and row[0] in DECISIONS:
            self._mark(row[1], row[0], row[2], at)
        elif row is None and event.get("command_type") in DECISIONS and event.get("alert_id"):
            # Another centre's command, applied on the device: the decision holds for everyone.
            owned = self._db.execute("SELECT 1 FROM alerts WHERE alert_id = ? AND device_id = ?",
                                     (event["alert_id"], device_id)).fetchone()
            if owned:
                self._mark(event["alert_id"], event["command_type"], "another centre", at)

    def set_device_status(self, device_id: str, status: dict[str, Any], seen_at: float) -> None:
        """Record online/offline; an offline device's open alerts are flagged for the operator.

        One transaction without an fsync of its own: a status is replaced by the next one (at
        every heartbeat and stage change), and the next durable commit syncs it anyway. It
        arrives right behind an alert, on the thread that sends that alert's receipt: two
        fsyncs here delayed the receipt by milliseconds (`make bench`)."""
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._transaction():
                    self._write_status(device_id, status, seen_at)
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def _write_status(self, device_id: str, status: dict[str, Any], seen_at: float) -> None:
        if status["state"] == "offline":
            # The broker's last will carries only who and "offline": keep what the device last
            # said about itself (battery, firmware, self-test, faults) for the fleet view, as
            # its last known state, under the will's own fields.
            row = self._db.execute("SELECT status FROM devices WHERE device_id = ?",
                                   (device_id,)).fetchone()
            if row is not None:
                status = {**json.loads(row[0]), **status}
        self._db.execute(
            "INSERT INTO devices(device_id, device_kind, state, last_seen, status) "
            "VALUES (?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
            "device_kind = coalesce(excluded.device_kind, devices.device_kind), "
            "state = excluded.state, last_seen = excluded.last_seen, status = excluded.status",
            (device_id, status.get("device_kind"), status["state"], seen_at,
             json.dumps(status, sort_keys=True)),
        )
        self._db.execute(
            "UPDATE alerts SET device_offline = ? WHERE device_id = ? AND status != 'closed'",
            (1 if status["state"] == "offline" else 0, device_id),
        )

    # -- operator decisions ----------------------------------------------------------------------
    def next_command_seq(self, signer: str, now_ms: int) -> int:
        """The next command sequence number of the centre key `signer` (base64): milliseconds
        since 1970, or one more than its last if that is larger. Devices keep a replay window
        per key, so each centre counts on its own; time-based numbers stay ahead after a lost
        store or a restart without one."""
        with self._lock:
            row = self._db.execute(
                "INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                "SET value = max(value + 1, excluded.value) RETURNING value",
                (f"command_seq:{signer}", now_ms)).fetchone()
        return row[0]

    def add_command(self, command: dict[str, Any], device_id: str,
                    note: str | None = None) -> None:
        """Record a command before it is published; `note`: the operator's reason, if any."""
        with self._lock:
            self._db.execute(
                "INSERT INTO commands(command_id, alert_id, device_id, type, operator, issued_at, "
                "note) VALUES (?,?,?,?,?,?,?)",
                (command["command_id"], command.get("alert_id", ""), device_id, command["type"],
                 command["operator"], command["issued_at"], note),
            )

    def claim(self, alert_id: str, operator: str, at: float) -> AlertRecord:
        """Let `operator` take an alert not yet taken (or taken by them already). One UPDATE
        decides, so of two operators clicking at once exactly one gets it: the other gets
        AlreadyClaimed. LookupError if there is no such alert; a closed alert cannot be taken."""
        with self._lock:
            self._db.execute(
                "UPDATE alerts SET claimed_by = ?, claimed_at = ? WHERE alert_id = ? "
                "AND claimed_by IS NULL AND status != 'closed'", (operator, at, alert_id))
            row = self._db.execute(
                f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts WHERE alert_id = ?", (alert_id,)
            ).fetchone()
        if row is None:
            raise LookupError(f"no alert {alert_id}")
        record = AlertRecord.from_row(row)
        if record.claimed_by != operator:
            if record.claimed_by is None:  # closed before anyone took it
                raise AlreadyClaimed(alert_id, f"nobody: it is {record.status}")
            raise AlreadyClaimed(alert_id, record.claimed_by)
        return record

    def mark_sent(self, command_id: str, at: float, *, routed: bool) -> None:
        """The broker took the command (PUBACK); `routed` False: nobody was subscribed to take
        it (PUBACK 16, the device offline without a session)."""
        with self._lock:
            self._db.execute("UPDATE commands SET sent_at = ?, routed = ? WHERE command_id = ?",
                             (at, int(routed), command_id))

    def mark(self, alert_id: str, decision: str, operator: str, at: float) -> None:
        """Record an operator's ack or close as in effect (its device applied it)."""
        with self._lock:
            self._mark(alert_id, decision, operator, at)

    def _mark(self, alert_id: str, decision: str, operator: str, at: float) -> None:
        if decision == "ack":
            self._db.execute(
                "UPDATE alerts SET status = CASE status WHEN 'open' THEN 'acknowledged' "
                "ELSE status END, acked_at = coalesce(acked_at, ?), "
                "acked_by = coalesce(acked_by, ?) WHERE alert_id = ?",
                (at, operator, alert_id),
            )
        else:
            self._db.execute(
                "UPDATE alerts SET status = 'closed', closed_at = coalesce(closed_at, ?), "
                "closed_by = coalesce(closed_by, ?) WHERE alert_id = ?",
                (at, operator, alert_id),
            )

    # -- reads -----------------------------------------------------------------------------------
    def alert(self, alert_id: str) -> AlertRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts WHERE alert_id = ?", (alert_id,)
            ).fetchone()
        return AlertRecord.from_row(row) if row else None

    def resolve_alert_id(self, prefix: str) -> str | None:
        """Operators type the first few characters of an id; refuse an ambiguous prefix."""
        with self._lock:
            rows = self._db.execute(
                "SELECT alert_id FROM alerts WHERE alert_id LIKE ? || '%' LIMIT 2",
                (prefix.lower(),),
            ).fetchall()
        if len(rows) > 1:
            raise AmbiguousAlertId(f"alert id prefix '{prefix}' matches more than one alert")
        return rows[0][0] if rows else None

    def set_incident(self, alert_id: str, incident_id: str, call_id: str | None) -> None:
        with self._lock:
            self._db.execute("UPDATE alerts SET incident_id = ?, call_id = ? WHERE alert_id = ?",
                             (incident_id, call_id, alert_id))

    def recent_alerts(self, since: float) -> list[AlertRecord]:
        """Alerts stored at or after `since` (epoch s), oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts WHERE stored_at >= ? "
                "ORDER BY stored_at", (since,)).fetchall()
        return [AlertRecord.from_row(r) for r in rows]

    def incident(self, incident_id: str) -> list[AlertRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts WHERE incident_id = ? "
                "ORDER BY stored_at", (incident_id,)).fetchall()
        return [AlertRecord.from_row(r) for r in rows]

    def current_call(self, device_id: str) -> str | None:
        """The dispatch call a token is on: its last call_started not ended since."""
        with self._lock:
            row = self._db.execute(
                "SELECT json_extract(body, '$.type'), json_extract(body, '$.call_id') "
                "FROM updates WHERE device_id = ? AND kind = 'event' AND json_extract(body, "
                "'$.type') IN ('call_started', 'call_ended') ORDER BY stored_at DESC, seq DESC "
                "LIMIT 1", (device_id,)).fetchone()
        return row[1] if row is not None and row[0] == "call_started" else None

    def add_export(self, export: dict[str, Any], operator: str, at: float) -> None:
        """Who exported which call, and whether it verified (the console's evidence export;
        the audit log has the file hashes)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO exports(export_id, device_id, call_id, operator, exported_at, "
                "verified) VALUES (?,?,?,?,?,?)", (export["export_id"], export["device_id"],
                                                  export["call_id"], operator, at,
                                                  int(bool(export["verified"]))))

    def exports(self) -> list[dict[str, Any]]:
        keys = ("export_id", "device_id", "call_id", "operator", "exported_at", "verified")
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(keys)} FROM exports "
                                    "ORDER BY exported_at").fetchall()
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def take_over(self, alert_id: str, operator: str, at: float) -> str | None:
        """Give an alert that is not closed to `operator` whoever holds it (a supervisor's
        decision, when its holder left); returns who held it. LookupError if there is no such
        open alert."""
        with self._lock, self._transaction():
            row = self._db.execute("SELECT claimed_by FROM alerts WHERE alert_id = ? "
                                   "AND status != 'closed'", (alert_id,)).fetchone()
            if row is None:
                raise LookupError(f"no open alert {alert_id}")
            self._db.execute("UPDATE alerts SET claimed_by = ?, claimed_at = ? "
                             "WHERE alert_id = ?", (operator, at, alert_id))
        return row[0]

    def closed_alerts(self, limit: int) -> list[AlertRecord]:
        """The `limit` most recently stored closed alerts."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts WHERE status = 'closed' "
                "ORDER BY stored_at DESC LIMIT ?", (limit,)).fetchall()
        return [AlertRecord.from_row(r) for r in rows]

    def alerts(self, *, open_only: bool = True) -> list[AlertRecord]:
        where = "WHERE status != 'closed'" if open_only else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts {where} ORDER BY stored_at"
            ).fetchall()
        return [AlertRecord.from_row(r) for r in rows]

    def updates(self, alert_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(  # only its own device's: an update may precede its alert
                "SELECT u.kind, u.body, u.stored_at FROM updates u LEFT JOIN alerts a "
                "ON a.alert_id = u.alert_id WHERE u.alert_id = ? "
                "AND (a.device_id IS NULL OR a.device_id = u.device_id) ORDER BY u.seq",
                (alert_id,),
            ).fetchall()
        return [{"kind": k, "stored_at": t, **json.loads(b)} for k, b, t in rows]

    def voice_events(self, alert_id: str) -> list[dict[str, Any]]:
        """The alert's voice events (`voice_answer`, `voice_state`), oldest first, with
        `stored_at`: its device's only (docs/VOICE.md)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT u.body, u.stored_at FROM updates u JOIN alerts a "
                "ON a.alert_id = u.alert_id AND a.device_id = u.device_id WHERE u.alert_id = ? "
                "AND u.kind = 'event' AND json_extract(u.body, '$.type') IN "
                "('voice_answer', 'voice_state') ORDER BY u.seq", (alert_id,)).fetchall()
        return [{**json.loads(b), "stored_at": t} for b, t in rows]

    def commands(self, alert_id: str) -> list[dict[str, Any]]:
        """The commands sent about an alert, oldest first, with what became of each."""
        return self._commands_where("alert_id = ?", (alert_id,))

    def command(self, command_id: str) -> dict[str, Any] | None:
        found = self._commands_where("command_id = ?", (command_id,))
        return found[0] if found else None

    def _commands_where(self, where: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        keys = ("command_id", "alert_id", "device_id", "type", "operator", "issued_at",
                "sent_at", "routed", "result", "reason_code", "result_at", "note")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(keys)} FROM commands WHERE {where} ORDER BY issued_at",
                args).fetchall()
        return [{**dict(zip(keys, r, strict=True)), "status": command_status(r[6], r[8])}
                for r in rows]

    def undone_decisions(self, alert_id: str) -> list[dict[str, Any]]:
        """The operator's decisions on an alert that its device has not applied and that a new
        copy could get applied: per decision type with no applied command, its latest command,
        if the broker took it and it is unanswered or refused for a reason a fresh command
        overcomes (RETRYABLE_REFUSALS). A decision whose send failed is the operator's to
        repeat; one refused for good (a signature, say) is reported, not repeated."""
        undone = []
        commands = self.commands(alert_id)
        for decision in DECISIONS:
            sent = [c for c in commands if c["type"] == decision]
            if not sent or any(c["status"] == "applied" for c in sent):
                continue
            if len(sent) >= MAX_COPIES:  # e.g. a device clock far off: each copy is "expired"
                continue
            latest = sent[-1]
            if latest["status"] == "sent" or (latest["status"] == "rejected"
                                              and latest["reason_code"] in RETRYABLE_REFUSALS):
                undone.append(latest)
        return undone

    def devices(self) -> list[dict[str, Any]]:
        """Every device that ever reported a status, as `device()` gives each."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, state, last_seen, status FROM devices ORDER BY device_id"
            ).fetchall()
        return [{"device_id": d, "state": s, "last_seen": t, "status": json.loads(b)}
                for d, s, t, b in rows]

    def latest_device_events(self, *event_types: str) -> dict[str, dict[str, Any]]:
        """Per device, its newest event of any of `event_types` (e.g. `storage_alert`; or
        `tamper_opened` and `tamper_closed`: the door's latest state), with `stored_at`."""
        marks = ",".join("?" * len(event_types))
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, body, max(stored_at) FROM updates WHERE kind = 'event' "
                f"AND json_extract(body, '$.type') IN ({marks}) GROUP BY device_id", event_types
            ).fetchall()
        return {d: {**json.loads(b), "stored_at": t} for d, b, t in rows}

    def device(self, device_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state, last_seen, status FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        if row is None:
            return None
        return {"state": row[0], "last_seen": row[1], "status": json.loads(row[2])}


def command_status(sent_at: float | None, result: str | None) -> str:
    """`pending` (recorded, the broker has not taken it), `sent`, `applied`, `rejected`."""
    if result == "command_applied":
        return "applied"
    if result == "command_rejected":
        return "rejected"
    return "sent" if sent_at is not None else "pending"
