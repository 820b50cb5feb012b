"""The floor: a bare paho MQTT 5 QoS 1 round trip through the same broker, same TLS set-up.

Two clients in this process (a publisher and a subscriber), each with paho's network thread, as
the device and the centre have. One message at a time: the next is published only after the
subscriber got the previous one, its PUBACK is back and the subscriber's reply (QoS 1, on the
publisher's command topic, as the centre's delivery receipt goes) has arrived.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from protocol.mqtt import BrokerConfig, make_client

FLOOR_DEVICE = "bench-floor-pub"
TOPIC = f"sos/v1/dev/{FLOOR_DEVICE}/alert"  # allowed for that identity by the fleet ACL
REPLY_TOPIC = f"sos/v1/dev/{FLOOR_DEVICE}/cmd"  # the centre writes it, the device reads it


class FloorError(RuntimeError):
    pass


@dataclass
class FloorSamples:
    delivered_s: list[float] = field(default_factory=list)  # publish() -> subscriber on_message
    puback_s: list[float] = field(default_factory=list)  # publish() -> publisher on_publish
    reply_s: list[float] = field(default_factory=list)  # publish() -> the reply at the publisher


class _Arrivals:
    """perf_counter() instants of PUBACKs (by mid) and deliveries (by payload), under one lock.

    A PUBACK can beat publish() returning its mid, so both sides are recorded by key and looked
    up afterwards rather than expected in order.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pubacks: dict[int, float] = {}
        self.messages: dict[bytes, float] = {}

    def on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        at = time.perf_counter()
        with self.cond:
            self.pubacks[mid] = at
            self.cond.notify_all()

    def on_message(self, client, userdata, message) -> None:
        at = time.perf_counter()
        with self.cond:
            self.messages[bytes(message.payload)] = at
            self.cond.notify_all()

    def on_message_reply(self, client, userdata, message) -> None:
        """The subscriber's side: record, then answer at once (no work, no signature)."""
        self.on_message(client, userdata, message)
        if message.topic == TOPIC:
            client.publish(REPLY_TOPIC, b"r" + bytes(message.payload), qos=1)


def _connect(client: mqtt.Client, broker: BrokerConfig, timeout_s: float) -> None:
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect_async(broker.host, broker.port, keepalive=broker.keepalive_s)
    client.loop_start()
    if not connected.wait(timeout_s):
        raise FloorError(f"floor client could not connect to {broker.host}:{broker.port}")


def _subscribe(client: mqtt.Client, timeout_s: float, topic: str = TOPIC) -> None:
    done = threading.Event()
    client.on_subscribe = lambda *args: done.set()
    client.subscribe(topic, qos=1)
    if not done.wait(timeout_s):
        raise FloorError("floor subscriber got no SUBACK")


def _round_trip(pub: mqtt.Client, arrivals: _Arrivals, payload: bytes,
                timeout_s: float) -> tuple[float, float, float]:
    """One QoS 1 publish; returns (to on_message, to PUBACK, to the reply) in seconds."""
    start = time.perf_counter()
    info = pub.publish(TOPIC, payload, qos=1)
    reply = b"r" + payload
    with arrivals.cond:
        ok = arrivals.cond.wait_for(
            lambda: info.mid in arrivals.pubacks and payload in arrivals.messages
            and reply in arrivals.messages, timeout_s)
        if not ok:
            raise FloorError(f"floor message {payload[:8]!r} not delivered within {timeout_s} s")
        acked = arrivals.pubacks.pop(info.mid)
        delivered = arrivals.messages.pop(payload)
        replied = arrivals.messages.pop(reply)
    return delivered - start, acked - start, replied - start


def run_floor(publisher: BrokerConfig, subscriber: BrokerConfig, samples: int, warmup: int,
              payload: bytes, timeout_s: float = 10.0) -> FloorSamples:
    """`warmup` uncounted round trips, then `samples` counted ones, strictly one at a time.

    The publisher is a device identity publishing on its own alert topic, the subscriber the
    centre's identity: the same certificates and ACL checks as the real path.

    Each payload starts with its index so a late delivery can never be taken for the next one.
    """
    arrivals = _Arrivals()
    sub = make_client("bench-floor-sub", subscriber)
    pub = make_client(FLOOR_DEVICE, publisher)
    sub.on_message = arrivals.on_message_reply
    pub.on_message = arrivals.on_message
    pub.on_publish = arrivals.on_publish
    result = FloorSamples()
    try:
        _connect(sub, subscriber, timeout_s)
        _subscribe(sub, timeout_s)
        _connect(pub, publisher, timeout_s)
        _subscribe(pub, timeout_s, REPLY_TOPIC)
        for i in range(warmup + samples):
            delivered, acked, replied = _round_trip(pub, arrivals, b"%08d:" % i + payload,
                                                    timeout_s)
            if i >= warmup:
                result.delivered_s.append(delivered)
                result.puback_s.append(acked)
                result.reply_s.append(replied)
    finally:
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()
    return result
