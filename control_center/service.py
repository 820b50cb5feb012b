"""The control centre's MQTT side: consume alerts, updates and status; send operators' commands.

Alerts, positions and events arrive through an MQTT 5 shared subscription
(`$share/<group>/...`), so several centre instances split the load; status is subscribed by every
instance so each knows who is online.

Delivery is end to end (docs/DESIGN.md, "Nothing is lost"): once a device's message is stored,
the centre sends the device a signed delivery receipt on its command topic, and the device keeps
re-sending the message until one arrives. So the broker is a transport, not the judge of
delivery, and the centre's sessions are NOT persistent (clean start, no session expiry): a
stopped instance leaves the shared group at once instead of keeping its share of new alerts
queued in a session until it returns. Every message is acknowledged at the MQTT level, stored or
not: one the centre could not store or refused comes again from the device, never from the
broker's redelivery (which a poison message would otherwise fill the in-flight window with).

Live video (docs/LIVE.md): with `live=LiveReceiver(...)` the centre also takes
`$share/<group>/sos/v1/dev/+/live` at QoS 0 and hands each chunk to the receiver, beside (never
through) the JSON-schema path; the observer gets a CenterEvent of kind "live".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.reasoncodes import ReasonCode

from control_center.config import DEFAULT_GROUP
from control_center.fleet import Fleet, registry_stamp
from control_center.live import LiveReceiver, header_from_properties
from control_center.store import NotTheSame, NotYours, Store, Stored
from protocol import (
    MessageKind,
    ProtocolError,
    Topics,
    decode,
    encode,
    new_id,
    payload_digest,
    utc_iso,
)
from protocol.messages import MAX_PAYLOAD_BYTES
from protocol.mqtt import BrokerConfig, make_client
from protocol.signing import SignatureError, Signer, verify, window_error
from protocol.topics import LIVE, all_devices, parse_device_topic, parse_live_topic

log = logging.getLogger("sos.center")

SHARED = ("alert", "position", "event")
LIVE_IDLE_S = 60.0  # a live stream with no chunk for this long is ended (#EXT-X-ENDLIST)
NO_MATCHING_SUBSCRIBERS = 16  # MQTT 5 PUBACK reason: nobody subscribed to the device's commands
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason: another client connected with our client id
RESEND_AFTER_S = 10.0  # a command the broker routed, unanswered this long, is sent again
REFUSALS_REMEMBERED = 1024  # refused payloads logged once each (a device re-sends until receipted)


class CommandError(RuntimeError):
    """The command could not be delivered to the broker; the text says why."""


@dataclass(frozen=True)
class CenterEvent:
    """What the centre just learnt, for the console or an automatic operator."""

    kind: str  # "alert" | "position" | "event" | "status" | "live" (LiveChunkResult.as_dict)
    device_id: str
    message: dict[str, Any]
    new: bool


class CenterService:
    def __init__(
        self,
        broker: BrokerConfig,
        store: Store,
        *,
        client_id: str = "sos-center-1",
        group: str = DEFAULT_GROUP,
        on_event: Callable[[CenterEvent], None] | None = None,
        signer: Signer,
        trust: Callable[[str], list[Ed25519PublicKey]],
        clock: Callable[[], float] = time.time,
        consume: bool = True,
        live: LiveReceiver | None = None,
        live_idle_s: float = LIVE_IDLE_S,
        router: Callable[[dict[str, Any], float], tuple[str, tuple[str, ...]]] | None = None,
    ) -> None:
        """`consume=False` gives a command-only client (the `ack`/`close` CLI): it subscribes to
        nothing, so it never takes alerts away from the serving instances.

        `signer` signs commands and delivery receipts; `trust(device_id)` gives the keys a
        device's messages must be signed with (see FleetTrust).

        `live`: where live video chunks go (None: the centre does not subscribe to them).

        `router(alert, stored_at)`: (rule, desks) written with each new alert (docs/ROUTING.md);
        None: no routing (every operator sees every alert)."""
        self._router = router
        self.store = store
        self.live = live if consume else None
        self._live_idle_s = live_idle_s
        self._signer = signer
        self._trust = trust
        self._consume = consume
        self._group = group
        self._clock = clock
        self._observer = on_event or (lambda event: None)
        self._ready = threading.Event()
        self._client = make_client(client_id, broker)
        self._client.on_connect = self._handle_connect
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_publish
        self._client.on_disconnect = self._handle_disconnect
        # Acknowledged after the store commits (or refuses); the device's re-send, driven by the
        # delivery receipt, covers a message that was acknowledged but not stored.
        self._client.manual_ack_set(True)
        self._broker = broker
        self._pubacks: dict[int, ReasonCode] = {}
        # Receipts in flight, and commands given up on: nobody waits for their PUBACKs.
        self._unawaited_mids: set[int] = set()
        self._refusals: OrderedDict[str, None] = OrderedDict()  # digests of refused payloads
        self._puback_arrived = threading.Condition()
        self._stopping = False
        self._resending: dict[str, threading.Thread] = {}  # alert id -> its re-send, if any

    def start(self, wait_s: float | None = 10.0) -> None:
        """Connect in the background; wait until subscribed (or connected) if asked."""
        self._client.connect_async(self._broker.host, self._broker.port,
                                   keepalive=self._broker.keepalive_s, clean_start=True)
        self._client.loop_start()
        if wait_s is not None and not self._ready.wait(wait_s):
            self.stop()
            raise CommandError(f"could not reach the broker at {self._broker.host}:"
                               f"{self._broker.port} within {wait_s:.0f} s")

    def stop(self) -> None:
        with self._puback_arrived:
            self._stopping = True
            self._puback_arrived.notify_all()
            resends = list(self._resending.values())
        for thread in resends:
            thread.join(timeout=5)
        self._client.disconnect()
        self._client.loop_stop()

    # -- commands --------------------------------------------------------------------------------
    def send_command(self, alert_id: str, decision: str, operator: str,
                     timeout_s: float = 10.0, note: str | None = None) -> dict[str, Any]:
        """Send `ack` or `close` for an alert to its device; return once the broker has it.

        Returns the command sent, with `status` "sent" and `delivered`: False if the device had
        no session to take it (it is then sent again when the device reports back). The alert
        shows the decision only when the device's `command_applied` for it arrives
        (Store.add_update): the broker taking a command proves nothing about the device.
        `note`: the operator's reason (a close's), kept with the command in the store."""
        alert = self.store.alert(alert_id)
        if alert is None:
            raise CommandError(f"no alert {alert_id}")
        command, delivered = self._send(alert.device_id, {"type": decision, "alert_id": alert_id},
                                        operator, timeout_s, note)
        if not delivered:
            log.warning("%s for %s recorded, but device %s is not connected and has no session; "
                        "it is sent again when the device reports back", decision, alert_id[:8],
                        alert.device_id)
        return {**command, "delivered": delivered, "status": "sent"}

    def send_call(self, device_id: str, kind: str, operator: str, call_id: str | None = None,
                  timeout_s: float = 10.0) -> dict[str, Any]:
        """Dispatch's `call_start` (with its call id) or `call_end`: the token records the call."""
        fields: dict[str, Any] = {"type": kind}
        if call_id is not None:
            fields["call_id"] = call_id
        command, delivered = self._send(device_id, fields, operator, timeout_s)
        return {**command, "delivered": delivered}

    def send_voice(self, alert_id: str, fields: dict[str, Any], operator: str,
                   timeout_s: float = 10.0) -> dict[str, Any]:
        """`voice_offer` (with `voice_session`, `sdp`, `ice_servers`) or `voice_hangup` for the
        alert's device (docs/VOICE.md). The device answers with a `voice_answer` event."""
        alert = self.store.alert(alert_id)
        if alert is None:
            raise CommandError(f"no alert {alert_id}")
        command, delivered = self._send(alert.device_id, {**fields, "alert_id": alert_id},
                                        operator, timeout_s)
        return {**command, "delivered": delivered}

    def _send(self, device_id: str, fields: dict[str, Any], operator: str,
              timeout_s: float, note: str | None = None) -> tuple[dict[str, Any], bool]:
        """Sign, number, record and publish a command; wait for its PUBACK and read it."""
        command = self._signer.sign({
            "v": 1,
            "command_id": new_id(),
            "seq": self.store.next_command_seq(self._signer.public_key_b64,
                                               int(self._clock() * 1000)),
            **fields,
            "issued_at": utc_iso(datetime.fromtimestamp(self._clock(), UTC)),
            "operator": operator,
        })
        payload = encode(MessageKind.COMMAND, command)
        if len(payload) > MAX_PAYLOAD_BYTES:  # the device would drop it unread
            raise CommandError(f"the {fields['type']} is {len(payload)} bytes, more than a "
                               f"device reads ({MAX_PAYLOAD_BYTES}); not sent")
        self.store.add_command(command, device_id, note)
        info = self._client.publish(Topics(device_id).command, payload, qos=1)
        kind = fields["type"]
        with self._puback_arrived:
            arrived = self._puback_arrived.wait_for(
                lambda: info.mid in self._pubacks or self._stopping, timeout_s)
            if not arrived or info.mid not in self._pubacks:
                self._unawaited_mids.add(info.mid)  # its late PUBACK must not answer a later one
                raise CommandError(f"broker did not acknowledge the {kind} within "
                                   f"{timeout_s:.0f} s (is it reachable?)")
            reason = self._pubacks.pop(info.mid)
        if reason.is_failure:
            raise CommandError(f"broker refused the {kind}: {reason} ({reason.value})")
        routed = reason.value != NO_MATCHING_SUBSCRIBERS
        self.store.mark_sent(command["command_id"], self._clock(), routed=routed)
        return command, routed

    # -- paho callbacks --------------------------------------------------------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the centre's connection: %s", reason_code)
            return
        if not self._consume:
            self._ready.set()
            return
        topics = [(f"$share/{self._group}/{all_devices(leaf)}", 1) for leaf in SHARED]
        topics.append((all_devices("status"), 1))
        if self.live is not None:  # QoS 0: a late chunk is worthless, never queue or re-send it
            topics.append((f"$share/{self._group}/{all_devices(LIVE)}", 0))
        client.subscribe(topics)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("broker refused the centre's subscriptions: %s", ", ".join(failed))
            return
        self._ready.set()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.value == SESSION_TAKEN_OVER:
            log.error("the broker handed this centre's client id to another connection (session "
                      "taken over): two instances share one identity or client id; give each "
                      "instance its own (docs/FLASHING.md)")
        elif not self._stopping:
            log.warning("lost the broker (%s); reconnecting", reason_code)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._puback_arrived:
            if mid in self._unawaited_mids:  # a receipt: a lost one is asked for again by a re-send
                self._unawaited_mids.discard(mid)
                return
            self._pubacks[mid] = reason_code
            self._puback_arrived.notify_all()

    def _resend_missed_decision(self, device_id: str, status: dict[str, Any]) -> None:
        """A device reporting an active alert for which an operator's decision is sent but not
        applied (Store.undone_decisions) missed it: offline without a session, or the command
        waited in the broker's queue past its time window. Send it again, as a new command;
        a close before an ack, since it decides more."""
        alert_id = status.get("active_alert_id")
        alert = self.store.alert(alert_id) if alert_id else None
        if alert is None or alert.device_id != device_id:
            return
        due = [c for c in self.store.undone_decisions(alert.alert_id)
               if self._resend_due(c, status.get("active_alert_stage"))]
        if not due:
            return
        decision, operator = due[-1]["type"], due[-1]["operator"]

        def resend() -> None:  # not on paho's thread: send_command waits for the PUBACK
            try:
                self.send_command(alert.alert_id, decision, operator)
            except CommandError as exc:
                log.error("could not re-send %s for %s: %s", decision, alert.alert_id[:8], exc)
            finally:
                with self._puback_arrived:
                    self._resending.pop(alert.alert_id, None)

        with self._puback_arrived:
            if self._stopping or alert.alert_id in self._resending:
                return  # one re-send at a time; a later status asks again if it is still needed
            thread = threading.Thread(target=resend, daemon=True)
            self._resending[alert.alert_id] = thread
        log.warning("device %s still shows %s as %s: sending the %s again", device_id,
                    alert.alert_id[:8], status.get("active_alert_stage"), decision)
        thread.start()

    def _resend_due(self, command: dict[str, Any], stage: str | None) -> bool:
        """Whether an undone decision's command is missed rather than on its way: refused for a
        reason a new command overcomes, never taken by a device session (PUBACK 16), or taken
        but unanswered for RESEND_AFTER_S (a status made just before the device applied it
        would otherwise trigger a needless copy). Nothing is repeated to a device showing the
        alert closed, nor an ack to one showing it acknowledged: its answer is on the way."""
        if stage == "closed" or (command["type"] == "ack" and stage == "acknowledged"):
            return False
        if command["status"] == "rejected" or not command["routed"]:
            return True
        return self._clock() - command["sent_at"] >= RESEND_AFTER_S

    def _on_event(self, event: CenterEvent) -> None:
        """Tell the observer (console, automatic operator). Its failure is logged and changes
        nothing: the message is stored and will be acknowledged regardless."""
        try:
            self._observer(event)
        except Exception:
            log.exception("the %s observer failed on a %s from %s; the message is stored",
                          type(self).__name__, event.kind, event.device_id)

    def _handle_message(self, client, userdata, message) -> None:
        """Never raises: an exception here would end paho's network thread for good. Always
        acknowledges: a message that was not stored gets no delivery receipt, so its device
        sends it again."""
        if self.live is not None and parse_live_topic(message.topic) is not None:
            self._handle_live(client, message)
            return
        try:
            self._consume_message(message)
        except Exception:
            log.exception("could not store the message on %s; no receipt sent, so its device "
                          "sends it again", message.topic)
        finally:
            if message.qos > 0:
                client.ack(message.mid, message.qos)

    def _handle_live(self, client, message) -> None:
        """One live chunk to the receiver. Never raises, and is always acknowledged: a chunk
        that failed is not worth a redelivery."""
        try:
            device_id = parse_live_topic(message.topic)
            assert self.live is not None and device_id is not None
            header = header_from_properties(getattr(message, "properties", None))
            result = self.live.handle(device_id, bytes(message.payload), header)
            self._on_event(CenterEvent("live", device_id, result.as_dict(), result.accepted))
        except Exception:
            log.exception("could not handle the live chunk on %s; dropped", message.topic)
        finally:
            if message.qos > 0:
                client.ack(message.mid, message.qos)

    def _consume_message(self, message) -> None:
        """Validate, check the signature, store, send the delivery receipt. A message refused
        here is logged once (its device may send it again and again) and gets no receipt."""
        parsed = parse_device_topic(message.topic)
        if parsed is None:
            log.warning("ignored a message on unexpected topic %s", message.topic)
            return
        device_id, kind = parsed
        payload = bytes(message.payload)
        digest = payload_digest(payload)  # names it in a receipt, or in the refusals logged
        try:
            body = decode(kind, payload)
        except ProtocolError as exc:
            self._refuse(digest, "rejected message from %s on %s: %s", device_id,
                         message.topic, exc)
            return
        if body["device_id"] != device_id:
            self._refuse(digest, "rejected message on %s: it claims to come from %s",
                         message.topic, body["device_id"])
            return
        if kind is not MessageKind.STATUS:  # status is volatile and the will is unsignable
            try:
                verify(body, self._trust(device_id))
            except SignatureError as exc:
                self._refuse(digest, "rejected %s from %s seq=%s: %s; is the device enrolled "
                             "with its signing key? (sos-center ca list)", kind.value,
                             device_id, body.get("seq"), exc)
                return
        now = self._clock()
        try:
            match kind:
                case MessageKind.ALERT:
                    stored = self.store.add_alert(body, now, digest, self._route(body, now))
                    if not stored.new:
                        log.info("alert %s (seq %d) from %s received again: a re-send; it is "
                                 "stored once and receipted again", body["alert_id"][:8],
                                 body["seq"], device_id)
                    else:
                        _note_timing(body, now)
                    self._send_receipt(device_id, kind, body, digest, stored)
                    self._on_event(CenterEvent("alert", device_id, body, stored.new))
                case MessageKind.POSITION | MessageKind.EVENT:
                    leaf = "position" if kind is MessageKind.POSITION else "event"
                    stored = self.store.add_update(leaf, body, now, digest)
                    self._send_receipt(device_id, kind, body, digest, stored)
                    self._on_event(CenterEvent(leaf, device_id, body, stored.new))
        except (NotYours, NotTheSame) as exc:
            self._refuse(digest, "rejected %s from %s seq=%s: %s", kind.value, device_id,
                         body["seq"], exc)
            return
        if kind is MessageKind.STATUS:
            self.store.set_device_status(device_id, body, now)
            if self.live is not None:  # heartbeats pace the clean-up: a device that lost
                self.live.end_idle(self._live_idle_s)  # power mid-SOS sends no final chunk
            self._on_event(CenterEvent("status", device_id, body, True))
            if body["state"] == "online" and self._consume:
                self._resend_missed_decision(device_id, body)

    def _route(self, alert: dict[str, Any], now: float) -> tuple[str, tuple[str, ...]] | None:
        """The routing decision; a router that fails must not cost the alert: it is stored
        without desks, which every operator sees, and the failure is logged."""
        if self._router is None:
            return None
        try:
            return self._router(alert, now)
        except Exception:
            log.exception("could not route alert %s from %s; stored for every desk",
                          alert.get("alert_id", "?")[:8], alert.get("device_id"))
            return ("routing failed", ())

    def _send_receipt(self, device_id: str, kind: MessageKind, body: dict[str, Any],
                      digest: str, stored: Stored) -> None:
        """Tell the device, signed, that its message is stored (or was, for a re-send): only
        this lets it drop the message from its outbox and show DELIVERED."""
        receipt: dict[str, Any] = {
            "v": 1, "type": "delivered", "device_id": device_id, "seq": body["seq"],
            "message": kind.value, "digest": digest,
            "stored_at": utc_iso(datetime.fromtimestamp(stored.stored_at, UTC)),
            "duplicate": not stored.new,
        }
        if "alert_id" in body:
            receipt["alert_id"] = body["alert_id"]
        signed = encode(MessageKind.DELIVERY_RECEIPT, self._signer.sign(receipt))
        info = self._client.publish(Topics(device_id).command, signed, qos=1)
        with self._puback_arrived:  # paho's thread: its PUBACK cannot come before this
            self._unawaited_mids.add(info.mid)

    def _refuse(self, digest: str, text: str, *args: object) -> None:
        """Log a refused message once: its device re-sends it until receipted."""
        if digest in self._refusals:
            self._refusals.move_to_end(digest)
            log.debug(text + " (again)", *args)
            return
        self._refusals[digest] = None
        if len(self._refusals) > REFUSALS_REMEMBERED:
            self._refusals.popitem(last=False)
        log.error(text, *args)


