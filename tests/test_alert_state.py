"""The device's SOS state machine, driven with exact times and no I/O."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.alert_state import (
    CALL_DISPLAY_S,
    CLOSED_DISPLAY_S,
    AlertCore,
    AppendToOutbox,
    CallChange,
    CallGesture,
    CancelGesture,
    CommandPayload,
    DeviceIdentity,
    LinkDown,
    LinkUp,
    Log,
    MessageDelivered,
    Now,
    Persist,
    Readings,
    RecordSos,
    Show,
    Stage,
    Tick,
    Trigger,
)
from firmware.sos_button.feedback import FeedbackState
from protocol import MessageKind, validate
from protocol.signing import Signer, public_key_from_b64

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
READINGS = Readings(
    {"source": "live", "lat": 52.37, "lon": 4.89, "alt_m": 2.0, "accuracy_m": 4.0,
     "fix_time": "2026-11-23T10:00:00.000Z", "age_s": 0.4, "speed_mps": 0.0, "course_deg": None,
     "satellites": 9, "hdop": 0.8},
    {"percent": 81.0, "charging": False},
)


def at(seconds: float) -> Now:
    return Now(1000.0 + seconds, T0 + timedelta(seconds=seconds))


CENTRE = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
IMPOSTOR = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
_command_seq = count(1)


def make_core(kind: str = "token") -> AlertCore:
    ids = (f"{n:032x}" for n in count(1))
    core = AlertCore(DeviceIdentity(f"{kind[:3]}-001", kind, 5.0),
                     command_keys=[public_key_from_b64(CENTRE.public_key_b64)],
                     new_alert_id=lambda: next(ids))
    core.handle(LinkUp(), at(0), READINGS)
    return core


def stored(actions: list) -> list:
    return [item for a in actions if isinstance(a, AppendToOutbox) for item in a.items]


def shown(actions: list) -> list[FeedbackState]:
    return [a.state for a in actions if isinstance(a, Show)]


def command(core: AlertCore, kind: str, alert_id: str | None = None, cid: str = "c" * 32, *,
            seq: int | None = None, signer: Signer | None = CENTRE,
            issued_at: str = "2026-11-23T10:00:03.000Z") -> bytes:
    """A command as the centre sends it: signed, with the next sequence number."""
    body = {"v": 1, "command_id": cid, "seq": seq or next(_command_seq), "type": kind,
            "alert_id": alert_id or core.active.alert_id, "issued_at": issued_at,
            "operator": "op-7"}
    return json.dumps(signer.sign(body) if signer else body).encode()


def test_a_trigger_stores_a_valid_alert_and_shows_sending() -> None:
    core = make_core()
    actions = core.handle(Trigger("button_hold"), at(1), READINGS)
    (item,) = stored(actions)
    assert item.kind is MessageKind.ALERT
    validate(MessageKind.ALERT, {**item.message, "seq": 1})
    assert item.message["created_at"] == "2026-11-23T10:00:01.000Z"
    assert item.message["position"]["source"] == "live"
    assert shown(actions) == [FeedbackState.SENDING]


def test_the_alert_and_the_active_state_are_stored_together() -> None:
    core = make_core()
    (store,) = [a for a in core.handle(Trigger("button_hold"), at(1), READINGS)
                if isinstance(a, AppendToOutbox)]
    assert store.state["active"] == {"alert_id": core.active.alert_id, "stage": "sending"}


def test_a_trigger_while_the_link_is_down_shows_retrying() -> None:
    core = make_core()
    core.handle(LinkDown(), at(0.5), READINGS)
    assert shown(core.handle(Trigger("button_hold"), at(1), READINGS)) == [FeedbackState.RETRYING]


def test_puback_of_the_alert_shows_delivered_then_ack_shows_acknowledged() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(1), READINGS)
    delivered = core.handle(MessageDelivered(MessageKind.ALERT, core.active.alert_id), at(1.1),
                            READINGS)
    assert shown(delivered) == [FeedbackState.DELIVERED]
    (persist,) = [a for a in delivered if isinstance(a, Persist)]
    assert persist.state["active"]["stage"] == "delivered"
    acked = core.handle(CommandPayload(command(core, "ack")), at(3), READINGS)
    assert shown(acked) == [FeedbackState.ACKNOWLEDGED]
    (applied,) = stored(acked)
    assert applied.message["type"] == "command_applied"


def test_a_second_press_while_active_raises_no_second_alert() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(1), READINGS)
    assert stored(core.handle(Trigger("button_hold"), at(2), READINGS)) == []


def test_position_updates_every_interval_until_closed() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    assert core.next_deadline() == at(5).mono
    assert stored(core.handle(Tick(), at(4.9), READINGS)) == []
    (update,) = stored(core.handle(Tick(), at(5.0), READINGS))
    assert update.kind is MessageKind.POSITION
    assert core.next_deadline() == at(10).mono
    core.handle(CommandPayload(command(core, "close")), at(7), READINGS)
    assert stored(core.handle(Tick(), at(10), READINGS)) == []


def test_close_shows_closed_then_idle_after_the_display_time() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    assert shown(core.handle(CommandPayload(command(core, "close")), at(2), READINGS)) == \
        [FeedbackState.CLOSED]
    assert core.active is None
    assert shown(core.handle(Tick(), at(2 + CLOSED_DISPLAY_S), READINGS)) == [FeedbackState.IDLE]


@pytest.mark.parametrize("payload", [
    b"not json", b"{}", b'{"v":1,"type":"ack"}', b"\xff\xfe", b'[1]',
    b'{"v":1,"command_id":"NOT-HEX","type":"close"}',
])
def test_a_command_without_a_readable_id_is_only_logged_and_changes_nothing(
        payload: bytes) -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    before = core.state()
    actions = core.handle(CommandPayload(payload), at(1), READINGS)
    assert [a.level for a in actions if isinstance(a, Log)] == ["error"]
    assert stored(actions) == [] and shown(actions) == []
    assert core.state() == before


def rejection(actions: list) -> dict:
    """The one event stored, checked against the schema: a command_rejected."""
    (event,) = stored(actions)
    validate(MessageKind.EVENT, {**event.message, "seq": 1})
    assert event.message["type"] == "command_rejected"
    return event.message


def test_a_schema_invalid_command_with_a_readable_id_is_rejected_as_invalid() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    before = core.state()
    payload = (b'{"v":2,"command_id":"' + b"a" * 32 + b'","type":"close","alert_id":"'
               + b"0" * 31 + b'1","issued_at":"2026-11-23T10:00:03.000Z","operator":"x"}')
    actions = core.handle(CommandPayload(payload), at(1), READINGS)
    event = rejection(actions)
    assert (event["command_id"], event["reason_code"]) == ("a" * 32, "invalid")
    assert event["alert_id"] == "0" * 31 + "1"
    assert [a.level for a in actions if isinstance(a, Log)] == ["error"]
    assert core.state() == before and shown(actions) == []


def test_a_command_type_this_firmware_does_not_know_is_rejected_as_unknown_type() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    payload = (b'{"v":1,"command_id":"' + b"a" * 32 + b'","type":"self-destruct",'
               b'"issued_at":"2026-11-23T10:00:03.000Z","operator":"x"}')
    event = rejection(core.handle(CommandPayload(payload), at(1), READINGS))
    assert event["reason_code"] == "unknown_type" and "alert_id" not in event
    assert core.active is not None


def test_a_command_for_another_alert_is_rejected_and_reported() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    actions = core.handle(CommandPayload(command(core, "close", alert_id="f" * 32)), at(1),
                          READINGS)
    event = rejection(actions)
    assert (event["reason_code"], event["alert_id"]) == ("not_active_alert", "f" * 32)
    assert core.active is not None and shown(actions) == []


def test_a_redelivered_command_changes_nothing_but_is_reported_applied_again() -> None:
    """A centre sending it again did so for want of an answer: it gets one."""
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    ack = command(core, "ack")
    core.handle(CommandPayload(ack), at(1), READINGS)
    before = core.state()
    again = core.handle(CommandPayload(ack), at(2), READINGS)
    (event,) = stored(again)
    assert (event.message["type"], event.message["command_id"]) == ("command_applied", "c" * 32)
    assert core.state() == before and shown(again) == []
    assert [a.level for a in again if isinstance(a, Log)] == ["info"]


def test_a_redelivery_after_the_time_window_is_still_reported_applied() -> None:
    """The broker may hand a queued command over again minutes later: it was applied, so the
    answer is `applied`, not `expired`."""
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    ack = command(core, "ack")
    core.handle(CommandPayload(ack), at(3), READINGS)
    (event,) = stored(core.handle(CommandPayload(ack), at(300), READINGS))
    assert event.message["type"] == "command_applied"


def test_a_redelivered_close_is_reported_applied_again_after_the_alert_ended() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    alert_id = core.active.alert_id
    close = command(core, "close")
    core.handle(CommandPayload(close), at(1), READINGS)
    (event,) = stored(core.handle(CommandPayload(close), at(2), READINGS))
    assert (event.message["type"], event.message["alert_id"]) == ("command_applied", alert_id)
    assert core.active is None


@pytest.mark.parametrize(("forge", "reason", "code"), [
    ({"signer": None}, "'sig' is a required property", "invalid"),
    ({"signer": IMPOSTOR}, "bad signature", "bad_signature"),
    ({"issued_at": "2026-11-23T09:59:00.000Z"}, "s old", "expired"),
    ({"issued_at": "2026-11-23T10:01:00.000Z"}, "in the future", "future"),
])
def test_a_forged_or_stale_close_cannot_silence_an_sos(forge: dict, reason: str,
                                                       code: str) -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    actions = core.handle(CommandPayload(command(core, "close", **forge)), at(3), READINGS)
    (log,) = [a for a in actions if isinstance(a, Log)]
    assert log.level == "error" and reason in log.text
    assert core.active is not None and shown(actions) == []
    assert rejection(actions)["reason_code"] == code


PARTNER = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34))))


def two_centre_core() -> AlertCore:
    core = make_core()
    core.command_keys.append(public_key_from_b64(PARTNER.public_key_b64))
    core.handle(Trigger("button_hold"), at(0), READINGS)
    return core


def test_two_centres_with_their_own_keys_use_the_same_numbers_without_a_refusal() -> None:
    """Each centre key has its own replay window: a partner's centre counting from 1 does not
    make ours a replayer, nor the other way round."""
    core = two_centre_core()
    ours = core.handle(CommandPayload(command(core, "ack", cid="1" * 32, seq=5)), at(1), READINGS)
    theirs = core.handle(CommandPayload(command(core, "close", cid="2" * 32, seq=5,
                                                signer=PARTNER)), at(2), READINGS)
    assert [i.message["type"] for i in stored(ours) + stored(theirs)] == \
        ["command_applied", "command_applied"]


def test_a_number_a_centre_key_has_used_is_refused_for_that_key() -> None:
    core = two_centre_core()
    core.handle(CommandPayload(command(core, "ack", cid="1" * 32, seq=5, signer=PARTNER)),
                at(1), READINGS)
    replay = core.handle(CommandPayload(command(core, "close", cid="2" * 32, seq=5,
                                                signer=PARTNER)), at(2), READINGS)
    assert core.active is not None
    assert any("already seen" in a.text for a in replay if isinstance(a, Log))


LEGACY = {"active": None, "command_seqs": {"floor": 0, "recent": [7]}}


def test_a_replay_window_saved_before_per_key_windows_still_guards_the_fleet_key() -> None:
    core = make_core()
    core.restore(LEGACY, at(0))
    core.handle(Trigger("button_hold"), at(0), READINGS)
    replay = core.handle(CommandPayload(command(core, "close", seq=7)), at(1), READINGS)
    assert core.active is not None
    assert any("already seen" in a.text for a in replay if isinstance(a, Log))
    assert set(core.state()["command_seqs"]) == {CENTRE.public_key_b64}


def test_the_old_replay_window_survives_saves_until_the_fleet_key_has_its_own() -> None:
    core = make_core()
    core.restore(LEGACY, at(0))
    saved = core.handle(Trigger("button_hold"), at(0), READINGS)  # stores the state
    (state,) = [a.state for a in saved if isinstance(a, AppendToOutbox)]
    rebooted = make_core()
    rebooted.restore(state, at(1))
    rebooted.handle(Trigger("button_hold"), at(1), READINGS)
    replay = rebooted.handle(CommandPayload(command(rebooted, "close", seq=7)), at(2), READINGS)
    assert rebooted.active is not None
    assert any("already seen" in a.text for a in replay if isinstance(a, Log))


def test_a_partner_key_does_not_inherit_the_old_counter() -> None:
    """A partner's numbering may start at 1, whatever the fleet key used before."""
    core = two_centre_core()
    core.restore({**LEGACY, "command_seqs": {"floor": 500, "recent": []}}, at(0))
    applied = core.handle(CommandPayload(command(core, "ack", seq=5, signer=PARTNER)), at(1),
                          READINGS)
    assert [i.message["type"] for i in stored(applied)] == ["command_applied"]


