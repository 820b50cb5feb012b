"""The centre's record of operator decisions: in effect only once the device applied them."""

from __future__ import annotations

import sqlite3
from itertools import count
from pathlib import Path

import pytest

from control_center.store import MAX_COPIES, Store
from protocol import new_id
from tests.helpers import alert_message

_seq = count(100)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store(tmp_path / "c.sqlite")
    yield opened
    opened.close()


@pytest.fixture
def alert(store: Store) -> dict:
    message = alert_message()
    store.add_alert(message, stored_at=1.0)
    return message


def sent(store: Store, alert: dict, decision: str, operator: str = "op-7", *,
         at: float = 2.0, routed: bool = True) -> str:
    """A decision recorded and taken by the broker, as CenterService.send_command leaves it."""
    command_id = new_id()
    store.add_command({"command_id": command_id, "type": decision, "alert_id": alert["alert_id"],
                       "operator": operator, "issued_at": f"2026-11-23T10:00:{at:06.3f}Z"},
                      alert["device_id"])
    store.mark_sent(command_id, at, routed=routed)
    return command_id


def answer(store: Store, command_id: str, alert: dict, *, device_id: str = "tok-001",
           reason_code: str | None = None, at: float = 3.0) -> None:
    """The device's command_applied (or, with a reason code, command_rejected) event."""
    event = {"v": 1, "device_id": device_id, "seq": next(_seq), "alert_id": alert["alert_id"],
             "created_at": "2026-11-23T10:00:03.000Z", "command_id": command_id,
             "type": "command_rejected" if reason_code else "command_applied"}
    if reason_code:
        event["reason_code"] = reason_code
    store.add_update("event", event, stored_at=at)


def test_a_sent_ack_leaves_the_alert_open(store: Store, alert: dict) -> None:
    command_id = sent(store, alert, "ack")
    assert store.alert(alert["alert_id"]).status == "open"
    assert store.command(command_id)["status"] == "sent"


def test_the_devices_applied_ack_marks_the_alert_with_the_commands_operator(
        store: Store, alert: dict) -> None:
    answer(store, sent(store, alert, "ack", "op-7"), alert, at=3.5)
    record = store.alert(alert["alert_id"])
    assert (record.status, record.acked_by, record.acked_at) == ("acknowledged", "op-7", 3.5)


def test_the_devices_applied_close_closes_the_alert(store: Store, alert: dict) -> None:
    answer(store, sent(store, alert, "close", "op-9"), alert)
    record = store.alert(alert["alert_id"])
    assert (record.status, record.closed_by) == ("closed", "op-9")


def test_a_rejection_records_its_reason_code_and_changes_nothing_on_the_alert(
        store: Store, alert: dict) -> None:
    command_id = sent(store, alert, "close")
    answer(store, command_id, alert, reason_code="expired")
    command = store.command(command_id)
    assert (command["status"], command["reason_code"]) == ("rejected", "expired")
    assert store.alert(alert["alert_id"]).status == "open"


def test_an_answer_from_another_device_changes_nothing(store: Store, alert: dict) -> None:
    command_id = sent(store, alert, "close")
    answer(store, command_id, {"alert_id": new_id()}, device_id="tok-002")
    assert store.command(command_id)["status"] == "sent"
    assert store.alert(alert["alert_id"]).status == "open"


def test_applied_is_final_a_later_refusal_of_a_copy_does_not_undo_it(store: Store,
                                                                     alert: dict) -> None:
    command_id = sent(store, alert, "ack")
    answer(store, command_id, alert)
    answer(store, command_id, alert, reason_code="expired")
    assert store.command(command_id)["status"] == "applied"


def test_an_unanswered_decision_is_undone(store: Store, alert: dict) -> None:
    command_id = sent(store, alert, "ack")
    assert [c["command_id"] for c in store.undone_decisions(alert["alert_id"])] == [command_id]


def test_a_decision_applied_through_any_of_its_copies_is_done(store: Store, alert: dict) -> None:
    sent(store, alert, "ack")  # missed by the device
    answer(store, sent(store, alert, "ack", at=5.0), alert)
    assert store.undone_decisions(alert["alert_id"]) == []


