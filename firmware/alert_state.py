"""The device's SOS state machine: pure logic, no I/O, no clock of its own.

Inputs are small event objects handed to `AlertCore.handle(event, now, readings)`; the result is a
list of actions for the runtime to carry out in order (store messages durably, show feedback, log).
The same code runs on the Pi and in the simulator, and tests drive it with exact times.

Life of an alert:

    idle --trigger--> sending --receipt--> delivered --ack--> acknowledged --close--> closed -> idle
              (link down before the receipt: retrying; cancel gesture on the token: cancelled)

While an alert is active the device sends a position update every `position_interval_s` until the
operator closes it. A cancel is a request reported to the operator, never a silent stop: position
updates go on until the operator closes the alert.

Independently, the core keeps the current dispatch call (`call_id`), which the recorder follows:
set by dispatch's `call_start`/`call_end` commands or toggled by the wearer's call gesture (token,
no alert active), and resumed after a reboot.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware.sos_button.states import FeedbackState
from firmware.uplink.outgoing import Outgoing
from protocol import MessageKind, ProtocolError, Topics, decode, new_id, utc_iso
from protocol.signing import SeqMemory, SignatureError, public_key_b64, verify, window_error
from protocol.untrusted import UntrustedJsonError, loads_untrusted

CLOSED_DISPLAY_S = 5.0  # how long "closed" shows before the device returns to idle
CALL_DISPLAY_S = 4.0  # how long "call_started"/"call_ended" show: the longest is 2 x (1.5 + 0.5) s
REMEMBERED_COMMANDS = 32  # command ids kept to recognise a redelivered command
COMMAND_TYPES = ("ack", "close", "call_start", "call_end", "voice_offer",
                 "voice_hangup")  # what this firmware can apply
VOICE_COMMANDS = ("voice_offer", "voice_hangup")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


class Refusal(StrEnum):
    """Why a command was refused: the `reason_code` of its `command_rejected` event
    (docs/PROTOCOL.md, "Commands and their validation")."""

    INVALID = "invalid"  # breaks the command schema
    UNKNOWN_TYPE = "unknown_type"  # a command type this firmware does not know
    BAD_SIGNATURE = "bad_signature"  # not signed by a key in trust.centre_keys
    EXPIRED = "expired"  # issued more than 40 s ago by the device's clock
    FUTURE = "future"  # issued more than 20 s ahead of the device's clock
    REPLAYED = "replayed"  # its centre key's sequence number was seen before
    NOT_ACTIVE_ALERT = "not_active_alert"  # ack/close for an alert that is not the active one
    UNSUPPORTED = "unsupported"  # a voice command to a device without voice ([audio], [voice])


class Stage(StrEnum):
    SENDING = "sending"
    DELIVERED = "delivered"
    ACKNOWLEDGED = "acknowledged"
    CANCELLED = "cancelled"


# -- inputs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trigger:
    trigger: str  # "button_hold" (token) or "button_press" (pillar)


@dataclass(frozen=True)
class CancelGesture:
    pass


@dataclass(frozen=True)
class CallGesture:
    """The wearer's call gesture: start a call's recording, or end the one running."""


@dataclass(frozen=True)
class LinkUp:
    pass


@dataclass(frozen=True)
class LinkDown:
    pass


@dataclass(frozen=True)
class MessageDelivered:
    kind: MessageKind
    alert_id: str | None


@dataclass(frozen=True)
class CommandPayload:
    payload: bytes


@dataclass(frozen=True)
class Tick:
    pass


CoreEvent = (Trigger | CancelGesture | CallGesture | LinkUp | LinkDown | MessageDelivered
             | CommandPayload | Tick)


# -- context and outputs -------------------------------------------------------------------------
@dataclass(frozen=True)
class Now:
    mono: float  # monotonic seconds, for scheduling
    utc: datetime  # wall-clock UTC, only for timestamps in messages


@dataclass(frozen=True)
class Readings:
    position: dict[str, Any]
    battery: dict[str, Any] | None


@dataclass(frozen=True)
class AppendToOutbox:
    """Append these messages to the outbox, with the device state, in one durable transaction."""

    items: list[Outgoing]
    state: dict[str, Any]


@dataclass(frozen=True)
class Persist:
    """Save the device state (no message to send with it)."""

    state: dict[str, Any]


@dataclass(frozen=True)
class CallChange:
    """A call started (call_id) or ended (None), by dispatch or the wearer: the recorder
    follows."""

    call_id: str | None


@dataclass(frozen=True)
class RecordSos:
    """An SOS started (active) or ended: the recorder records it and flags its window."""

    alert_id: str
    active: bool


@dataclass(frozen=True)
class Show:
    state: FeedbackState


@dataclass(frozen=True)
class Log:
    level: str  # "info" | "warning" | "error"
    text: str


@dataclass(frozen=True)
class VoiceOffer:
    """The operator's browser offers a voice call for the active alert: answer it."""

    alert_id: str
    session: str
    sdp: str
    ice_servers: list[dict[str, Any]]