def test_a_replayed_sequence_number_is_rejected_even_with_a_new_command_id() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    core.handle(CommandPayload(command(core, "ack", seq=900)), at(1), READINGS)
    replay = core.handle(CommandPayload(command(core, "close", cid="d" * 32, seq=900)), at(2),
                         READINGS)
    assert any("already seen (replayed)" in a.text for a in replay if isinstance(a, Log))
    assert core.active is not None
    assert rejection(replay)["reason_code"] == "replayed"


def test_a_forgery_does_not_use_up_the_sequence_number_of_the_real_command() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    core.handle(CommandPayload(command(core, "close", seq=901, signer=IMPOSTOR)), at(1), READINGS)
    real = core.handle(CommandPayload(command(core, "ack", cid="e" * 32, seq=901)), at(2), READINGS)
    assert shown(real) == [FeedbackState.ACKNOWLEDGED]


def test_cancel_on_the_token_is_reported_and_positions_continue() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    actions = core.handle(CancelGesture(), at(2), READINGS)
    (event,) = stored(actions)
    assert event.message["type"] == "cancel_requested"
    assert shown(actions) == [FeedbackState.CANCELLED]
    assert core.active.stage is Stage.CANCELLED
    assert stored(core.handle(Tick(), at(5), READINGS))  # the operator still sees where