def _note_timing(alert: dict[str, Any], received: float) -> None:
    """An alert outside the DC-09 window is still taken: one that waited in a device's outbox
    through an outage is real, and replays are caught by signature and alert id instead."""
    created = datetime.fromisoformat(alert["created_at"].replace("Z", "+00:00"))
    problem = window_error(created, datetime.fromtimestamp(received, UTC))
    if problem is not None:
        log.warning("alert %s from %s: %s (delivered late, or the device clock is off)",
                    alert["alert_id"][:8], alert["device_id"], problem)


class FleetTrust:
    """Device signing keys from the fleet registry, re-read whenever the registry file changed.

    Enrolment, re-keying (a re-flashed device) and revocation happen in another process (`sos-
    center ca`), and a running centre must follow them: a stale key would refuse every alert of a
    re-flashed device, and a revoked device's key must stop being trusted. The file is looked at
    (one stat, microseconds) at most every `check_s`, by default for every message, so a change
    applies from the next message on.
    """

    def __init__(self, fleet: Fleet, check_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fleet = fleet
        self._check_s = check_s
        self._clock = clock
        self._checked_at: float | None = None
        self._seen = registry_stamp(fleet.registry_file)
        self._lock = threading.Lock()

    def __call__(self, device_id: str) -> list[Ed25519PublicKey]:
        with self._lock:
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= self._check_s:
                self._checked_at = now
                stamp = registry_stamp(self._fleet.registry_file)
                if stamp != self._seen:
                    self._reload(stamp)
            return self._fleet.signing_keys(device_id)

    def _reload(self, stamp: tuple[int, int, int] | None) -> None:
        try:
            self._fleet.reload()
        except (OSError, ValueError) as exc:  # caught mid-write by hand: keep the last good one
            log.error("could not re-read the fleet registry %s: %s; keeping the keys read "
                      "before", self._fleet.registry_file, exc)
            return
        self._seen = stamp
        log.info("fleet registry %s changed: device keys re-read", self._fleet.registry_file)
