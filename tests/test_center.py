"""The control centre against a real Mosquitto over TLS."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading

import pytest

from control_center.store import Store
from protocol import Topics, encode
from protocol.messages import MessageKind
from tests.helpers import RawClient, alert_message, device_signer


def sign(broker, message: dict) -> dict:
    return device_signer(broker, message["device_id"]).sign(message)


@pytest.fixture
def device(broker):
    client = RawClient(broker.identity("tok-001"), "tok-001")
    yield client
    client.close()


def test_a_replayed_alert_is_stored_once_and_logged(broker, center, device, caplog) -> None:
    caplog.set_level(logging.INFO, "sos.center")
    message = alert_message()
    device.publish(Topics("tok-001").alert, encode(MessageKind.ALERT, sign(broker, message)))
    device.publish(Topics("tok-001").alert, encode(MessageKind.ALERT, sign(broker, message)))
    center.wait_for(lambda: any(e.kind == "alert" and not e.new for e in center.events))
    assert center.store.alert(message["alert_id"]).duplicates == 1
    assert len(center.store.alerts()) == 1
    assert sum(1 for e in center.events if e.kind == "alert" and e.new) == 1
    assert any("received again" in r.message for r in caplog.records)


def test_a_malformed_alert_is_rejected_with_a_log_line_and_not_stored(broker, center, device,
                                                                     caplog) -> None:
    caplog.set_level(logging.ERROR, "sos.center")
    device.publish(Topics("tok-001").alert, b'{"v":1,"alert_id":"nope"}')
    good = alert_message()
    device.publish(Topics("tok-001").alert, encode(MessageKind.ALERT, sign(broker, good)))
    center.wait_for(lambda: center.store.alert(good["alert_id"]))
    assert len(center.store.alerts()) == 1
    assert any("rejected message from tok-001" in r.message for r in caplog.records)


def test_a_message_claiming_another_device_is_rejected(broker, center, device,
                                                      caplog) -> None:
    caplog.set_level(logging.ERROR, "sos.center")
    forged = alert_message(device_id="tok-999")
    device.publish(Topics("tok-001").alert, encode(MessageKind.ALERT, sign(broker, forged)))
    good = alert_message()
    device.publish(Topics("tok-001").alert, encode(MessageKind.ALERT, sign(broker, good)))
    center.wait_for(lambda: center.store.alert(good["alert_id"]))
    assert center.store.alert(forged["alert_id"]) is None
    assert any("claims to come from tok-999" in r.message for r in caplog.records)


def test_the_last_will_marks_the_devices_open_alert_offline(broker, center) -> None:
    topics = Topics("tok-002")
    will = encode(MessageKind.STATUS, {"v": 1, "device_id": "tok-002", "state": "offline"})
    doomed = RawClient(broker.identity("tok-002"), "tok-002", will=(topics.status, will))
    message = alert_message(device_id="tok-002")
    doomed.publish(topics.alert, encode(MessageKind.ALERT, sign(broker, message)))
    center.wait_for(lambda: center.store.alert(message["alert_id"]))
    doomed.drop()
    center.wait_for(lambda: center.store.alert(message["alert_id"]).device_offline)
    assert center.store.device("tok-002")["state"] == "offline"


def answer(broker, device: RawClient, command: dict, seq: int,
           reason_code: str | None = None) -> None:
    """What the device does with a command: its signed command_applied, or command_rejected
    with a reason code."""
    event = {"v": 1, "device_id": "tok-001", "seq": seq, "alert_id": command["alert_id"],
             "created_at": "2026-11-23T10:00:03.000Z", "command_id": command["command_id"],
             "type": "command_rejected" if reason_code else "command_applied"}
    if reason_code:
        event["reason_code"] = reason_code
    device.publish(Topics("tok-001").event, encode(MessageKind.EVENT, sign(broker, event)))


def raised_and_ordered(broker, center, device, decision: str = "ack") -> dict:
    """An alert stored at the centre and the operator's decision received by the device."""
    device.subscribe(Topics("tok-001").command)
    message = alert_message()
    device.publish(Topics("tok-001").alert, encode(MessageKind.ALERT, sign(broker, message)))
    center.wait_for(lambda: center.store.alert(message["alert_id"]))
    sent = center.service.send_command(message["alert_id"], decision, "op-7")
    received = device.wait_messages(2)  # the alert's delivery receipt, then the command
    assert {topic for topic, _ in received} == {Topics("tok-001").command}
    (command,) = [m for _, p in received if (m := json.loads(p))["type"] != "delivered"]
    assert command["command_id"] == sent["command_id"] and sent["status"] == "sent"
    return command


