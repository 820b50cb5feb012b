"""The durable outbox: order, sequence numbers, crash survival, and a full disk."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from firmware.uplink.outbox import Outbox, OutboxFull
from firmware.uplink.outgoing import Outgoing
from protocol import MessageKind, Topics, new_id

TOPICS = Topics("tok-001")
NO_POSITION = {"source": "none", "lat": None, "lon": None, "alt_m": None, "accuracy_m": None,
               "fix_time": None, "age_s": None}


def alert(alert_id: str | None = None) -> Outgoing:
    return Outgoing(MessageKind.ALERT, TOPICS.alert, {
        "v": 1, "alert_id": alert_id or new_id(), "device_id": "tok-001", "device_kind": "token",
        "trigger": "button_hold", "created_at": "2026-11-23T10:00:00.000Z",
        "position": NO_POSITION, "battery": {"percent": 80, "charging": False}})


def position(alert_id: str) -> Outgoing:
    return Outgoing(MessageKind.POSITION, TOPICS.position, {
        "v": 1, "alert_id": alert_id, "device_id": "tok-001",
        "created_at": "2026-11-23T10:00:05.000Z", "position": NO_POSITION, "battery": None})


def test_rows_get_increasing_sequence_numbers_and_come_back_in_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    first = box.append([alert()])
    second = box.append([alert(), alert()])
    assert [r.seq for r in first + second] == [1, 2, 3]
    assert [r.seq for r in box.pending()] == [1, 2, 3]


def test_pending_rows_and_state_survive_reopening(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    rows = box.append([alert()], state={"active": {"alert_id": "x", "stage": "sending"}})
    box.close()  # a crash leaves the file as a clean close does: WAL + synchronous=FULL
    reopened = Outbox(tmp_path / "o.sqlite")
    assert reopened.pending() == rows
    assert reopened.load_state() == {"active": {"alert_id": "x", "stage": "sending"}}


def test_sequence_numbers_never_repeat_after_rows_are_removed_and_reopened(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    (row,) = box.append([alert()])
    box.remove(row.seq)
    box.close()
    (again,) = Outbox(tmp_path / "o.sqlite").append([alert()])
    assert again.seq == row.seq + 1


def test_removed_row_is_no_longer_pending(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    a, b = box.append([alert(), alert()])
    box.remove(a.seq)
    assert box.pending() == [b]


def test_old_positions_are_shed_but_alerts_never(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_positions=3)
    (kept_alert,) = box.append([alert()])
    for _ in range(5):
        box.append([position(new_id())])
    kinds = [r.kind for r in box.pending()]
    assert kinds == [MessageKind.ALERT] + [MessageKind.POSITION] * 3
    assert box.pending()[0] == kept_alert
    assert [r.seq for r in box.pending()[1:]] == [4, 5, 6]


def test_a_message_that_breaks_its_schema_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    broken = alert()
    broken.message["trigger"] = "sneeze"
    with pytest.raises(ValueError, match="trigger"):
        box.append([alert(), broken])
    assert box.pending() == []


def test_full_storage_raises_outbox_full_and_volatile_rows_keep_the_sequence(
        tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    box.append([alert()])
    # Freeze the database at its current size: SQLite then fails as on a full disk.
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    box._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(OutboxFull, match="full"):
        for _ in range(200):
            box.append([alert()])
    (volatile,) = box.volatile_rows([alert()])
    assert volatile.seq > max(r.seq for r in box.pending())


def test_outbox_file_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    Outbox(tmp_path / "o.sqlite")
    db = sqlite3.connect(tmp_path / "o.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
