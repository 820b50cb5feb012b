"""The voice call on the device: the engine, the spoken message and the pillar's lamps together.

The device loop (firmware/device.py) owns one `DeviceVoice`. It hands over the alert core's voice
actions (an offer, a hang-up, the alert's end), the alert's stage as it changes, and the engine's
news; it gets back the events to send (`voice_answer`, `voice_state`, `voice_fault`,
`voice_restored`) and a deadline for the next spoken message. Everything here runs on the device
loop's thread; only the engine has a thread (and loop) of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from firmware.voice.engine import (
    VoiceAnswer,
    VoiceEngine,
    VoiceFaultChanged,
    VoiceNews,
    VoiceStateChanged,
)
from firmware.voice.lights import PillarLamps, lamps_for
from firmware.voice.message import MessageSchedule
from protocol.messages import MessageKind, utc_iso
from protocol.topics import Topics

log = logging.getLogger("sos.voice")

BUILT_IN_MESSAGE = Path(__file__).resolve().parent / "sounds" / "call-received.wav"


class DeviceVoice:
    def __init__(self, engine: VoiceEngine, *, device_id: str, utc: Callable[[], datetime],
                 message: MessageSchedule | None, message_file: Path | None,
                 lamps: PillarLamps | None = None) -> None:
        """`message`: when the spoken message plays (two_way only; None: never).
        `lamps`: the pillar's yellow and green lamps (None: a device without them)."""
        self.engine = engine
        self._device_id = device_id
        self._utc = utc
        self._message = message
        self._message_file = message_file or BUILT_IN_MESSAGE
        self._lamps = lamps
        self._stage: str | None = None
        self._shown = "idle"  # what the device shows (a FeedbackState value): the yellow lamp
        self._call_state = "idle"
        self._session: str | None = None
        self.fault: str | None = None  # the status's faults["voice"]

    # -- inputs from the device loop -------------------------------------------------------------
    def offer(self, alert_id: str, session: str, sdp: str,
              ice_servers: list[dict[str, Any]]) -> None:
        self._session = session
        self._set_call_state("connecting")
        self.engine.offer(alert_id, session, sdp, ice_servers)

    def hangup(self, session: str) -> None:
        self.engine.hangup(session)

    def alert_ended(self) -> None:
        self.engine.end_all("the alert was closed")
        if self._message is not None:
            self._message.closed()
        self._session = None
        self._set_call_state("idle")

    def stage_changed(self, stage: str | None, now: float) -> None:
        """The active alert's stage (sending, delivered, acknowledged, cancelled), or None."""
        if stage == self._stage:
            return
        before, self._stage = self._stage, stage
        if self._message is not None and stage in ("delivered", "acknowledged") \
                and before in (None, "sending"):
            self._message.delivered(now)
        if stage is None and before is not None:
            self.alert_ended()

    def shown(self, feedback: str) -> None:
        """What the device shows now (a FeedbackState value: sending, retrying, delivered,
        ...): the yellow lamp follows it, as the status LED does."""
        self._shown = feedback
        self._show()

    def news(self, item: VoiceNews, now: float) -> list[tuple[str, dict[str, Any]]]:
        """The engine's news as (event type, fields) to send; updates lamps and the message."""
        match item:
            case VoiceAnswer(alert_id, session, sdp):
                return [("voice_answer", {"alert_id": alert_id, "voice_session": session,
                                          "sdp": sdp})]
            case VoiceStateChanged(alert_id, session, state, reason):
                if session == self._session or state in ("connecting", "connected"):
                    self._session = session
                    self._set_call_state(state)
                    self._follow_message(state, now)
                fields: dict[str, Any] = {"alert_id": alert_id, "voice_session": session,
                                          "voice_state": state}
                if reason:
                    fields["reason"] = reason[:200]
                return [("voice_state", fields)]
            case VoiceFaultChanged(reason):
                was, self.fault = self.fault, reason
                if reason is not None:
                    log.error("voice fault: %s; the spoken message tells the caller help is "
                              "coming", reason)
                    return [("voice_fault", {"reason": reason[:200]})]
                return [("voice_restored", {"reason": f"was: {was}"[:200]})]
        return []

    def tick(self, now: float) -> None:
        if self._message is not None and self._message.due(now):
            log.info("voice: no operator on the line; playing the spoken message")
            self.engine.play_clip(self._message_file)

    def next_deadline(self) -> float | None:
        return self._message.next_at() if self._message is not None else None

    def close(self) -> None:
        self.engine.close()
        if self._lamps is not None:
            self._lamps.close()

    # -- helpers ---------------------------------------------------------------------------------
    def _follow_message(self, state: str, now: float) -> None:
        if self._message is None:
            return
        if state == "connected":
            self._message.operator_connected()
        elif state in ("interrupted", "failed", "ended") and self._stage is not None:
            self._message.operator_lost(now)

    def _set_call_state(self, state: str) -> None:
        self._call_state = state
        self._show()

    def _show(self) -> None:
        if self._lamps is not None:
            self._lamps.show(lamps_for(self._shown, self._call_state))

    def event(self, kind: str, fields: dict[str, Any]) -> tuple[MessageKind, str,
                                                                dict[str, Any]]:
        """The message of one event (the outbox numbers and signs it)."""
        message = {"v": 1, "device_id": self._device_id, "created_at": utc_iso(self._utc()),
                   "type": kind, **fields}
        return MessageKind.EVENT, Topics(self._device_id).event, message
