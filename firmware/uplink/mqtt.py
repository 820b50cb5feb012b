"""The device's MQTT 5 link: TLS, last will, commands and delivery receipts in, outbox rows out.

paho keeps QoS 1 messages only in memory (docs/FIELD-NOTES.md), so durability is the outbox's job:
every row is handed to paho (at start-up for what a previous process left, then as it is appended);
paho re-sends in-flight rows on reconnect, in order. A row leaves the outbox only when the
control centre's signed delivery receipt for it arrives on the command topic (`sig` by a key in
`receipt_keys`, `digest` equal to the SHA-256 of the row's payload): a PUBACK only says the broker
took it, and a broker can still lose it. Until then the row is sent again with backoff
(`delivery.DeliveryTracker`: after a PUBACK with no receipt, after PUBACK 16 "No matching
subscribers" when no centre is connected, after a refused PUBACK). `Delivered` is reported, and
an alert shows DELIVERED, on the receipt.

Nothing the broker hands us can end the process: a payload on the command topic that is not a
valid receipt goes to the core as a command, which refuses it with one log line.

Limits: one broker; up to `max_inflight` (paho's 20) unacknowledged publishes in flight, the rest
queue in paho's memory in order; re-sends as `delivery.DeliveryWaits` says.

Live video (`publish_live`, docs/LIVE.md) bypasses all of this: QoS 0, only while connected, never
in the outbox, and at most `max_live_unsent` chunks waiting in paho's queue for the socket (paho's
queue has no bound of its own), so a slow link drops live chunks instead of growing memory.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from firmware.uplink.delivery import DeliveryTracker, DeliveryWaits
from firmware.uplink.outbox import Outbox
from firmware.uplink.outgoing import OutboxRow
from protocol import MessageKind, ProtocolError, Topics, validate
from protocol.mqtt import BrokerConfig, make_client, session_properties
from protocol.signing import SignatureError, verify
from protocol.topics import LIVE_HEADER_PROPERTY
from protocol.untrusted import UntrustedJsonError, loads_untrusted

log = logging.getLogger("sos.uplink")

NO_MATCHING_SUBSCRIBERS = 16  # MQTT 5 PUBACK reason code 0x10
# A PUBACK that beats send() is claimed microseconds later; on_publish also reports every QoS 0
# publish (heartbeats, live chunks), which nobody claims: keep only the newest ones.
EARLY_ACKS_KEPT = 256

@dataclass(frozen=True)
class Connected:
    pass


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class Accepted:
    """The broker took `row` (PUBACK 0): not yet proof of anything, the receipt is awaited."""

    row: OutboxRow


@dataclass(frozen=True)
class Delivered:
    """The centre's signed receipt for `row` arrived: it is stored there."""

    row: OutboxRow


@dataclass(frozen=True)
class BrokerRefused:
    """The broker's PUBACK refused the row or said nobody is subscribed (`reason`); the row
    stays in the outbox. Not the centre's refusal: that comes as a signed receipt."""

    row: OutboxRow
    reason: str


@dataclass(frozen=True)
class CommandReceived:
    payload: bytes


UplinkEvent = Connected | Disconnected | Accepted | Delivered | BrokerRefused | CommandReceived


