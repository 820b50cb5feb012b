"""Limits on console log-ins (control_center/web/login_guard.py), on an exact clock."""

from __future__ import annotations

from control_center.web.login_guard import LOCKOUT_S, MAX_FAILURES, WINDOW_S, LoginGuard

T0 = 1_000.0


def fail(guard: LoginGuard, name: str, times: int, at: float = T0) -> None:
    for i in range(times):
        guard.failed(name, at + i)


def test_a_name_is_refused_after_the_allowed_failures() -> None:
    guard = LoginGuard(2)
    fail(guard, "alice", MAX_FAILURES)
    assert "try again" in guard.refusal("alice", T0 + MAX_FAILURES)


def test_one_failure_fewer_is_not_refused() -> None:
    guard = LoginGuard(2)
    fail(guard, "alice", MAX_FAILURES - 1)
    assert guard.refusal("alice", T0 + MAX_FAILURES) is None


def test_the_lockout_ends_after_its_time() -> None:
    guard = LoginGuard(2)
    fail(guard, "alice", MAX_FAILURES)
    last = T0 + MAX_FAILURES - 1
    assert guard.refusal("alice", last + LOCKOUT_S) is None


def test_failures_older_than_the_window_do_not_count() -> None:
    guard = LoginGuard(2)
    fail(guard, "alice", MAX_FAILURES - 1)
    guard.failed("alice", T0 + WINDOW_S + 10)
    assert guard.refusal("alice", T0 + WINDOW_S + 11) is None


def test_a_success_forgets_the_failures() -> None:
    guard = LoginGuard(2)
    fail(guard, "alice", MAX_FAILURES - 1)
    guard.succeeded("alice")
    guard.failed("alice", T0 + 100)
    assert guard.refusal("alice", T0 + 101) is None


def test_other_names_are_not_affected() -> None:
    guard = LoginGuard(2)
    fail(guard, "alice", MAX_FAILURES)
    assert guard.refusal("bob", T0 + MAX_FAILURES) is None


def test_no_more_than_the_allowed_hashes_run_at_once() -> None:
    guard = LoginGuard(2)
    with guard.slot() as first, guard.slot() as second, guard.slot() as third:
        assert (first, second, third) == (True, True, False)
    with guard.slot() as again:
        assert again
