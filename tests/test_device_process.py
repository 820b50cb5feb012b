"""Real device processes (the firmware on virtual hardware) against a real broker and centre."""

from __future__ import annotations

import json

import pytest

from control_center.evidence import keys_from_fleet, verify_directory
from protocol import Topics
from tests.helpers import Device, RawClient


@pytest.fixture
def device(broker, tmp_path):
    d = Device(broker, tmp_path)
    d.start()
    d.wait_kind("link", up=True)
    yield d
    d.close()


def test_a_held_sos_reaches_the_centre_with_a_live_gps_position(device, center) -> None:
    device.press(2.0)
    record = center.wait_for(lambda: next(iter(center.store.alerts()), None))
    assert (record.device_id, record.trigger) == (device.id, "button_hold")
    assert record.position["source"] == "live"
    assert record.battery["percent"] <= 90.0
    device.wait(lambda es: "delivered" in [e.data.get("state") for e in es])


def test_a_short_hold_raises_nothing_and_a_long_hold_raises_one_alert(device, center) -> None:
    """Through a real process and real time; the exact 1.4 s / 1.6 s boundary is tested with
    exact times in test_button_logic.py and test_button_gpio.py."""
    device.press(1.0, seed=11)
    device.wait_kind("button_released")
    device.press(2.0, seed=12, gap_s=0.5)
    center.wait_for(lambda: center.store.alerts())
    device.wait_kind("trigger")  # reported after the publish: the centre can be first
    (trigger,) = device.recorder.find(kind="trigger")
    second_press = device.recorder.find(kind="button")[1]
    assert trigger.wall > second_press.wall + 1.5
    assert len(center.store.alerts()) == 1


def test_a_device_killed_after_the_press_and_before_the_puback_delivers_after_restart(
        device, broker, center) -> None:
    broker.stop()
    device.press(1.7)
    device.wait_kind("trigger")
    device.wait_kind("feedback", state="retrying")
    (trigger,) = device.recorder.find(kind="trigger")
    device.process.kill()
    assert center.store.alerts() == []

    broker.start()
    device.start()
    record = center.wait_for(lambda: center.store.alert(trigger.data["alert_id"]), timeout=30)
    assert record.duplicates == 0
    device.wait(lambda es: any(e.kind == "feedback" and e.data["state"] == "delivered"
                               and e.data["run"] == 2 for e in es), timeout=30)
    assert len(center.store.alerts()) == 1


def test_a_malformed_command_is_rejected_and_the_device_keeps_working(device, broker,
                                                                     center) -> None:
    device.press(1.7)
    record = center.wait_for(lambda: next(iter(center.store.alerts()), None))
    # From a centre identity: the broker's ACL keeps anyone else off a device's command topic,
    # so this tests the device's own validation behind it (a buggy or compromised centre).
    operator = RawClient(broker.centre, "buggy-console")
    try:
        command_topic = Topics(device.id).command
        operator.publish(command_topic, b'{"v":1,"type":"close"}')
        operator.publish(command_topic, b"\x00garbage")
        forged = {"v": 1, "command_id": "b" * 32, "type": "close", "alert_id": "f" * 32,
                  "issued_at": "2026-11-23T10:00:00.000Z", "operator": "nobody"}
        operator.publish(command_topic, json.dumps(forged).encode())
    finally:
        operator.close()
    center.service.send_command(record.alert_id, "ack", "op-1")
    device.wait(lambda es: "acknowledged" in [e.data.get("state") for e in es])
    assert "closed" not in device.feedback()
    log = device.log_file.read_text()
    assert log.count("rejected command: invalid command") == 3  # the unsigned forgery too


def test_poison_on_the_command_topic_does_not_end_the_device(device, broker, center) -> None:
    """Deep nesting made json.loads raise RecursionError past the decoder, and the device
    process exited; a huge integer is costly to parse. Each is refused with one line."""
    device.press(1.7)
    record = center.wait_for(lambda: next(iter(center.store.alerts()), None))
    operator = RawClient(broker.centre, "buggy-console")
    try:
        command_topic = Topics(device.id).command
        operator.publish(command_topic, b"[" * 5000 + b"]" * 5000)
        operator.publish(command_topic, b'{"type":"delivered","seq":' + b"9" * 4000 + b"}")
        operator.publish(command_topic, b'{"type":"delivered","seq":1,"digest":"x"}')
    finally:
        operator.close()
    center.service.send_command(record.alert_id, "ack", "op-1")
    device.wait(lambda es: "acknowledged" in [e.data.get("state") for e in es])
    assert device.process.running
    log = device.log_file.read_text()
    assert "nested 5000 deep" in log
    assert "Traceback" not in log


def test_the_cancel_gesture_is_reported_to_the_operator_and_positions_continue(
        device, center) -> None:
    device.press(1.7)
    record = center.wait_for(lambda: next(iter(center.store.alerts()), None))
    device.wait_kind("button_released")
    device.process.send({"op": "cancel", "seed": 5})
    device.wait_kind("feedback", state="cancelled")
    center.wait_for(lambda: center.store.alert(record.alert_id).cancel_requested_at)
    positions = len([u for u in center.store.updates(record.alert_id) if u["kind"] == "position"])
    center.wait_for(lambda: len([u for u in center.store.updates(record.alert_id)
                                 if u["kind"] == "position"]) > positions, timeout=15)
    assert center.store.alert(record.alert_id).status == "open"


@pytest.mark.parametrize("camera", [False, True], ids=["no-camera", "recording-camera"])
def test_a_pillar_tests_itself_at_start_up_and_reports_the_result_to_the_centre(
        broker, center, tmp_path, camera: bool) -> None:
    """With a camera, the check counts the frames the recorder's camera delivers (it cannot
    open the camera a second time)."""
    pillar = Device(broker, tmp_path, "pil-test-01", profile="pillar", camera=camera)
    pillar.start()
    try:
        def reported():
            device = center.store.device("pil-test-01")
            return device and device["status"].get("selftest")

        selftest = center.wait_for(reported, timeout=30)
        assert selftest == {"at": selftest["at"], "ok": True, "failed": []}
        # It judged its own link: a second connection as itself would have kicked it off.
        assert [e.data["up"] for e in pillar.recorder.find(kind="link")] == [True]
    finally:
        pillar.close()


def test_an_sos_on_a_token_records_evidence_that_verifies(broker, center, tmp_path) -> None:
    token = Device(broker, tmp_path, "tok-cam-01", camera=True)
    token.start()
    try:
        token.wait_kind("link", up=True)
        token.press(1.7)
        record = center.wait_for(lambda: next(iter(center.store.alerts()), None))
        token.wait_kind("segment", timeout=30)
        center.service.send_command(record.alert_id, "close", "op-1")
        token.wait_kind("feedback", state="closed")
    finally:
        token.close()  # a clean stop commits the open segment
    report = verify_directory(token.recordings, keys_from_fleet(broker.fleet.directory))
    assert report.ok, report.summary()
    manifests = [json.loads(p.read_text()) for p in sorted(token.recordings.glob("*.json"))]
    assert manifests and all("evidence" in m["flags"] for m in manifests)