@pytest.mark.parametrize(("reason_code", "undone"), [("expired", True), ("replayed", True),
                                                     ("bad_signature", False),
                                                     ("not_active_alert", False)])
def test_only_a_refusal_a_new_command_overcomes_leaves_the_decision_undone(
        store: Store, alert: dict, reason_code: str, undone: bool) -> None:
    answer(store, sent(store, alert, "close"), alert, reason_code=reason_code)
    assert bool(store.undone_decisions(alert["alert_id"])) is undone


def test_a_decision_the_broker_never_took_is_the_operators_to_repeat(store: Store,
                                                                    alert: dict) -> None:
    store.add_command({"command_id": new_id(), "type": "ack", "alert_id": alert["alert_id"],
                       "operator": "op-7", "issued_at": "2026-11-23T10:00:02.000Z"},
                      alert["device_id"])
    assert store.undone_decisions(alert["alert_id"]) == []


def test_another_centres_applied_close_closes_the_alert_here_too(store: Store,
                                                                 alert: dict) -> None:
    """A partner closed it: our store has no such command, the device's event says what it was."""
    event = {"v": 1, "device_id": "tok-001", "seq": next(_seq), "alert_id": alert["alert_id"],
             "created_at": "2026-11-23T10:00:03.000Z", "command_id": new_id(),
             "type": "command_applied", "command_type": "close"}
    store.add_update("event", event, stored_at=3.0)
    record = store.alert(alert["alert_id"])
    assert (record.status, record.closed_by) == ("closed", "another centre")


def test_a_close_the_device_finds_already_ended_closes_the_alert(store: Store,
                                                                 alert: dict) -> None:
    command_id = sent(store, alert, "close", "op-2")
    answer(store, command_id, alert, reason_code="not_active_alert")
    record = store.alert(alert["alert_id"])
    assert record.status == "closed"
    assert record.closed_by == "op-2 (already ended on the device)"
    assert store.undone_decisions(alert["alert_id"]) == []


def test_a_decision_refused_again_and_again_is_not_sent_for_ever(store: Store,
                                                                 alert: dict) -> None:
    """A device clock far off makes every copy "expired": after MAX_COPIES the operator
    decides, instead of one more copy at every status."""
    for n in range(MAX_COPIES):
        answer(store, sent(store, alert, "ack", at=2.0 + n), alert, reason_code="expired")
        if n < MAX_COPIES - 1:
            assert [c["type"] for c in store.undone_decisions(alert["alert_id"])] == ["ack"]
    assert store.undone_decisions(alert["alert_id"]) == []


def test_a_decision_recorded_before_the_upgrade_is_sent_again(tmp_path: Path) -> None:
    """The release before marked the alert decided on the broker's word and kept no sent_at:
    its unanswered command must still reach a device that missed it."""
    path = tmp_path / "old.sqlite"
    old = Store(path)
    alert = alert_message()
    old.add_alert(alert, stored_at=1.0)
    old.close()
    raw = sqlite3.connect(path)
    raw.execute("DROP TABLE commands")
    raw.execute("CREATE TABLE commands (command_id TEXT PRIMARY KEY, alert_id TEXT NOT NULL, "
                "device_id TEXT NOT NULL, type TEXT NOT NULL, operator TEXT NOT NULL, "
                "issued_at TEXT NOT NULL, result TEXT, result_at REAL)")
    raw.execute("INSERT INTO commands VALUES (?,?,?,?,?,?,NULL,NULL)",
                (new_id(), alert["alert_id"], "tok-001", "close", "op-1",
                 "2026-11-23T10:00:05.000Z"))
    raw.commit()
    raw.close()
    upgraded = Store(path)
    try:
        (undone,) = upgraded.undone_decisions(alert["alert_id"])
        assert (undone["type"], undone["routed"]) == ("close", 0)
        assert undone["sent_at"] == pytest.approx(1795428005.0)
    finally:
        upgraded.close()
