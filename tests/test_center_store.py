"""The centre's store: de-duplication and messages that overtake each other."""

from __future__ import annotations

from pathlib import Path

from control_center.store import Store
from tests.helpers import alert_message


def cancel_event(alert_id: str, seq: int) -> dict:
    return {"v": 1, "alert_id": alert_id, "device_id": "tok-001", "seq": seq,
            "created_at": "2026-11-23T10:00:09.000Z", "type": "cancel_requested"}


def test_a_cancel_request_that_arrives_before_its_alert_is_not_lost(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite")
    alert = alert_message(seq=5)
    assert store.add_update("event", cancel_event(alert["alert_id"], 6), stored_at=1.0)
    assert store.add_alert(alert, stored_at=2.0)
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
