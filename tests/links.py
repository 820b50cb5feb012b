"""A device's uplink (real outbox, real paho, the fleet's keys) for tests against a real broker."""

from __future__ import annotations

import queue
from pathlib import Path

from firmware.uplink.delivery import DeliveryWaits
from firmware.uplink.mqtt import MqttUplink
from firmware.uplink.outbox import Outbox
from firmware.uplink.outgoing import Outgoing
from protocol import MessageKind, Topics, encode, new_id
from tests.helpers import NO_POSITION, device_signer

# Short waits, so a test sees a re-send within a second or two.
QUICK = DeliveryWaits(first_wait_s=0.5, unrouted_wait_s=0.2, refused_wait_s=1.0, max_wait_s=1.0)


def new_alert(device_id: str) -> Outgoing:
    return Outgoing(MessageKind.ALERT, Topics(device_id).alert, {
        "v": 1, "alert_id": new_id(), "device_id": device_id, "device_kind": "token",
        "trigger": "button_hold", "created_at": "2026-11-23T10:00:00.000Z",
        "position": NO_POSITION, "battery": None})


class Link:
    """Outbox + MqttUplink of `device_id`, its events on a queue."""

    def __init__(self, broker, path: Path, device_id: str = "tok-001",
                 waits: DeliveryWaits | None = None) -> None:
        status = encode(MessageKind.STATUS, {"v": 1, "device_id": device_id, "state": "online"})
        offline = encode(MessageKind.STATUS, {"v": 1, "device_id": device_id,
                                              "state": "offline"})
        self.device_id = device_id
        self.events: queue.Queue = queue.Queue()
        self.outbox = Outbox(path, signer=device_signer(broker, device_id))
        self.uplink = MqttUplink(device_id, broker.identity(device_id), self.outbox,
                                 self.events.put, will_payload=offline,
                                 status_payload=lambda: status,
                                 receipt_keys=broker.centre_keys(), waits=waits)

    def raise_alert(self):
        """Store an alert and hand it to the uplink, as the runtime does; its outbox row."""
        (row,) = self.outbox.append([new_alert(self.device_id)])
        self.uplink.send([row])
        return row

    def wait_for(self, kind: type, timeout: float = 15.0):
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, kind):
                return event

    def close(self) -> None:
        self.uplink.stop()
        self.outbox.close()