def test_the_pillar_cannot_be_cancelled() -> None:
    core = make_core("pillar")
    core.handle(Trigger("button_press"), at(0), READINGS)
    assert stored(core.handle(CancelGesture(), at(1), READINGS)) == []
    assert core.active.stage is Stage.SENDING


def test_an_active_alert_survives_a_restart() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    core.handle(CommandPayload(command(core, "ack")), at(1), READINGS)
    saved = json.loads(json.dumps(core.state()))

    reborn = AlertCore(DeviceIdentity("tok-001", "token", 5.0),
                       command_keys=[public_key_from_b64(CENTRE.public_key_b64)])
    actions = reborn.restore(saved, at(100))
    assert reborn.active.alert_id == core.active.alert_id
    assert shown(actions) == [FeedbackState.ACKNOWLEDGED]
    redelivered = command(core, "ack", issued_at="2026-11-23T10:01:40.000Z")  # same id
    again = reborn.handle(CommandPayload(redelivered), at(101), READINGS)
    assert [e.message["type"] for e in stored(again)] == ["command_applied"]
    assert reborn.state()["seen_commands"] == saved["seen_commands"]  # applied once


def call_command(kind: str, call_id: str | None = None, cid: str = "f" * 32) -> bytes:
    body = {"v": 1, "command_id": cid, "seq": next(_command_seq), "type": kind,
            "issued_at": "2026-11-23T10:00:03.000Z", "operator": "dispatch"}
    if call_id:
        body["call_id"] = call_id
    return json.dumps(CENTRE.sign(body)).encode()