def test_an_ack_the_broker_took_leaves_the_alert_open_until_the_device_applies_it(
        broker, center, device) -> None:
    command = raised_and_ordered(broker, center, device)
    assert (command["type"], command["operator"]) == ("ack", "op-7")
    assert center.store.alert(command["alert_id"]).status == "open"
    answer(broker, device, command, seq=2)
    center.wait_for(lambda: center.store.alert(command["alert_id"]).status == "acknowledged")
    assert center.store.alert(command["alert_id"]).acked_by == "op-7"
    assert center.store.command(command["command_id"])["status"] == "applied"


def test_a_refused_command_records_its_reason_code_and_the_alert_stays_open(
        broker, center, device) -> None:
    command = raised_and_ordered(broker, center, device, "close")
    answer(broker, device, command, seq=2, reason_code="bad_signature")
    center.wait_for(lambda: center.store.command(command["command_id"])["status"] == "rejected")
    assert center.store.command(command["command_id"])["reason_code"] == "bad_signature"
    assert center.store.alert(command["alert_id"]).status == "open"


def test_two_instances_in_one_group_split_alerts_and_store_each_once(broker, tmp_path,
                                                                     device) -> None:
    store = Store(tmp_path / "shared.sqlite")
    seen: dict[str, list[str]] = {"a": [], "b": []}
    changed = threading.Condition()

    def record(name: str, event) -> None:
        with changed:
            seen[name].append(event.message["alert_id"])
            changed.notify_all()

    services = [broker.centre_service(store, identity=f"centre.{name}",
                                      on_event=lambda e, n=name: record(n, e))
                for name in seen]
    for service in services:
        service.start()
    try:
        sent = [alert_message(seq=i + 1) for i in range(20)]
        for message in sent:
            payload = encode(MessageKind.ALERT, sign(broker, message))
            device.publish(Topics("tok-001").alert, payload)
        with changed:
            assert changed.wait_for(lambda: len(seen["a"]) + len(seen["b"]) >= 20, 15)
        assert sorted(seen["a"] + seen["b"]) == sorted(m["alert_id"] for m in sent)
        assert seen["a"] and seen["b"], "one instance took every alert"
        assert len(store.alerts()) == 20
    finally:
        for service in services:
            service.stop()
        store.close()


def test_a_decision_the_device_missed_is_sent_again_when_it_reports_back(broker, center,
                                                                        caplog) -> None:
    caplog.set_level(logging.WARNING, "sos.center")
    message = alert_message(device_id="tok-003")
    topics = Topics("tok-003")
    sender = RawClient(broker.identity("tok-003"), "tok-003-first")
    sender.publish(topics.alert, encode(MessageKind.ALERT, sign(broker, message)))
    center.wait_for(lambda: center.store.alert(message["alert_id"]))
    sender.close()

    sent = center.service.send_command(message["alert_id"], "ack", "op-2")  # PUBACK 16
    assert not sent["delivered"]
    assert center.store.alert(message["alert_id"]).status == "open"
    assert any("not connected" in r.message for r in caplog.records)

    device = RawClient(broker.identity("tok-003"), "tok-003")
    try:
        device.subscribe(topics.command)
        status = {"v": 1, "device_id": "tok-003", "state": "online",
                  "active_alert_id": message["alert_id"], "active_alert_stage": "delivered"}
        device.publish(topics.status, encode(MessageKind.STATUS, status))
        ((_, payload),) = device.wait_messages(1)
        resent = json.loads(payload)
        assert (resent["type"], resent["operator"]) == ("ack", "op-2")
        assert resent["command_id"] != sent["command_id"]  # a new command, in its time window
    finally:
        device.close()


def test_a_decision_refused_as_expired_is_sent_again_when_the_device_reports_back(
        broker, center, device) -> None:
    """It waited in the broker's queue for the device past its time window."""
    command = raised_and_ordered(broker, center, device, "close")
    answer(broker, device, command, seq=2, reason_code="expired")
    center.wait_for(lambda: center.store.command(command["command_id"])["status"] == "rejected")
    status = {"v": 1, "device_id": "tok-001", "state": "online",
              "active_alert_id": command["alert_id"], "active_alert_stage": "delivered"}
    device.publish(Topics("tok-001").status, encode(MessageKind.STATUS, status))
    messages = device.wait_messages(4)  # receipts of the alert and the event, two closes
    closes = [m for _, p in messages if (m := json.loads(p))["type"] == "close"]
    assert [c["command_id"] == command["command_id"] for c in closes] == [True, False]


