"""When the pillar plays its spoken message (firmware/voice/message.py), in exact fake time."""

from __future__ import annotations

import pytest

from firmware.voice.message import MessageSchedule

ANSWER_S, EVERY_S = 20.0, 30.0
T0 = 1000.0  # the centre's receipt arrives


@pytest.fixture
def schedule() -> MessageSchedule:
    return MessageSchedule(ANSWER_S, EVERY_S)


def plays(schedule: MessageSchedule, start: float, end: float, step: float = 0.5) -> list[float]:
    """The times at which a loop that looks every `step` seconds plays the message."""
    played = []
    t = start
    while t <= end:
        if schedule.due(t):
            played.append(t)
        t += step
    return played


def test_nothing_plays_before_the_centre_has_the_alert(schedule: MessageSchedule) -> None:
    """"Your call has been received" is only true once the receipt is in."""
    assert schedule.next_at() is None
    assert plays(schedule, T0 - 100, T0 + 100) == []


def test_with_no_operator_it_plays_after_answer_within_s_and_then_every_every_s(
        schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    assert schedule.next_at() == T0 + ANSWER_S
    assert plays(schedule, T0, T0 + 100) == [T0 + 20, T0 + 50, T0 + 80]


def test_it_is_due_once_per_play_time(schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    assert schedule.due(T0 + ANSWER_S)
    assert not schedule.due(T0 + ANSWER_S)
    assert schedule.next_at() == T0 + ANSWER_S + EVERY_S


def test_a_late_loop_plays_once_and_counts_the_next_time_from_then(
        schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    assert schedule.due(T0 + 95)  # three play times missed
    assert not schedule.due(T0 + 95)
    assert schedule.next_at() == T0 + 95 + EVERY_S


def test_a_loop_slightly_late_keeps_the_rhythm(schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    assert schedule.due(T0 + ANSWER_S + 0.2)
    assert schedule.next_at() == T0 + ANSWER_S + EVERY_S


def test_an_operator_connecting_in_time_means_no_message(schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    schedule.operator_connected()
    assert schedule.next_at() is None
    assert plays(schedule, T0, T0 + 200) == []


def test_an_operator_connecting_stops_the_repeats(schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    assert plays(schedule, T0, T0 + 40) == [T0 + 20]
    schedule.operator_connected()
    assert plays(schedule, T0 + 40, T0 + 300) == []


def test_the_receipt_seen_again_does_not_restart_the_timer(schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    schedule.delivered(T0 + 15)  # a re-send's receipt, or the state restored after a restart
    assert schedule.next_at() == T0 + ANSWER_S


def test_a_receipt_that_arrives_after_the_operator_connected_plays_nothing(
        schedule: MessageSchedule) -> None:
    schedule.operator_connected()
    schedule.delivered(T0)
    assert plays(schedule, T0, T0 + 200) == []


def test_a_dropped_call_tells_the_citizen_again_if_nobody_is_back_in_time(
        schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    schedule.operator_connected()
    schedule.operator_lost(T0 + 60)
    assert plays(schedule, T0 + 60, T0 + 150) == [T0 + 80, T0 + 110, T0 + 140]


def test_a_short_drop_that_recovers_in_time_plays_nothing(schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    schedule.operator_connected()
    schedule.operator_lost(T0 + 60)
    assert plays(schedule, T0 + 60, T0 + 70) == []
    schedule.operator_connected()
    assert plays(schedule, T0 + 70, T0 + 300) == []


def test_a_call_that_fails_before_connecting_leaves_the_running_schedule_alone(
        schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    schedule.operator_lost(T0 + 15)  # the offer's connection failed; nobody ever spoke
    assert schedule.next_at() == T0 + ANSWER_S


def test_losing_the_operator_again_restarts_nothing(schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    schedule.operator_connected()
    schedule.operator_lost(T0 + 60)
    schedule.operator_lost(T0 + 70)  # interrupted, then failed
    assert schedule.next_at() == T0 + 80


def test_a_closed_alert_plays_nothing_more_even_if_the_call_ends_after_it(
        schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    schedule.operator_connected()
    schedule.closed()
    schedule.operator_lost(T0 + 60)  # the voice engine reports "ended" after the close
    assert plays(schedule, T0, T0 + 300) == []


def test_the_next_alert_starts_afresh(schedule: MessageSchedule) -> None:
    schedule.delivered(T0)
    schedule.operator_connected()
    schedule.closed()
    schedule.delivered(T0 + 500)
    assert plays(schedule, T0 + 500, T0 + 560) == [T0 + 520, T0 + 550]


@pytest.mark.parametrize(("answer", "every"), [(0, 30), (20, 0), (-1, 30)])
def test_a_schedule_needs_positive_times(answer: float, every: float) -> None:
    with pytest.raises(ValueError):
        MessageSchedule(answer, every)