@dataclass(frozen=True)
class VoiceHangup:
    session: str


@dataclass(frozen=True)
class VoiceEnd:
    """The alert ended: every voice call ends with it."""

    alert_id: str


Action = (AppendToOutbox | Persist | Show | Log | CallChange | RecordSos | VoiceOffer
          | VoiceHangup | VoiceEnd)


@dataclass
class ActiveAlert:
    alert_id: str
    stage: Stage
    next_position: float = 0.0


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    device_kind: str  # "token" | "pillar"
    position_interval_s: float = 5.0
    voice: bool = False  # takes voice calls (config [audio] and [voice])


@dataclass
class AlertCore:
    """`command_keys`: the centre's public keys. Every command must be signed by one of them,
    carry a sequence number this device has not seen, and be issued within the DC-09 window of
    the device's clock; anything else is rejected and changes nothing."""

    identity: DeviceIdentity
    command_keys: list[Ed25519PublicKey]
    new_alert_id: Callable[[], str] = new_id
    active: ActiveAlert | None = None
    link_up: bool = False
    feedback: FeedbackState = FeedbackState.IDLE
    call_id: str | None = None  # the call being recorded, if any
    closed_alert_id: str | None = None  # the alert just closed, while "closed" shows
    _idle_at: float | None = None
    _transient: FeedbackState = FeedbackState.CLOSED  # shown until _idle_at (no active alert)
    _seen_commands: deque[str] = field(default_factory=lambda: deque(maxlen=REMEMBERED_COMMANDS))
    # Sequence numbers seen, per centre signing key (base64): each centre counts on its own.
    _command_seqs: dict[str, SeqMemory] = field(default_factory=dict)
    _legacy_seqs: dict[str, Any] | None = None  # one memory for all, from before per-key ones

    def __post_init__(self) -> None:
        self.topics = Topics(self.identity.device_id)

    # -- persistence -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What must survive a crash or reboot (stored with the messages that change it)."""
        active = None
        if self.active is not None:
            active = {"alert_id": self.active.alert_id, "stage": self.active.stage.value}
        return {"active": active, "seen_commands": list(self._seen_commands),
                "command_seqs": {key: seqs.to_json() for key, seqs in self._command_seqs.items()},
                "legacy_command_seqs": self._legacy_seqs,
                "call_id": self.call_id}

    def restore(self, state: dict[str, Any] | None, now: Now) -> list[Action]:
        """Resume after a restart: an alert that was active stays active, a call that was being
        recorded goes on being recorded under the same id."""
        if not state:
            return []
        self._seen_commands.extend(state.get("seen_commands", []))
        seqs = state.get("command_seqs") or {}
        self._legacy_seqs = state.get("legacy_command_seqs")
        if "floor" in seqs:  # saved before replay windows were per centre key
            self._legacy_seqs, seqs = seqs, {}
        self._command_seqs = {key: SeqMemory.from_json(data) for key, data in seqs.items()}
        actions: list[Action] = []
        self.call_id = state.get("call_id")
        if self.call_id is not None:
            actions += [CallChange(self.call_id),
                        Log("warning", f"resumed call {self.call_id} after a restart")]
        active = state.get("active")
        if not active:
            return actions
        self.active = ActiveAlert(active["alert_id"], Stage(active["stage"]), now.mono)
        return [
            *actions,
            Log("warning", f"resumed active SOS {self.active.alert_id} ({self.active.stage}) "
                           "after a restart"),
            RecordSos(self.active.alert_id, True),
            *self._refresh_feedback(),
        ]

    def showing_closed(self) -> str | None:
        """The alert whose close is on show ("closed", for CLOSED_DISPLAY_S), if any: the status
        reports it so a centre knows its close was applied."""
        if self._idle_at is not None and self._transient is FeedbackState.CLOSED:
            return self.closed_alert_id
        return None

    # -- scheduling ------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        times = [self._idle_at, self.active.next_position if self.active else None]
        pending = [t for t in times if t is not None]
        return min(pending) if pending else None

    # -- the transition function -----------------------------------------------------------------
    def handle(self, event: CoreEvent, now: Now, readings: Readings) -> list[Action]:
        match event:
            case Trigger(trigger):
                return self._on_trigger(trigger, now, readings)
            case CancelGesture():
                return self._on_cancel(now)
            case CallGesture():
                return self._on_call_gesture(now)
            case LinkUp():
                self.link_up = True
                return self._refresh_feedback()
            case LinkDown():
                self.link_up = False
                return self._refresh_feedback()
            case MessageDelivered(kind, alert_id):
                return self._on_delivered(kind, alert_id)
            case CommandPayload(payload):
                return self._on_command(payload, now)
            case Tick():
                return self._on_tick(now, readings)
        raise TypeError(f"unknown event {event!r}")

    def _on_trigger(self, trigger: str, now: Now, readings: Readings) -> list[Action]:
        if self.active is not None:
            return [Log("info", f"SOS already active ({self.active.alert_id}); press ignored")]
        self._idle_at = None
        alert_id = self.new_alert_id()
        record = RecordSos(alert_id, True)
        self.active = ActiveAlert(alert_id, Stage.SENDING,
                                  now.mono + self.identity.position_interval_s)
        message = {
            "v": 1,
            "alert_id": alert_id,
            "device_id": self.identity.device_id,
            "device_kind": self.identity.device_kind,
            "trigger": trigger,
            "created_at": utc_iso(now.utc),
            "position": readings.position,
            "battery": readings.battery,
        }
        return [
            AppendToOutbox([Outgoing(MessageKind.ALERT, self.topics.alert, message)], self.state()),
            record,
            Log("warning", f"SOS {alert_id} raised ({trigger}, position "
                           f"{readings.position['source']})"),
            *self._refresh_feedback(),
        ]

    def _on_cancel(self, now: Now) -> list[Action]:
        if self.active is None or self.active.stage is Stage.CANCELLED:
            return []
        if self.identity.device_kind != "token":
            return [Log("warning", "cancel gesture ignored: this device cannot be cancelled")]
        self.active.stage = Stage.CANCELLED
        event = self._event("cancel_requested", now)
        return [
            AppendToOutbox([event], self.state()),
            Log("warning", f"SOS {self.active.alert_id}: cancel requested by the wearer; "
                           "reported to the operator, who closes the alert"),
            *self._refresh_feedback(),
        ]

    def _on_call_gesture(self, now: Now) -> list[Action]:
        if self.identity.device_kind != "token":
            return [Log("warning", "call gesture ignored: this device does not record calls")]
        if self.active is not None:  # the button logic does not recognise it then; a race
            return [Log("info", f"call gesture ignored: SOS {self.active.alert_id} is active")]
        if self.call_id is None:
            # The time for people, a random part because the clock may not be set yet after a
            # reboot (two calls in one second, or a clock that restarted, must not merge).
            self.call_id = (f"{self.identity.device_id}-{now.utc:%Y%m%dT%H%M%SZ}-"
                            f"{self.new_alert_id()[:6]}")
            call_id, kind, shown = self.call_id, "call_started", FeedbackState.CALL_STARTED
            text = f"call started by the wearer's gesture: {call_id}"
        else:
            call_id, self.call_id = self.call_id, None
            kind, shown = "call_ended", FeedbackState.CALL_ENDED
            text = f"call {call_id} ended by the wearer's gesture"
        self._transient, self._idle_at = shown, now.mono + CALL_DISPLAY_S
        event = self._event(kind, now, call_id=call_id)
        return [AppendToOutbox([event], self.state()), CallChange(self.call_id), Log("info", text),
                *self._refresh_feedback()]

    def _on_delivered(self, kind: MessageKind, alert_id: str | None) -> list[Action]:
        active = self.active
        if kind is MessageKind.ALERT and active is not None and active.alert_id == alert_id \
                and active.stage is Stage.SENDING:
            active.stage = Stage.DELIVERED
            return [Persist(self.state()), *self._refresh_feedback()]
        return []

    def _on_command(self, payload: bytes, now: Now) -> list[Action]:
        """Every command with a readable id ends in a `command_applied` or `command_rejected`
        event, so the centre learns its outcome; only an unreadable one gets just a log line."""
        try:
            command = decode(MessageKind.COMMAND, payload)
        except ProtocolError as exc:
            return self._refuse_invalid(payload, exc, now)
        try:
            sender = public_key_b64(verify(command, self.command_keys))
        except SignatureError as exc:
            return self._reject(command, Refusal.BAD_SIGNATURE,
                                f"{exc} (not from the control centre)", now)
        if command["command_id"] in self._seen_commands:  # authentic, and changes nothing now
            return self._report_applied_again(command, now)
        late = self._window_problem(command, now)
        if late is not None:
            return self._reject(command, *late, now)
        # The replay check comes last, so a forgery cannot burn a number the real centre uses.
        if not self._seqs_of(sender).accept(command["seq"]):
            return self._reject(command, Refusal.REPLAYED, f"sequence number {command['seq']} "
                                "already seen (replayed)", now)
        if command["type"] in ("call_start", "call_end"):
            return self._apply_call(command, now)
        if command["type"] in VOICE_COMMANDS and not self.identity.voice:
            return self._reject(command, Refusal.UNSUPPORTED, "this device has no voice call "
                                "(no [audio] section, or voice.mode = \"off\")", now)
        if self.active is None or self.active.alert_id != command["alert_id"]:
            return self._reject(command, Refusal.NOT_ACTIVE_ALERT,
                                f"alert {command['alert_id']} is not the active alert", now)
        if command["type"] in VOICE_COMMANDS:
            return self._apply_voice(command, now)
        return self._apply_decision(command, now)

    def _apply_voice(self, command: dict[str, Any], now: Now) -> list[Action]:
        """An offer (or a hang-up) for the active alert's voice call: the voice engine answers
        it, and the answer follows as its own event; nothing in the alert changes."""
        assert self.active is not None
        self._seen_commands.append(command["command_id"])
        session = command["voice_session"]
        action: Action
        if command["type"] == "voice_offer":
            action = VoiceOffer(self.active.alert_id, session, command["sdp"],
                                command.get("ice_servers", []))
            text = f"voice call {session[:8]} offered by {command['operator']}"
        else:
            action = VoiceHangup(session)
            text = f"voice call {session[:8]}: {command['operator']} hung up"
        applied = self._command_event(command, "command_applied", now)
        return [AppendToOutbox([applied], self.state()), action, Log("info", text)]

    def _apply_call(self, command: dict[str, Any], now: Now) -> list[Action]:
        self._seen_commands.append(command["command_id"])
        call_id = command.get("call_id") if command["type"] == "call_start" else None
        self.call_id = call_id
        applied = self._command_event(command, "command_applied", now)
        return [AppendToOutbox([applied], self.state()), CallChange(call_id),
                Log("info", f"call {'started: ' + call_id if call_id else 'ended'} "
                            f"({command['operator']})")]

    def _apply_decision(self, command: dict[str, Any], now: Now) -> list[Action]:
        """`ack` or `close` for the active alert; its event is stored with the new state."""
        assert self.active is not None
        alert_id = self.active.alert_id
        self._seen_commands.append(command["command_id"])
        actions: list[Action]
        if command["type"] == "ack":
            self.active.stage = Stage.ACKNOWLEDGED
            actions = [Log("info", f"SOS {alert_id} acknowledged by {command['operator']}")]
        else:
            self.active = None
            self.closed_alert_id = alert_id
            self._transient, self._idle_at = FeedbackState.CLOSED, now.mono + CLOSED_DISPLAY_S
            actions = [Log("info", f"SOS {alert_id} closed by {command['operator']}"),
                       RecordSos(alert_id, False), VoiceEnd(alert_id)]
        applied = self._command_event(command, "command_applied", now)
        return [AppendToOutbox([applied], self.state()), *actions, *self._refresh_feedback()]

    def _report_applied_again(self, command: dict[str, Any], now: Now) -> list[Action]:
        """A redelivery of a command already applied changes nothing, but is answered again:
        the centre that sent it again did so for want of an answer."""
        applied = self._command_event(command, "command_applied", now)
        return [AppendToOutbox([applied], self.state()),
                Log("info", f"command {command['command_id']} ({command['type']}) already "
                            "applied; ignored (a redelivery), reported as applied again")]

    def _reject(self, command: dict[str, Any], refusal: Refusal, problem: str,
                now: Now) -> list[Action]:
        """Refuse a command: nothing changes; the centre gets `command_rejected`."""
        rejected = self._command_event(command, "command_rejected", now, refusal, problem)
        return [AppendToOutbox([rejected], self.state()),
                Log("error", f"rejected {command['type']} command {command['command_id']}: "
                             f"{problem}; nothing changed")]

    def _refuse_invalid(self, payload: bytes, exc: ProtocolError, now: Now) -> list[Action]:
        """A command breaking the schema. If its `command_id` can be read, the centre is told
        (`invalid`, or `unknown_type` for a type this firmware does not know); otherwise only
        the log line: there is nothing to name the answer by."""
        actions: list[Action] = [Log("error", f"rejected command: {exc}; nothing changed")]
        readable = _readable_command(payload)
        if readable is None:
            return actions
        refusal = (Refusal.UNKNOWN_TYPE if isinstance(readable.get("type"), str)
                   and readable["type"] not in COMMAND_TYPES else Refusal.INVALID)
        rejected = self._command_event(readable, "command_rejected", now, refusal, str(exc))
        return [AppendToOutbox([rejected], self.state()), *actions]

    def _on_tick(self, now: Now, readings: Readings) -> list[Action]:
        actions: list[Action] = []
        if self._idle_at is not None and now.mono >= self._idle_at:
            self._idle_at = None
            actions += self._refresh_feedback()
        active = self.active
        if active is not None and now.mono >= active.next_position:
            # After a long stall, skip the missed slots rather than sending a burst.
            active.next_position = max(active.next_position + self.identity.position_interval_s,
                                       now.mono + self.identity.position_interval_s / 2)
            update = {
                "v": 1,
                "alert_id": active.alert_id,
                "device_id": self.identity.device_id,
                "created_at": utc_iso(now.utc),
                "position": readings.position,
                "battery": readings.battery,
            }
            position = Outgoing(MessageKind.POSITION, self.topics.position, update)
            actions.append(AppendToOutbox([position], self.state()))
        return actions

    @staticmethod
    def _window_problem(command: dict[str, Any], now: Now) -> tuple[Refusal, str] | None:
        """Why the command is outside the DC-09 window of the device's clock, or None."""
        issued = datetime.fromisoformat(command["issued_at"].replace("Z", "+00:00"))
        late = window_error(issued, now.utc)
        if late is None:
            return None
        refusal = Refusal.FUTURE if issued > now.utc else Refusal.EXPIRED
        return refusal, f"{late}; replayed, or this device's clock is wrong"

    def _seqs_of(self, sender: str) -> SeqMemory:
        """The replay memory of one centre key: any number of centres, ours or a partner's, can
        command this device without sharing a counter. A window saved before windows were per
        key (one counter, the fleet's command key, the first of `command_keys`) goes on
        guarding that key alone, and is kept in the state until that key has its own."""
        if sender not in self._command_seqs:
            fleet_key = bool(self.command_keys) and sender == public_key_b64(self.command_keys[0])
            legacy = self._legacy_seqs if fleet_key else None
            self._command_seqs[sender] = SeqMemory.from_json(legacy)
            if fleet_key:
                self._legacy_seqs = None
        return self._command_seqs[sender]

    # -- helpers ---------------------------------------------------------------------------------
    def _command_event(self, command: dict[str, Any], kind: str, now: Now,
                       refusal: Refusal | None = None, problem: str | None = None) -> Outgoing:
        """The outcome of a command, naming exactly the alert it named (none for a call)."""
        event = self._event(kind, now, command_id=command["command_id"],
                            reason=problem[:200] if problem else None)
        alert_id = command.get("alert_id")
        event.message.pop("alert_id", None)
        if isinstance(alert_id, str) and _HEX32.match(alert_id):
            event.message["alert_id"] = alert_id
        if refusal is not None:
            event.message["reason_code"] = refusal.value
        if command.get("type") in COMMAND_TYPES:
            event.message["command_type"] = command["type"]
        return event

    def _event(self, kind: str, now: Now, alert_id: str | None = None,
               command_id: str | None = None, reason: str | None = None, *,
               call_id: str | None = None) -> Outgoing:
        message: dict[str, Any] = {
            "v": 1,
            "device_id": self.identity.device_id,
            "created_at": utc_iso(now.utc),
            "type": kind,
        }
        alert_id = alert_id or (self.active.alert_id if self.active else None)
        if alert_id is not None:
            message["alert_id"] = alert_id
        if command_id is not None:
            message["command_id"] = command_id
        if reason is not None:
            message["reason"] = reason
        if call_id is not None:
            message["call_id"] = call_id
        return Outgoing(MessageKind.EVENT, self.topics.event, message)

    def _wanted_feedback(self) -> FeedbackState:
        active = self.active
        if active is None:
            return self._transient if self._idle_at is not None else FeedbackState.IDLE
        if active.stage is Stage.SENDING:
            return FeedbackState.SENDING if self.link_up else FeedbackState.RETRYING
        return {
            Stage.DELIVERED: FeedbackState.DELIVERED,
            Stage.ACKNOWLEDGED: FeedbackState.ACKNOWLEDGED,
            Stage.CANCELLED: FeedbackState.CANCELLED,
        }[active.stage]

    def _refresh_feedback(self) -> list[Action]:
        wanted = self._wanted_feedback()
        if wanted is self.feedback:
            return []
        self.feedback = wanted
        return [Show(wanted)]


def _readable_command(payload: bytes) -> dict[str, Any] | None:
    """A schema-invalid command that is still a JSON object with a well-formed `command_id`,
    within the untrusted-JSON limits; None if there is no id to answer by."""
    try:
        parsed = loads_untrusted(payload)
    except UntrustedJsonError:
        return None
    if not isinstance(parsed, dict):
        return None
    command_id = parsed.get("command_id")
    if not isinstance(command_id, str) or not _HEX32.match(command_id):
        return None
    return {"command_id": command_id, "type": parsed.get("type"),
            "alert_id": parsed.get("alert_id")}
