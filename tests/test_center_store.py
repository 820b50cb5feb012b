"""The centre's store: de-duplication and messages that overtake each other."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from control_center.store import NotTheSame, NotYours, Store
from tests.helpers import alert_message


def cancel_event(alert_id: str, seq: int) -> dict:
    return {"v": 1, "alert_id": alert_id, "device_id": "tok-001", "seq": seq,
            "created_at": "2026-11-23T10:00:09.000Z", "type": "cancel_requested"}


def test_a_cancel_request_that_arrives_before_its_alert_is_not_lost(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite")
    alert = alert_message(seq=5)
    assert store.add_update("event", cancel_event(alert["alert_id"], 6), stored_at=1.0).new
    assert store.add_alert(alert, stored_at=2.0).new
    assert store.alert(alert["alert_id"]).cancel_requested_at == "2026-11-23T10:00:09.000Z"


def test_an_alert_without_a_cancel_has_none(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite")
    alert = alert_message()
    store.add_alert(alert, stored_at=1.0)
    assert store.alert(alert["alert_id"]).cancel_requested_at is None


def test_a_second_close_keeps_the_first_close_time_and_operator(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite")
    alert = alert_message()
    store.add_alert(alert, stored_at=1.0)
    store.mark(alert["alert_id"], "close", "op-1", at=10.0)
    store.mark(alert["alert_id"], "close", "op-2", at=20.0)
    record = store.alert(alert["alert_id"])
    assert (record.closed_at, record.closed_by) == (10.0, "op-1")


def test_a_resend_is_stored_once_and_reports_when_it_was_first_stored(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite")
    alert = alert_message()
    assert store.add_alert(alert, stored_at=1.0, digest="a" * 64).new
    again = store.add_alert(alert, stored_at=5.0, digest="a" * 64)
    assert (again.new, again.stored_at) == (False, 1.0)
    assert store.alert(alert["alert_id"]).duplicates == 1


def test_a_resend_with_other_bytes_is_refused(tmp_path: Path) -> None:
    """No receipt may say bytes were stored that were not."""
    store = Store(tmp_path / "c.sqlite")
    alert = alert_message()
    store.add_alert(alert, stored_at=1.0, digest="a" * 64)
    with pytest.raises(NotTheSame):
        store.add_alert(alert, stored_at=2.0, digest="b" * 64)
    event = cancel_event(alert["alert_id"], 6)
    store.add_update("event", event, stored_at=1.0, digest="c" * 64)
    with pytest.raises(NotTheSame):
        store.add_update("event", event, stored_at=2.0, digest="d" * 64)


def test_an_update_sent_before_another_devices_alert_never_joins_its_history(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite")
    alert = alert_message(device_id="tok-001")
    rogue = {**cancel_event(alert["alert_id"], 6), "device_id": "tok-002"}
    store.add_update("event", rogue, stored_at=1.0)  # the alert is not known yet
    store.add_alert(alert, stored_at=2.0)
    assert store.updates(alert["alert_id"]) == []
    assert store.alert(alert["alert_id"]).cancel_requested_at is None
    with pytest.raises(NotYours):
        store.add_update("event", {**rogue, "seq": 7}, stored_at=3.0)


def test_a_store_made_before_receipts_gains_the_digest_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE alerts (alert_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, "
                      "device_kind TEXT NOT NULL, seq INTEGER NOT NULL, trigger TEXT NOT NULL, "
                      "created_at TEXT NOT NULL, position TEXT NOT NULL, battery TEXT, "
                      "stored_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'open', "
                      "device_offline INTEGER NOT NULL DEFAULT 0, cancel_requested_at TEXT, "
                      "acked_at REAL, acked_by TEXT, closed_at REAL, closed_by TEXT, "
                      "duplicates INTEGER NOT NULL DEFAULT 0);")
    old.close()
    store = Store(path)
    alert = alert_message()
    assert store.add_alert(alert, stored_at=1.0, digest="a" * 64).new