def test_dispatch_starts_and_ends_a_call_for_the_recorder() -> None:
    core = make_core()
    started = core.handle(CommandPayload(call_command("call_start", "call-17")), at(3), READINGS)
    assert CallChange("call-17") in started
    (applied,) = stored(started)
    assert applied.message["type"] == "command_applied" and "alert_id" not in applied.message
    ended = core.handle(CommandPayload(call_command("call_end", cid="e" * 32)), at(4), READINGS)
    assert CallChange(None) in ended


def test_a_call_commands_result_names_no_alert_even_while_an_sos_is_active() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    started = core.handle(CommandPayload(call_command("call_start", "call-18", cid="3" * 32)),
                          at(3), READINGS)
    (applied,) = stored(started)
    assert applied.message["type"] == "command_applied" and "alert_id" not in applied.message


def test_an_applied_command_carries_no_reason_code() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    (applied,) = stored(core.handle(CommandPayload(command(core, "ack")), at(1), READINGS))
    assert "reason_code" not in applied.message and "reason" not in applied.message


def test_an_sos_starts_recording_and_its_close_ends_it() -> None:
    core = make_core()
    raised = core.handle(Trigger("button_hold"), at(0), READINGS)
    alert_id = core.active.alert_id
    assert RecordSos(alert_id, True) in raised
    closed = core.handle(CommandPayload(command(core, "close")), at(2), READINGS)
    assert RecordSos(alert_id, False) in closed


