"""Fleet identity against a real Mosquitto with the generated configuration (mutual TLS, ACL)."""

from __future__ import annotations

import logging
import queue
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from control_center import pki
from control_center.fleet import FleetError
from firmware.uplink.mqtt import Connected, MqttUplink
from firmware.uplink.outbox import Outbox
from protocol import MessageKind, Topics, encode
from protocol.mqtt import make_client
from tests.helpers import RawClient, alert_message

NOT_AUTHORIZED = 135


def puback_reason(client: RawClient, topic: str, payload: bytes) -> int:
    done: queue.Queue[int] = queue.Queue()
    client.client.on_publish = lambda c, u, mid, rc, props: done.put(rc.value)
    client.client.publish(topic, payload, qos=1)
    return done.get(timeout=10)


def suback_reason(client: RawClient, topic: str) -> int:
    done: queue.Queue[int] = queue.Queue()
    client.client.on_subscribe = lambda c, u, mid, rcs, props: done.put(rcs[0].value)
    client.client.subscribe(topic, qos=1)
    return done.get(timeout=10)


def test_a_device_cannot_publish_as_another_device(broker) -> None:
    device = RawClient(broker.identity("tok-001"), "tok-001")
    try:
        forged = encode(MessageKind.ALERT, alert_message(device_id="tok-002"))
        assert puback_reason(device, Topics("tok-002").alert, forged) == NOT_AUTHORIZED
        own = encode(MessageKind.ALERT, alert_message(device_id="tok-001"))
        assert puback_reason(device, Topics("tok-001").alert, own) < 0x80
    finally:
        device.close()


def test_a_device_cannot_read_another_devices_commands(broker) -> None:
    """The broker refuses the SUBACK (dynamic-security subscribe rules), and delivery is checked
    too: the centre sends to tok-002, then to tok-001; MQTT keeps one publisher's order, so had
    the first reached tok-001 it would have arrived before the second."""
    snooper = RawClient(broker.identity("tok-001"), "tok-001")
    centre = RawClient(broker.centre, "centre-test")
    try:
        assert suback_reason(snooper, Topics("tok-002").command) == NOT_AUTHORIZED
        assert suback_reason(snooper, Topics("tok-001").command) < 0x80
        centre.publish(Topics("tok-002").command, b"for tok-002 only")
        centre.publish(Topics("tok-001").command, b"for tok-001")
        assert snooper.wait_messages(1) == [(Topics("tok-001").command, b"for tok-001")]
    finally:
        snooper.close()
        centre.close()


def test_a_device_cannot_send_commands(broker) -> None:
    device = RawClient(broker.identity("tok-001"), "tok-001")
    try:
        assert puback_reason(device, Topics("tok-002").command, b"{}") == NOT_AUTHORIZED
    finally:
        device.close()


def _connects(config) -> bool:
    client = make_client("probe", config)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: rc.is_failure or connected.set()
    client.connect_async(config.host, config.port)
    client.loop_start()
    try:
        return connected.wait(3)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_client_without_a_certificate_cannot_connect(broker) -> None:
    assert not _connects(broker.anonymous())
    assert _connects(broker.identity("tok-001"))


def test_a_revoked_device_cannot_connect(broker) -> None:
    config = broker.identity("tok-005")
    assert _connects(config)
    broker.revoke("tok-005")
    assert not _connects(config)


def test_a_device_refused_by_the_broker_says_so_once_in_its_log(broker, tmp_path, caplog) -> None:
    caplog.set_level(logging.ERROR, "sos.uplink")
    events: queue.Queue = queue.Queue()
    link = MqttUplink("tok-009", broker.anonymous(), Outbox(tmp_path / "o.sqlite"), events.put,
                      will_payload=b"{}", status_payload=lambda: b"{}",
                      receipt_keys=broker.centre_keys())
    link.start()
    try:
        for _ in range(3):  # three failed attempts
            assert not isinstance(events.get(timeout=10), Connected)
    finally:
        link.stop()
    lines = [r.message for r in caplog.records if "cannot connect to broker" in r.message]
    assert len(lines) == 1
    assert "certificate" in lines[0] and "not revoked" in lines[0]


def test_the_ca_refuses_a_name_that_is_not_a_device_id(broker) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(FleetError, match="not a valid token identity"):
        broker.fleet.sign_csr(pki.make_csr(key, "centre.evil"), "token")


def test_re_enrolling_the_same_key_is_safe_and_a_new_key_revokes_the_old(broker,
                                                                         tmp_path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    first = broker.fleet.sign_csr(pki.make_csr(key, "pil-010"), "pillar")
    assert broker.fleet.sign_csr(pki.make_csr(key, "pil-010"), "pillar") == first
    old_serial = broker.fleet.active("pil-010").serial
    broker.fleet.sign_csr(pki.make_csr(ec.generate_private_key(ec.SECP256R1()), "pil-010"),
                          "pillar")
    assert broker.fleet.active("pil-010").serial != old_serial
    revoked = [i for i in broker.fleet.identities if i.serial == old_serial]
    assert revoked[0].status == "revoked"
