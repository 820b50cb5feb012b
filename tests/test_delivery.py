"""End-to-end delivery: a device's message leaves its outbox only on the centre's signed receipt.

Each test is a way the broker can take a message and still lose it (issue 10); the device must
notice the missing receipt and send again until a centre has stored the message.
"""

from __future__ import annotations

import json
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_center.store import Store
from firmware.uplink.mqtt import Accepted, Delivered
from firmware.uplink.outbox import Outbox
from protocol import MessageKind, Topics, encode, payload_digest
from protocol.signing import Signer
from tests.helpers import RawClient, device_signer
from tests.links import QUICK, Link, new_alert

DEVICE = "tok-001"


@pytest.fixture
def link(broker, tmp_path):
    device = Link(broker, tmp_path / "outbox.sqlite", DEVICE, waits=QUICK)
    device.uplink.start()
    yield device
    device.close()


class BlackHole(RawClient):
    """A subscriber that makes the broker answer PUBACK 0 and then stores nothing: what an
    intruder in the centre's group, or a centre that died holding a message, looks like."""

    def __init__(self, broker, client_id: str = "black-hole", **kwargs) -> None:
        super().__init__(broker.identity(f"centre.{client_id}", "centre"), client_id, **kwargs)
        self.subscribe(Topics(DEVICE).alert)


def start_centre(broker, tmp_path, name: str = "centre.sqlite"):
    """A centre that starts late: (service, store)."""
    store = Store(tmp_path / name)
    service = broker.centre_service(store)
    service.start()
    return service, store


def alert_id(row) -> str:
    return json.loads(row.payload)["alert_id"]


def test_an_alert_the_broker_accepted_but_nobody_stored_is_sent_again_until_a_centre_has_it(
        broker, link, tmp_path) -> None:
    hole = BlackHole(broker)
    try:
        row = link.raise_alert()
        hole.wait_messages(2)  # PUBACK 0 and no receipt: the device sends it again
        assert link.outbox.contains(row.seq)
        assert all(not isinstance(e, Delivered) for e in list(link.events.queue))
    finally:
        hole.close()
    service, store = start_centre(broker, tmp_path)
    try:
        delivered = link.wait_for(Delivered)
        assert delivered.row.seq == row.seq
        assert not link.outbox.contains(row.seq)
        assert store.alert(alert_id(row)) is not None
    finally:
        service.stop()
        store.close()


def test_a_broker_killed_right_after_accepting_an_alert_loses_nothing(broker, link,
                                                                      tmp_path) -> None:
    """The broker queued the alert for an offline session and died before its autosave: the
    device's copy is all that is left."""
    hole = BlackHole(broker, "offline-holder", persistent=True)
    hole.drop()  # offline, its session (and what is queued in it) kept by the broker
    row = link.raise_alert()
    assert link.wait_for(Accepted).row.seq == row.seq  # PUBACK 0: the broker has queued it
    broker.kill()
    broker.start()
    service, store = start_centre(broker, tmp_path)
    try:
        assert link.wait_for(Delivered, timeout=30).row.seq == row.seq
        record = store.alert(alert_id(row))
        assert record is not None
        assert not link.outbox.contains(row.seq)
    finally:
        service.stop()
        store.close()


def receipt_for(row, device_id: str = DEVICE, **overrides) -> dict:
    return {"v": 1, "type": "delivered", "device_id": device_id, "seq": row.seq,
            "message": "alert", "alert_id": alert_id(row), "digest": payload_digest(row.payload),
            "stored_at": "2026-11-23T10:00:01.000Z", "duplicate": False, **overrides}


def test_only_a_receipt_signed_by_the_centre_for_the_same_bytes_settles_a_message(
        broker, link, caplog) -> None:
    caplog.set_level(logging.ERROR, "sos.uplink")
    hole = BlackHole(broker)
    try:
        first, second = link.raise_alert(), link.raise_alert()
        hole.wait_messages(2)
        centre = broker.fleet.centre_signer()
        forger = Signer(Ed25519PrivateKey.generate())
        command_topic = Topics(DEVICE).command
        for fake in (forger.sign(receipt_for(first)),  # not the centre's key
                     centre.sign(receipt_for(first, digest="0" * 64)),  # other bytes
                     centre.sign(receipt_for(first, device_id="tok-002"))):  # another device
            hole.publish(command_topic, encode(MessageKind.DELIVERY_RECEIPT, fake))
        hole.publish(command_topic,
                     encode(MessageKind.DELIVERY_RECEIPT, centre.sign(receipt_for(second))))
        # Receipts arrive in order on one connection: the fakes were handled before this one.
        assert link.wait_for(Delivered).row.seq == second.seq
        assert link.outbox.contains(first.seq)
        assert not link.outbox.contains(second.seq)
        assert any("bad signature" in r.message for r in caplog.records)
    finally:
        hole.close()


def test_the_centre_answers_a_resent_alert_with_a_receipt_and_stores_it_once(
        broker, center, tmp_path) -> None:
    device = RawClient(broker.identity(DEVICE), DEVICE)
    try:
        device.subscribe(Topics(DEVICE).command)
        outbox = Outbox(tmp_path / "o.sqlite", signer=device_signer(broker, DEVICE))
        (row,) = outbox.append([new_alert(DEVICE)])
        outbox.close()
        device.publish(Topics(DEVICE).alert, row.payload)
        device.publish(Topics(DEVICE).alert, row.payload)
        receipts = [json.loads(p) for _, p in device.wait_messages(2)]
        assert [r["duplicate"] for r in receipts] == [False, True]
        assert {r["digest"] for r in receipts} == {payload_digest(row.payload)}
        assert receipts[0]["stored_at"] == receipts[1]["stored_at"]
        assert center.store.alert(alert_id(row)).duplicates == 1
    finally:
        device.close()
