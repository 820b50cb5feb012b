"""The simulator's verdict on operator decisions: ok only if each was applied on the device."""

from __future__ import annotations

from typing import Any

from simulator.runner import decision_outcomes, decision_problems

ALERT = "5e8a1f0c2b7d4e93a6c1d8f0b2e4a7c3"


def command(kind: str, status: str, reason_code: str | None = None) -> dict[str, Any]:
    """A row of Store.commands, reduced to what the verdict reads."""
    return {"type": kind, "status": status, "reason_code": reason_code}


def test_decisions_applied_on_the_device_are_no_problem() -> None:
    outcomes = decision_outcomes([command("ack", "applied"), command("close", "applied")])
    assert outcomes == {"ack": "applied", "close": "applied"}
    assert decision_problems(ALERT, outcomes) == []


def test_a_rejected_close_is_a_problem_that_names_the_alert_and_the_reason() -> None:
    outcomes = decision_outcomes([command("ack", "applied"),
                                  command("close", "rejected", "expired")])
    assert decision_problems(ALERT, outcomes) == [
        "alert 5e8a1f0c: the operator's close was not applied on the device (rejected: expired)"]


def test_an_ack_the_device_never_answered_is_a_problem() -> None:
    outcomes = decision_outcomes([command("ack", "sent")])
    assert decision_problems(ALERT, outcomes) == [
        "alert 5e8a1f0c: the operator's ack was not applied on the device (no answer)"]


def test_a_decision_applied_through_its_re_send_is_applied() -> None:
    outcomes = decision_outcomes([command("ack", "rejected", "expired"), command("ack", "applied"),
                                  command("ack", "sent")])
    assert outcomes == {"ack": "applied"}
