"""When the token records, and which segments are evidence."""

from __future__ import annotations

from firmware.camera.recording import RecordingPolicy
from firmware.camera.space import RecordMode


def test_nothing_is_recorded_outside_a_call_or_an_sos() -> None:
    assert not RecordingPolicy().should_record()


def test_a_call_records_from_start_to_end() -> None:
    policy = RecordingPolicy()
    policy.call_start("call-17")
    assert policy.should_record() and policy.call_id == "call-17"
    policy.call_end()
    assert not policy.should_record()


def test_an_sos_always_records_until_the_operator_closes_it() -> None:
    policy = RecordingPolicy()
    policy.sos_start("a1", at_s=100.0)
    assert policy.should_record()
    policy.sos_end("a1", at_s=160.0)
    assert not policy.should_record()


def test_segments_from_the_preroll_to_the_close_are_evidence() -> None:
    policy = RecordingPolicy(preroll_s=30.0)
    policy.sos_start("a1", at_s=100.0)
    policy.sos_end("a1", at_s=160.0)
    assert policy.flags(50.0, 60.0) == []
    assert policy.flags(65.0, 75.0) == ["evidence", "sos"]  # in the 30 s before the trigger
    assert policy.flags(155.0, 165.0) == ["evidence", "sos"]
    assert policy.flags(161.0, 171.0) == []


def test_with_little_space_only_an_sos_is_recorded() -> None:
    policy = RecordingPolicy()
    policy.call_start("call-17")
    policy.set_mode(RecordMode.EVIDENCE_ONLY)
    assert not policy.should_record()
    policy.sos_start("a1", at_s=10.0)
    assert policy.should_record()
    policy.set_mode(RecordMode.FULL)
    assert not policy.should_record()


def test_the_same_alert_twice_opens_one_window() -> None:
    policy = RecordingPolicy()
    policy.sos_start("a1", at_s=10.0)
    policy.sos_start("a1", at_s=20.0)
    assert len(policy.windows) == 1
