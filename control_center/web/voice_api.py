"""The console's side of a voice call: the operator's browser offers, the device answers.

`POST /api/alerts/{id}/voice` carries the browser's complete SDP offer. The centre signs it into
a `voice_offer` command for the alert's device, with STUN/TURN servers and short-lived TURN
credentials of the device's own, and answers the request with the device's `voice_answer`
once it is stored: by this instance (woken at once) or by another one sharing the store (seen
by polling, every `POLL_S`). docs/VOICE.md has the whole flow; docs/CONSOLE-API.md the contract.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from control_center.store import Store
from control_center.turn_credentials import ice_servers_for

log = logging.getLogger("sos.center.voice")

POLL_S = 0.2  # how often a waiting offer looks into the shared store
SDP_MAX = 10_000  # the command schema's limit
SESSION = re.compile(r"[0-9a-f]{32}")


REFUSALS = {  # what the operator can do about a device's refusal of an offer
    "unsupported": ": this device has no voice call (its [audio]/[voice] config)",
    "not_active_alert": ": the alert is no longer active on the device",
    "expired": ": the device's clock is off; check its time",
    "future": ": the device's clock is off; check its time",
}


class VoiceUnanswered(RuntimeError):
    """The device did not answer in time, or could not: the text says why."""


class VoiceRefused(VoiceUnanswered):
    """The device refused the offer (its `command_rejected`): offering again will not help."""


@dataclass
class VoiceRelay:
    """Hands each device's answer to the console request waiting for it."""

    store: Store
    clock: Callable[[], float] = time.monotonic
    _arrived: threading.Condition = field(default_factory=threading.Condition)

    def event_stored(self, message: dict[str, Any]) -> None:
        """CenterService's observer saw an event: wake the waiters if it is a voice one."""
        if str(message.get("type", "")).startswith("voice_") or \
                message.get("command_type") in ("voice_offer", "voice_hangup"):
            with self._arrived:
                self._arrived.notify_all()

    def wait_answer(self, alert_id: str, session: str, command_id: str,
                    timeout_s: float) -> dict[str, Any]:
        """The device's `voice_answer` for `session`; VoiceUnanswered if it refused the offer
        (its `command_rejected`) or did not answer within `timeout_s`."""
        deadline = self.clock() + timeout_s
        while True:
            answer = self._answer(alert_id, session)
            if answer is not None:
                return answer
            refused = self.store.command(command_id)
            if refused is not None and refused["status"] == "rejected":
                raise VoiceRefused(f"the device refused the call ({refused['reason_code']}"
                                      f"{REFUSALS.get(refused['reason_code'] or '', '')})")
            failed = self._failed(alert_id, session)
            if failed is not None:
                raise VoiceUnanswered(f"the device could not answer: {failed}")
            left = deadline - self.clock()
            if left <= 0:
                raise VoiceUnanswered(f"the device did not answer within {timeout_s:g} s (is "
                                      "it online? the alert's device status says)")
            with self._arrived:
                self._arrived.wait(min(POLL_S, left))

    def _answer(self, alert_id: str, session: str) -> dict[str, Any] | None:
        for event in self.store.voice_events(alert_id):
            if event["type"] == "voice_answer" and event.get("voice_session") == session:
                return event
        return None

    def _failed(self, alert_id: str, session: str) -> str | None:
        for event in self.store.voice_events(alert_id):
            if event["type"] == "voice_state" and event.get("voice_session") == session \
                    and event.get("voice_state") == "failed":
                return str(event.get("reason") or "failed")
        return None


def new_session() -> str:
    return secrets.token_hex(16)


def ice_servers(settings: Any, name: str, now_unix: float) -> list[dict[str, Any]]:
    """STUN/TURN servers for a browser or a device (`name`: the user or the device id);
    none without a `[voice]` section (loopback and LAN calls need none)."""
    if settings is None:
        return []
    return ice_servers_for(name, now_unix, settings)


def voice_state(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The alert's newest call state for its view: {state, voice_session, reason, at}."""
    states = [e for e in events if e["type"] == "voice_state"]
    if not states:
        return None
    last = states[-1]
    return {"state": last["voice_state"], "voice_session": last.get("voice_session"),
            "reason": last.get("reason"), "at": last.get("created_at")}
