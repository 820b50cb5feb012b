"""The voice call's signalling on the device: an offer is a command like any other, so it must be
the centre's, fresh, never seen before and for the active alert, and the device must have a
voice call (docs/VOICE.md, "What is refused"). Driven through the pure alert core with real
Ed25519 signatures and exact times."""

from __future__ import annotations

import json
from itertools import count

from firmware.alert_state import (
    AlertCore,
    CommandPayload,
    DeviceIdentity,
    LinkUp,
    Trigger,
    VoiceEnd,
    VoiceHangup,
    VoiceOffer,
)
from protocol.signing import Signer, public_key_from_b64
from tests.test_alert_state import CENTRE, IMPOSTOR, READINGS, at, rejection, stored

SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
SESSION = "5e" * 16
ICE = [{"urls": ["turn:turn.example:3478"], "username": "1767225600:pil-001",
        "credential": "c2VjcmV0"}]
_seq = count(10_000)


def pillar(voice: bool = True) -> AlertCore:
    ids = (f"{n:032x}" for n in count(1))
    core = AlertCore(DeviceIdentity("pil-001", "pillar", 5.0, voice=voice),
                     command_keys=[public_key_from_b64(CENTRE.public_key_b64)],
                     new_alert_id=lambda: next(ids))
    core.handle(LinkUp(), at(0), READINGS)
    core.handle(Trigger("button_press"), at(1), READINGS)
    return core


def offer(core: AlertCore, *, cid: str = "0f" * 16, seq: int | None = None,
          alert_id: str | None = None, signer: Signer | None = CENTRE,
          kind: str = "voice_offer") -> bytes:
    body = {"v": 1, "command_id": cid, "seq": seq or next(_seq), "type": kind,
            "alert_id": alert_id or core.active.alert_id,
            "issued_at": "2026-11-23T10:00:03.000Z", "operator": "alice",
            "voice_session": SESSION}
    if kind == "voice_offer":
        body |= {"sdp": SDP, "ice_servers": ICE}
    return json.dumps(signer.sign(body) if signer else body).encode()


def voice_actions(actions: list) -> list:
    return [a for a in actions if isinstance(a, VoiceOffer | VoiceHangup | VoiceEnd)]


def test_the_centres_offer_for_the_active_alert_is_answered_by_the_voice_engine() -> None:
    core = pillar()
    actions = core.handle(CommandPayload(offer(core)), at(2), READINGS)
    assert voice_actions(actions) == [VoiceOffer(core.active.alert_id, SESSION, SDP, ICE)]
    (applied,) = stored(actions)
    assert applied.message["type"] == "command_applied"
    assert applied.message["command_type"] == "voice_offer"


def test_an_unsigned_offer_is_refused_and_nothing_answers_it() -> None:
    core = pillar()
    actions = core.handle(CommandPayload(offer(core, signer=None)), at(2), READINGS)
    assert rejection(actions)["reason_code"] == "invalid"  # `sig` is required
    assert voice_actions(actions) == []


def test_an_offer_signed_by_another_key_is_refused_as_a_bad_signature() -> None:
    core = pillar()
    actions = core.handle(CommandPayload(offer(core, signer=IMPOSTOR)), at(2), READINGS)
    assert rejection(actions)["reason_code"] == "bad_signature"
    assert voice_actions(actions) == []


def test_a_replayed_offer_opens_no_second_call() -> None:
    core = pillar()
    payload = offer(core)
    core.handle(CommandPayload(payload), at(2), READINGS)
    again = core.handle(CommandPayload(payload), at(3), READINGS)
    assert voice_actions(again) == []  # reported applied again (a redelivery), nothing more


def test_a_replayed_sequence_number_under_a_new_id_is_refused() -> None:
    core = pillar()
    core.handle(CommandPayload(offer(core, seq=77_000)), at(2), READINGS)
    actions = core.handle(CommandPayload(offer(core, cid="1f" * 16, seq=77_000)), at(3),
                          READINGS)
    assert rejection(actions)["reason_code"] == "replayed"
    assert voice_actions(actions) == []


def test_an_offer_for_another_devices_alert_is_refused() -> None:
    core = pillar()
    actions = core.handle(CommandPayload(offer(core, alert_id="ab" * 16)), at(2), READINGS)
    assert rejection(actions)["reason_code"] == "not_active_alert"
    assert voice_actions(actions) == []


def test_a_device_without_voice_refuses_an_offer_as_unsupported() -> None:
    core = pillar(voice=False)
    actions = core.handle(CommandPayload(offer(core)), at(2), READINGS)
    assert rejection(actions)["reason_code"] == "unsupported"
    assert voice_actions(actions) == []


def test_the_operator_hanging_up_ends_only_the_call() -> None:
    core = pillar()
    core.handle(CommandPayload(offer(core)), at(2), READINGS)
    actions = core.handle(CommandPayload(offer(core, cid="2f" * 16, kind="voice_hangup")),
                          at(3), READINGS)
    assert voice_actions(actions) == [VoiceHangup(SESSION)]
    assert core.active is not None


def test_closing_the_alert_ends_its_call() -> None:
    core = pillar()
    alert_id = core.active.alert_id
    close = {"v": 1, "command_id": "3f" * 16, "seq": next(_seq), "type": "close",
             "alert_id": alert_id, "issued_at": "2026-11-23T10:00:03.000Z", "operator": "alice"}
    actions = core.handle(CommandPayload(json.dumps(CENTRE.sign(close)).encode()), at(3),
                          READINGS)
    assert voice_actions(actions) == [VoiceEnd(alert_id)]
