"""The camera watch's decisions (firmware/camera/health.py), with exact times."""

from __future__ import annotations

import pytest

from firmware.camera.health import (
    CameraHealth,
    CameraLimits,
    CameraState,
    FaultCleared,
    FaultRaised,
)

LIMITS = CameraLimits(first_retry_s=2.0, max_retry_s=60.0, frame_timeout_s=5.0)


def running(now: float = 0.0) -> CameraHealth:
    health = CameraHealth(now, LIMITS)
    assert health.start_due(now)
    health.starting(now)
    health.started(now)
    return health


def test_the_first_start_is_due_at_once_and_none_while_one_is_under_way() -> None:
    health = CameraHealth(100.0, LIMITS)
    assert health.start_due(100.0) and health.next_deadline() == 100.0
    health.starting(100.0)
    assert not health.start_due(200.0)
    assert health.next_deadline() == 110.0  # then a start still under way is a fault


def test_a_start_that_does_not_return_is_a_fault_reported_once() -> None:
    """A wedged driver holds the control thread in start(); the centre must hear of it."""
    health = CameraHealth(0.0, LIMITS)
    health.starting(0.0)
    assert health.start_hung(9.9) is None
    assert health.start_hung(10.0) == FaultRaised(
        "the camera's start did not return within 10 s")
    assert health.start_hung(20.0) is None and health.next_deadline() is None
    health.started(30.0)
    assert health.frame(30.5) == FaultCleared("the camera's start did not return within 10 s")


def test_failed_starts_are_retried_doubling_from_2_s_up_to_60_s() -> None:
    health = CameraHealth(0.0, LIMITS)
    now, waits = 0.0, []
    for _ in range(8):
        health.starting(0.0)
        health.failed(now, "busy")
        waits.append(health.next_start - now)
        assert not health.start_due(health.next_start - 0.001)
        now = health.next_start
        assert health.start_due(now)
    assert waits == [2, 4, 8, 16, 32, 60, 60, 60]


def test_a_fault_is_raised_once_however_many_retries_fail() -> None:
    health = CameraHealth(0.0, LIMITS)
    health.starting(0.0)
    assert health.failed(0.0, "busy") == FaultRaised("busy")
    health.starting(0.0)
    assert health.failed(2.0, "timed out") is None
    assert health.fault == "timed out"  # the status says the latest reason


def test_the_first_frame_after_a_restart_clears_the_fault() -> None:
    health = CameraHealth(0.0, LIMITS)
    health.starting(0.0)
    health.failed(0.0, "busy")
    health.starting(0.0)
    health.started(2.0)
    assert health.fault == "busy"  # start() returning proves nothing yet
    assert health.frame(2.1) == FaultCleared("busy")
    assert health.fault is None and health.frame(2.2) is None


def test_a_running_camera_without_frames_for_5_s_is_stalled() -> None:
    health = running(0.0)
    health.frame(1.0)
    assert health.next_deadline() == 6.0
    assert not health.stalled(5.999)
    assert health.stalled(6.0)


def test_a_camera_that_starts_but_never_delivers_is_stalled_too() -> None:
    health = running(10.0)
    assert health.stalled(15.0)


def test_a_late_frame_of_a_camera_given_up_on_changes_nothing() -> None:
    health = running(0.0)
    health.failed(6.0, "no frame")
    assert health.frame(6.5) is None and health.state is CameraState.WAITING
    health.starting(0.0)
    health.started(8.0)
    assert health.frame(7.9) is None and health.fault == "no frame"  # before this start


def test_the_backoff_starts_anew_after_the_camera_ran_well_for_max_retry_s() -> None:
    health = CameraHealth(0.0, LIMITS)
    for now in (0.0, 2.0, 6.0):  # three failures: the next wait would be 8 s
        health.starting(0.0)
        health.failed(now, "busy")
    health.starting(0.0)
    health.started(14.0)
    health.frame(14.5)
    health.failed(20.0, "no frame")  # ran only 6 s: the backoff goes on
    assert health.next_start - 20.0 == 16.0
    health.starting(0.0)
    health.started(36.0)
    health.frame(36.5)
    health.failed(96.0, "no frame")  # ran 60 s: a new fault, backoff from the start
    assert health.next_start - 96.0 == 2.0


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        CameraLimits(first_retry_s=10.0, max_retry_s=5.0)
    with pytest.raises(ValueError):
        CameraLimits(frame_timeout_s=0)