# -- the current call: dispatch's commands and the wearer's gesture ----------------------------


def test_the_call_gesture_starts_a_call_with_a_device_made_id() -> None:
    core = make_core()
    actions = core.handle(CallGesture(), at(10), READINGS)
    (event,) = stored(actions)
    validate(MessageKind.EVENT, {**event.message, "seq": 1})
    assert event.message["type"] == "call_started" and "alert_id" not in event.message
    assert event.message["call_id"] == core.call_id == "tok-001-20261123T100010Z-000000"
    assert CallChange("tok-001-20261123T100010Z-000000") in actions
    (store,) = [a for a in actions if isinstance(a, AppendToOutbox)]
    assert store.state["call_id"] == core.call_id
    assert shown(actions) == [FeedbackState.CALL_STARTED]


def test_the_call_gesture_again_ends_the_call() -> None:
    core = make_core()
    core.handle(CallGesture(), at(10), READINGS)
    actions = core.handle(CallGesture(), at(20), READINGS)
    (event,) = stored(actions)
    validate(MessageKind.EVENT, {**event.message, "seq": 2})
    assert event.message["type"] == "call_ended"
    assert event.message["call_id"] == "tok-001-20261123T100010Z-000000"
    assert CallChange(None) in actions and core.call_id is None
    assert shown(actions) == [FeedbackState.CALL_ENDED]


def test_the_call_acknowledgement_returns_to_idle_after_its_display_time() -> None:
    core = make_core()
    core.handle(CallGesture(), at(10), READINGS)
    assert core.next_deadline() == at(10 + CALL_DISPLAY_S).mono
    assert shown(core.handle(Tick(), at(10 + CALL_DISPLAY_S), READINGS)) == [FeedbackState.IDLE]
    assert core.call_id is not None  # only the acknowledgement ends, not the call


def test_the_call_gesture_is_ignored_while_an_sos_is_active() -> None:
    core = make_core()
    core.handle(Trigger("button_hold"), at(0), READINGS)
    actions = core.handle(CallGesture(), at(5), READINGS)
    assert stored(actions) == [] and shown(actions) == []
    assert not any(isinstance(a, CallChange) for a in actions) and core.call_id is None


def test_the_pillar_ignores_the_call_gesture() -> None:
    core = make_core("pillar")
    actions = core.handle(CallGesture(), at(5), READINGS)
    assert stored(actions) == [] and core.call_id is None


def test_a_call_survives_a_restart_and_recording_resumes() -> None:
    core = make_core()
    core.handle(CallGesture(), at(10), READINGS)
    saved = json.loads(json.dumps(core.state()))

    reborn = AlertCore(DeviceIdentity("tok-001", "token", 5.0),
                       command_keys=[public_key_from_b64(CENTRE.public_key_b64)])
    actions = reborn.restore(saved, at(100))
    assert CallChange("tok-001-20261123T100010Z-000000") in actions
    assert reborn.call_id == "tok-001-20261123T100010Z-000000" and reborn.active is None
    (event,) = stored(reborn.handle(CallGesture(), at(110), READINGS))
    assert (event.message["type"], event.message["call_id"]) == \
        ("call_ended", "tok-001-20261123T100010Z-000000")


def test_dispatch_call_end_ends_a_call_the_gesture_started() -> None:
    core = make_core()
    core.handle(CallGesture(), at(1), READINGS)
    ended = core.handle(CommandPayload(call_command("call_end", cid="1" * 32)), at(3), READINGS)
    assert CallChange(None) in ended and core.call_id is None
    (store,) = [a for a in ended if isinstance(a, AppendToOutbox)]
    assert store.state["call_id"] is None
    (event,) = stored(core.handle(CallGesture(), at(20), READINGS))
    assert event.message["type"] == "call_started"  # the next gesture starts a new call


def test_the_gesture_ends_a_call_dispatch_started() -> None:
    core = make_core()
    core.handle(CommandPayload(call_command("call_start", "call-17", cid="2" * 32)), at(3),
                READINGS)
    actions = core.handle(CallGesture(), at(10), READINGS)
    (event,) = stored(actions)
    assert (event.message["type"], event.message["call_id"]) == ("call_ended", "call-17")
    assert CallChange(None) in actions