class MqttUplink:
    def __init__(
        self,
        device_id: str,
        broker: BrokerConfig,
        outbox: Outbox,
        on_event: Callable[[UplinkEvent], None],
        *,
        will_payload: bytes,
        status_payload: Callable[[], bytes],
        receipt_keys: Sequence[Ed25519PublicKey],
        waits: DeliveryWaits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`receipt_keys`: the centre's public keys (trust.centre_keys); a delivery receipt must
        be signed by one of them."""
        self.topics = Topics(device_id)
        self.device_id = device_id
        self._broker = broker
        self._outbox = outbox
        self._on_event = on_event
        self._status_payload = status_payload
        self._receipt_keys = list(receipt_keys)
        self._clock = clock
        self._lock = threading.Lock()
        self._delivery = DeliveryTracker(waits or DeliveryWaits())  # under _lock
        self._due_changed = threading.Condition(self._lock)
        self._rows_by_mid: dict[int, OutboxRow] = {}
        # PUBACKs that beat send() to recording their mid, with the callback count at arrival.
        # paho also calls on_publish for QoS 0 (status) publishes, and mids wrap at 65535, so
        # an entry counts only if it arrived after the publish that handed out that mid.
        self._early_acks: dict[int, tuple[int, ReasonCode]] = {}
        self._callbacks = 0
        self._resender = threading.Thread(target=self._resend_loop, name="uplink-resend",
                                          daemon=True)
        self._stopped = threading.Event()
        self.connected = False

        self._client = make_client(device_id, broker)
        self._client.will_set(self.topics.status, will_payload, qos=1, retain=True)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_publish = self._handle_publish
        self._client.on_message = self._handle_message
        self._client.on_connect_fail = self._handle_connect_fail
        self._refusal_logged = False
        self.max_live_unsent = 4
        self._live_unsent: list[paho.MQTTMessageInfo] = []  # live publishes not yet on the wire

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background and offer every row a previous process left behind."""
        self._client.connect_async(
            self._broker.host,
            self._broker.port,
            keepalive=self._broker.keepalive_s,
            clean_start=False,
            properties=session_properties(),
        )
        self._client.loop_start()
        self.send(self._outbox.pending())
        self._resender.start()

    def stop(self) -> None:
        self._stopped.set()
        with self._due_changed:
            self._due_changed.notify_all()
        if self._resender.is_alive():
            self._resender.join(timeout=5)
        # Reason 0x04 asks the broker to publish our last will anyway: the centre then sees a
        # device that was switched off as offline, not as silently online.
        self._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT,
                                                      "Disconnect with will message"))
        self._client.loop_stop()

    # -- outgoing ----------------------------------------------------------------------------
    def send(self, rows: list[OutboxRow]) -> None:
        """Hand stored rows to paho, in order. Safe to call while disconnected."""
        for row in rows:
            self._publish(row, resend=False)

    def _publish(self, row: OutboxRow, *, resend: bool) -> None:
        """One QoS 1 publish of a row. A re-send is skipped if its receipt came meanwhile.

        paho calls on_publish holding its own lock, so publish() is never called under ours."""
        with self._lock:
            if resend and not self._delivery.still_waiting(row):
                return
            if not resend:
                self._delivery.sent(row)
            before = self._callbacks
        info = self._client.publish(row.topic, row.payload, qos=1)
        with self._lock:
            arrived, reason = self._early_acks.pop(info.mid, (before, None))
            if arrived <= before:  # none, or a stale one from an earlier use of the mid
                reason = None
                self._rows_by_mid[info.mid] = row
        if reason is not None:
            self._settle(row, reason)

    def publish_status(self) -> None:
        """The retained online/heartbeat status.

        QoS 0 and not in the outbox: a stale heartbeat is worth nothing, and the next one replaces
        it. (The last will, published by the broker, is QoS 1.)
        """
        self._client.publish(self.topics.status, self._status_payload(), qos=0, retain=True)

    def publish_live(self, topic: str, payload: bytes, header: dict[str, Any]) -> bool:
        """One live video chunk: QoS 0, not retained, the signed `header` as canonical JSON in
        the MQTT 5 user property `sos-live-header`, the age ciphertext as payload.

        Never through the outbox: a late chunk is worthless and the evidence recording reaches
        the centre later anyway. Returns False, and sends nothing, while disconnected or while
        `max_live_unsent` earlier chunks still wait in paho's queue for the socket (a slow
        link); the caller counts it as not sent.
        """
        if not self.connected or self._stopped.is_set():
            return False
        with self._lock:
            self._live_unsent = [info for info in self._live_unsent if not _on_wire(info)]
            if len(self._live_unsent) >= self.max_live_unsent:
                return False
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [(LIVE_HEADER_PROPERTY, json.dumps(
            header, sort_keys=True, separators=(",", ":")))]
        info = self._client.publish(topic, payload, qos=0, retain=False, properties=properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return False
        with self._lock:
            self._live_unsent.append(info)
        return True

    # -- paho callbacks (paho's network thread) ------------------------------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker %s:%s refused the connection: %s", self._broker.host,
                      self._broker.port, reason_code)
            return
        self.connected = True
        self._refusal_logged = False
        client.subscribe(self.topics.command, qos=1)
        self.publish_status()
        with self._due_changed:
            self._due_changed.notify_all()  # what fell due while offline goes now
        self._on_event(Connected())

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected, self.connected = self.connected, False
        if self._stopped.is_set():
            pass
        elif was_connected:
            log.warning("lost the broker (%s); retrying, pending messages stay in the outbox",
                        reason_code)
        else:
            # Under TLS 1.3 a refused client certificate arrives only as this (docs/FIELD-NOTES.md).
            self._log_refusal(f"the broker closed the connection before accepting it "
                              f"({reason_code})")
        self._on_event(Disconnected(str(reason_code)))

    def _handle_connect_fail(self, client, userdata) -> None:
        self._log_refusal("the connection or TLS handshake failed")

    def _log_refusal(self, what: str) -> None:
        """One clear line per failure streak, not one per retry."""
        if self._refusal_logged:
            return
        self._refusal_logged = True
        cert = self._broker.cert_file or "none configured"
        log.error("cannot connect to broker %s:%s: %s. Check that the broker is reachable and "
                  "that this device's certificate (broker.cert_file: %s) is issued by the fleet "
                  "CA and not revoked; retrying, alerts stay in the outbox",
                  self._broker.host, self._broker.port, what, cert)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self._callbacks += 1
            row = self._rows_by_mid.pop(mid, None)
            if row is None:  # a status publish, or a PUBACK that beat send() to the mid
                self._early_acks[mid] = (self._callbacks, reason_code)
                if len(self._early_acks) > EARLY_ACKS_KEPT:  # QoS 0 ones are never claimed
                    del self._early_acks[next(iter(self._early_acks))]
                return
        self._settle(row, reason_code)

    def _handle_message(self, client, userdata, message) -> None:
        """Never raises (an exception would end paho's network thread): a receipt is settled
        here, anything else on the command topic goes to the core as a command."""
        if message.topic != self.topics.command:
            return
        payload = bytes(message.payload)
        try:
            receipt = _as_receipt(payload)
            if receipt is None:
                self._on_event(CommandReceived(payload))
            else:
                self._settle_receipt(receipt)
        except Exception:
            log.exception("internal: could not handle a message on %s; ignored", message.topic)

    def _settle_receipt(self, receipt: dict[str, Any]) -> None:
        """A delivery receipt: delete the row it proves stored, then report it."""
        seq = receipt["seq"]
        try:
            validate(MessageKind.DELIVERY_RECEIPT, receipt)
            verify(receipt, self._receipt_keys)
        except (ProtocolError, SignatureError) as exc:
            log.error("ignored a delivery receipt for seq=%s: %s (not from the control centre); "
                      "the message stays in the outbox", seq, exc)
            return
        if receipt["device_id"] != self.device_id:
            log.error("ignored a delivery receipt for %s: it names device %s",
                      seq, receipt["device_id"])
            return
        with self._due_changed:
            row = self._delivery.receipted(seq, receipt["digest"], self._clock())
            self._due_changed.notify_all()  # a centre came back: what waited may go now
        if row is None:
            log.debug("delivery receipt for seq=%s matches nothing waiting (a repeat)", seq)
            return
        if row.durable:
            self._outbox.remove(row.seq)
        self._on_event(Delivered(row))

    # -- settlement ----------------------------------------------------------------------------
    def _settle(self, row: OutboxRow, reason_code: ReasonCode) -> None:
        """The broker's PUBACK: it took the row (now wait for the receipt), nobody was
        subscribed, or it refused it. The row stays in the outbox in every case."""
        now = self._clock()
        if reason_code.value == NO_MATCHING_SUBSCRIBERS:
            # The broker took it but nobody (no control centre) was subscribed: it went nowhere.
            log.warning("no control centre subscribed for %s seq=%d; kept in the outbox, "
                        "offering it again", row.kind.value, row.seq)
            with self._due_changed:
                self._delivery.unrouted(row.seq, now)
                self._due_changed.notify_all()
            self._on_event(BrokerRefused(row, str(reason_code)))
            return
        if not reason_code.is_failure:
            with self._due_changed:
                self._delivery.accepted(row.seq, now)
                self._due_changed.notify_all()
            self._on_event(Accepted(row))
            return
        log.error(
            "broker refused %s seq=%d on %s: %s (reason %d); kept in the outbox, "
            "retrying in %.0f s; check the broker ACL for this device",
            row.kind.value, row.seq, row.topic, reason_code, reason_code.value,
            self._delivery.waits.refused_wait_s,
        )
        with self._due_changed:
            self._delivery.refused(row.seq, now)
            self._due_changed.notify_all()
        self._on_event(BrokerRefused(row, str(reason_code)))

    def _resend_loop(self) -> None:
        """Thread: send again what waited too long for its receipt, while connected."""
        while not self._stopped.is_set():
            with self._due_changed:
                due_at = self._delivery.next_due()
                now = self._clock()
                if not self.connected or due_at is None or due_at > now:
                    wait = None if due_at is None or not self.connected else due_at - now
                    self._due_changed.wait(wait)
                    continue
                rows = self._delivery.due(now)
            gone = [r for r in rows if r.durable and not self._outbox.contains(r.seq)]
            if gone:  # shed from the outbox meanwhile (the oldest positions): not sent again
                with self._lock:
                    for row in gone:
                        self._delivery.forget(row.seq)
                rows = [r for r in rows if r not in gone]
            if rows:
                log.info("no delivery receipt yet for seq %s; sending again",
                         ", ".join(str(r.seq) for r in rows))
            for row in rows:
                self._publish(row, resend=True)


def _as_receipt(payload: bytes) -> dict[str, Any] | None:
    """The payload as a delivery receipt to check, or None if it does not claim to be one (a
    command, or garbage the core will refuse with its own clear line)."""
    try:
        data = loads_untrusted(payload)
    except UntrustedJsonError:
        return None
    if isinstance(data, dict) and data.get("type") == "delivered" and isinstance(
            data.get("seq"), int):
        return data
    return None


def _on_wire(info: paho.MQTTMessageInfo) -> bool:
    """A QoS 0 publish has left paho's queue (written to the socket, or failed for good)."""
    try:
        return info.is_published()
    except (ValueError, RuntimeError):
        return True
