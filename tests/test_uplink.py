"""Outbox -> paho -> real Mosquitto (TLS) -> control centre."""

from __future__ import annotations

import json
import threading

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from control_center.store import Store
from firmware.uplink.mqtt import BrokerRefused, Connected, Delivered, Disconnected
from firmware.uplink.outbox import Outbox
from firmware.uplink.outgoing import Outgoing
from protocol import Topics
from tests import links
from tests.helpers import device_signer
from tests.links import Link

DEVICE = "tok-001"
TOPICS = Topics(DEVICE)


def new_alert() -> Outgoing:
    return links.new_alert(DEVICE)


def test_a_stored_alert_reaches_the_centre_and_leaves_the_outbox_on_its_receipt(
        broker, center, tmp_path) -> None:
    link = Link(broker, tmp_path / "o.sqlite")
    try:
        link.uplink.start()
        rows = link.outbox.append([new_alert()])
        link.uplink.send(rows)
        delivered = link.wait_for(Delivered)
        assert delivered.row.seq == rows[0].seq
        assert link.outbox.pending() == []
        alert_id = json.loads(rows[0].payload)["alert_id"]
        center.wait_for(lambda: center.store.alert(alert_id))
    finally:
        link.close()


def test_an_alert_raised_while_the_broker_is_down_is_stored_once_after_it_returns(
        broker, center, tmp_path) -> None:
    link = Link(broker, tmp_path / "o.sqlite")
    try:
        link.uplink.start()
        link.wait_for(Connected)
        broker.stop()
        rows = link.outbox.append([new_alert()])
        link.uplink.send(rows)
        assert [r.seq for r in link.outbox.pending()] == [rows[0].seq]
        broker.start()
        link.wait_for(Delivered, timeout=30)
        alert_id = json.loads(rows[0].payload)["alert_id"]
        record = center.wait_for(lambda: center.store.alert(alert_id), timeout=30)
        assert record.duplicates == 0
        assert link.outbox.pending() == []
    finally:
        link.close()


def test_rows_left_by_a_previous_process_are_sent_in_order_at_start(broker, center,
                                                                   tmp_path) -> None:
    previous = Outbox(tmp_path / "o.sqlite", signer=device_signer(broker, DEVICE))
    rows = previous.append([new_alert(), new_alert(), new_alert()])
    previous.close()
    link = Link(broker, tmp_path / "o.sqlite")
    try:
        link.uplink.start()
        delivered = [link.wait_for(Delivered).row.seq for _ in rows]
        assert delivered == [r.seq for r in rows]
        ids = [json.loads(r.payload)["alert_id"] for r in rows]
        center.wait_for(lambda: all(center.store.alert(i) for i in ids))
        stored_order = [a.alert_id for a in center.store.alerts()]
        assert stored_order == ids
    finally:
        link.close()


def test_an_alert_no_centre_is_subscribed_to_stays_in_the_outbox_until_one_is(
        broker, tmp_path) -> None:
    """Mosquitto answers PUBACK 16 'No matching subscribers' and drops the message; after a broker
    restart that is the normal state until the centre re-subscribes."""
    link = Link(broker, tmp_path / "o.sqlite")
    store = Store(tmp_path / "center.sqlite")
    try:
        link.uplink.start()
        rows = link.outbox.append([new_alert()])
        link.uplink.send(rows)
        refused = link.wait_for(BrokerRefused)
        assert "No matching subscribers" in refused.reason
        assert link.outbox.contains(rows[0].seq)
        stored = threading.Event()  # the device's PUBACK comes from the broker, before the store
        service = broker.centre_service(
            store, on_event=lambda e: e.kind == "alert" and stored.set())
        service.start()
        try:
            link.wait_for(Delivered)
            assert stored.wait(15)
            alert_id = json.loads(rows[0].payload)["alert_id"]
            assert store.alert(alert_id) is not None
            assert link.outbox.pending() == []
        finally:
            service.stop()
    finally:
        link.close()
        store.close()


def test_a_clean_stop_still_tells_the_centre_the_device_is_offline(broker, center,
                                                                  tmp_path) -> None:
    link = Link(broker, tmp_path / "o.sqlite")
    link.uplink.start()
    link.wait_for(Connected)
    center.wait_for(lambda: (d := center.store.device(DEVICE)) and d["state"] == "online")
    link.close()
    center.wait_for(lambda: center.store.device(DEVICE)["state"] == "offline")


def test_a_stale_acknowledgement_for_a_reused_message_id_does_not_delete_a_new_alert(
        broker, tmp_path) -> None:
    """paho reports QoS 0 status publishes through on_publish too, and message ids wrap: an old
    'success' left for mid M must not settle the next alert that happens to get mid M."""
    link = Link(broker, tmp_path / "o.sqlite")
    try:
        link.uplink.start()
        link.wait_for(Connected)
        broker.stop()
        link.wait_for(Disconnected)
        next_mid = link.uplink._client._last_mid + 1  # the id paho hands out next
        link.uplink._handle_publish(None, None, next_mid, ReasonCode(PacketTypes.PUBACK, "Success"),
                                    None)
        rows = link.outbox.append([new_alert()])
        link.uplink.send(rows)
        assert link.outbox.contains(rows[0].seq)
        assert all(not isinstance(e, Delivered) for e in list(link.events.queue))
    finally:
        link.close()
