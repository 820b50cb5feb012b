"""The centre facing a misbehaving or re-keyed device, against a real broker (issue 10)."""

from __future__ import annotations

import dataclasses
import logging

from control_center.fleet import Fleet
from protocol import MessageKind, Topics, encode
from protocol.signing import Signer, load_or_make_key
from tests.helpers import RawClient, alert_message, device_signer

POISON = {
    "nested arrays": b"[" * 5000 + b"]" * 5000,
    "nested objects": b'{"a":' * 3000 + b"1" + b"}" * 3000,
    "an integer beyond 64 bits": b'{"v":1,"seq":' + b"9" * 30 + b"}",
    "a 4000-digit integer": b'{"v":1,"seq":' + b"9" * 4000 + b"}",
}


def signed_alert(broker, device_id: str = "tok-001", **overrides) -> tuple[dict, bytes]:
    message = device_signer(broker, device_id).sign(alert_message(device_id=device_id,
                                                                  **overrides))
    return message, encode(MessageKind.ALERT, message)


def test_poison_messages_are_dropped_and_the_centre_keeps_receiving(broker, center,
                                                                     caplog) -> None:
    """More poison than the broker's in-flight window (20): had the centre left them
    unacknowledged, nothing after them would ever arrive, even after a restart."""
    caplog.set_level(logging.ERROR, "sos.center")
    device = RawClient(broker.identity("tok-001"), "tok-001")
    try:
        for payload in POISON.values():
            for _ in range(10):
                device.publish(Topics("tok-001").alert, payload)
        good, payload = signed_alert(broker)
        device.publish(Topics("tok-001").alert, payload)
        center.wait_for(lambda: center.store.alert(good["alert_id"]))
    finally:
        device.close()
    refusals = [r.message for r in caplog.records if "rejected message from tok-001" in r.message]
    assert len(refusals) == len(POISON), "each poison payload is logged once, however often sent"
    assert any("nested" in text for text in refusals)
    assert any("64-bit" in text for text in refusals)


def test_a_reflashed_device_is_trusted_with_its_new_key_without_a_restart(broker, center,
                                                                         tmp_path) -> None:
    first, payload = signed_alert(broker)
    device = RawClient(broker.identity("tok-001"), "tok-001")
    device.publish(Topics("tok-001").alert, payload)
    center.wait_for(lambda: center.store.alert(first["alert_id"]))
    device.close()

    # Re-flashed: new TLS and signing keys, enrolled by another process (`sos-center ca`).
    flashed = tmp_path / "reflashed"
    pair = Fleet(broker.fleet.directory).enrol_local("tok-001", "token", flashed)
    new_signer = Signer(load_or_make_key(flashed / "signing.key"))
    again = new_signer.sign(alert_message(device_id="tok-001", seq=2))
    identity = broker.identity("tok-001")
    reflashed = RawClient(dataclasses.replace(identity, cert_file=str(pair.cert_file),
                                              key_file=str(pair.key_file)), "tok-001")
    try:
        reflashed.publish(Topics("tok-001").alert, encode(MessageKind.ALERT, again))
        center.wait_for(lambda: center.store.alert(again["alert_id"]))
    finally:
        reflashed.close()


def test_a_revoked_devices_alerts_are_refused_by_the_running_centre(broker, center,
                                                                    caplog) -> None:
    caplog.set_level(logging.ERROR, "sos.center")
    device = RawClient(broker.identity("tok-001"), "tok-001")
    other = RawClient(broker.identity("tok-002"), "tok-002")
    try:
        first, payload = signed_alert(broker)
        device.publish(Topics("tok-001").alert, payload)
        center.wait_for(lambda: center.store.alert(first["alert_id"]))

        Fleet(broker.fleet.directory).revoke("tok-001")  # as `sos-center ca revoke` does
        after, payload = signed_alert(broker, seq=2)
        device.publish(Topics("tok-001").alert, payload)
        marker, payload = signed_alert(broker, "tok-002")  # handled after the one above
        other.publish(Topics("tok-002").alert, payload)
        center.wait_for(lambda: center.store.alert(marker["alert_id"]))
        assert center.store.alert(after["alert_id"]) is None
        assert any("rejected alert from tok-001" in r.message for r in caplog.records)
    finally:
        device.close()
        other.close()


def test_an_event_naming_another_devices_alert_changes_nothing(broker, center,
                                                               caplog) -> None:
    caplog.set_level(logging.ERROR, "sos.center")
    victim = RawClient(broker.identity("tok-001"), "tok-001")
    rogue = RawClient(broker.identity("tok-002"), "tok-002")
    try:
        alert, payload = signed_alert(broker)
        victim.publish(Topics("tok-001").alert, payload)
        center.wait_for(lambda: center.store.alert(alert["alert_id"]))

        cancel = device_signer(broker, "tok-002").sign({
            "v": 1, "device_id": "tok-002", "seq": 5, "created_at": "2026-11-23T10:00:02.000Z",
            "type": "cancel_requested", "alert_id": alert["alert_id"]})
        rogue.publish(Topics("tok-002").event, encode(MessageKind.EVENT, cancel))
        hijack = device_signer(broker, "tok-002").sign(
            alert_message(device_id="tok-002", seq=6, alert_id=alert["alert_id"]))
        rogue.publish(Topics("tok-002").alert, encode(MessageKind.ALERT, hijack))
        marker, payload = signed_alert(broker, "tok-002", seq=7)
        rogue.publish(Topics("tok-002").alert, payload)
        center.wait_for(lambda: center.store.alert(marker["alert_id"]))
    finally:
        victim.close()
        rogue.close()
    record = center.store.alert(alert["alert_id"])
    assert (record.device_id, record.cancel_requested_at, record.duplicates) == \
        ("tok-001", None, 0)
    assert center.store.updates(alert["alert_id"]) == []
    refusals = [r.message for r in caplog.records if "raised by tok-001" in r.message]
    assert len(refusals) == 2