@pytest.mark.parametrize("signing", ["unsigned", "another key"])
def test_an_alert_without_the_devices_signature_is_rejected(broker, center, device, caplog,
                                                           signing: str) -> None:
    caplog.set_level(logging.ERROR, "sos.center")
    bad = alert_message()
    if signing == "another key":
        bad = device_signer(broker, "tok-other").sign(bad)
    device.publish(Topics("tok-001").alert, encode(MessageKind.ALERT, bad))
    good = alert_message()
    device.publish(Topics("tok-001").alert, encode(MessageKind.ALERT, sign(broker, good)))
    center.wait_for(lambda: center.store.alert(good["alert_id"]))
    assert center.store.alert(bad["alert_id"]) is None
    expected = "unsigned" if signing == "unsigned" else "bad signature"
    assert any(expected in r.message and "rejected alert from tok-001" in r.message
               for r in caplog.records)


def test_a_message_the_centre_fails_to_store_gets_no_receipt_and_is_stored_when_sent_again(
        broker, center, device, caplog, monkeypatch) -> None:
    """The centre acknowledges every message at the MQTT level (a poison message must not fill
    the broker's in-flight window); the device's re-send, for want of a receipt, recovers."""
    caplog.set_level(logging.ERROR, "sos.center")
    real_add = center.store.add_alert
    failures = iter([sqlite3.OperationalError("database is locked")])

    def flaky_add(*args):  # the storage fails once, as a locked database does
        failure = next(failures, None)
        if failure:
            raise failure
        return real_add(*args)

    monkeypatch.setattr(center.store, "add_alert", flaky_add)
    device.subscribe(Topics("tok-001").command)
    message = alert_message()
    payload = encode(MessageKind.ALERT, sign(broker, message))
    device.publish(Topics("tok-001").alert, payload)
    center.wait_for(lambda: any("no receipt sent" in r.message for r in caplog.records))
    assert center.store.alert(message["alert_id"]) is None
    device.publish(Topics("tok-001").alert, payload)  # what the device does without a receipt
    center.wait_for(lambda: center.store.alert(message["alert_id"]))
    ((_, receipt),) = device.wait_messages(1)
    assert json.loads(receipt)["type"] == "delivered"
    assert json.loads(receipt)["alert_id"] == message["alert_id"]


def storage_alert(broker, seq: int = 9) -> dict:
    event = {"v": 1, "device_id": "tok-001", "seq": seq, "created_at": "2026-11-23T10:00:00.000Z",
             "type": "storage_alert", "reason": "storage low: ordinary recording stopped",
             "storage": {"free_mb": 40.0, "mode": "evidence_only", "deleted_unuploaded": 0}}
    return device_signer(broker, "tok-001").sign(event)


def test_a_devices_storage_alert_reaches_the_centre(broker, center, device) -> None:
    event = storage_alert(broker)
    device.publish(Topics("tok-001").event, encode(MessageKind.EVENT, event))
    center.wait_for(lambda: any(e.kind == "event" and e.message["type"] == "storage_alert"
                                for e in center.events))
    (stored,) = center.store.updates("")  # a device-level event belongs to no alert
    assert stored["storage"]["mode"] == "evidence_only"


def test_an_observer_that_fails_does_not_block_the_acknowledgement(broker, tmp_path, device,
                                                                   caplog) -> None:
    """A console that misreads a message must not leave it unacknowledged (the broker would
    hand it over again and again)."""
    caplog.set_level(logging.ERROR, "sos.center")
    seen: list[str] = []
    changed = threading.Condition()

    def broken_console(event) -> None:
        if event.kind == "alert":
            with changed:
                seen.append(event.message["alert_id"])
                changed.notify_all()
        raise KeyError("alert_id")

    store = Store(tmp_path / "c.sqlite")
    service = broker.centre_service(store, on_event=broken_console)
    service.start()
    try:
        sent = [alert_message(), alert_message(seq=2)]
        for message in sent:
            payload = encode(MessageKind.ALERT, sign(broker, message))
            device.publish(Topics("tok-001").alert, payload)
        with changed:
            assert changed.wait_for(lambda: len(seen) >= 2, 15)
        assert all(store.alert(m["alert_id"]) for m in sent)
        messages = [r.message for r in caplog.records]
        assert any("observer failed" in m for m in messages)
        assert not any("no receipt sent" in m for m in messages)
    finally:
        service.stop()
        store.close()
