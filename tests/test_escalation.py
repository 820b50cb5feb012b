"""Escalation of untaken alerts (control_center/escalation.py), on a deterministic clock: the
schedule as a table, the steps stored once however many centre instances run the loop, and the
watch's passes at chosen times."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from control_center.escalation import (
    AlertState,
    DeskPolicy,
    EscalationError,
    EscalationLog,
    EscalationWatch,
    Step,
    desk_policies,
    due_steps,
    state_of,
)
from control_center.store import Store
from tests.helpers import alert_message

T0 = 1_800_000_000.0  # when the alert was stored

# police-a (30 s) -> police-b (60 s) -> regional (120 s) -> end; ambulance (45 s) -> end.
DESKS: dict[str, DeskPolicy] = {
    "police-a": DeskPolicy(30.0, "police-b"),
    "police-b": DeskPolicy(60.0, "regional"),
    "regional": DeskPolicy(120.0, None),
    "ambulance": DeskPolicy(45.0, None),
    "ambulance-2": DeskPolicy(30.0, None),  # as quick as police-a: ties go to the first routed
    "loop-1": DeskPolicy(10.0, "loop-2"),  # a cycle the route table should have refused
    "loop-2": DeskPolicy(10.0, "loop-1"),
    "never": DeskPolicy(math.inf, "regional"),
}


def alert(desks: tuple[str, ...] = ("police-a",), *, claimed: bool = False, closed: bool = False,
          offline: bool = False, alert_id: str = "a1") -> AlertState:
    return AlertState(alert_id, T0, desks, claimed, closed, offline)


def step(n: int, to_desk: str | None, after: float, offline: bool = False,
         alert_id: str = "a1") -> Step:
    return Step(alert_id, n, to_desk, T0 + after, offline)


S1 = step(1, "police-b", 30)
S2 = step(2, "regional", 90)
S3 = step(3, None, 210)

# (case, alert, steps already recorded, seconds after stored_at, the steps due)
TABLE = [
    ("nothing is due at storage", alert(), [], 0.0, []),
    ("nothing is due a hair before N", alert(), [], 29.999, []),
    ("step 1 is due exactly at N", alert(), [], 30.0, [S1]),
    ("step 1 stays due until recorded", alert(), [], 89.999, [S1]),
    ("step 2 after the desk step 1 sent it to", alert(), [S1], 89.999, []),
    ("step 2 exactly at 30 + 60", alert(), [S1], 90.0, [S2]),
    ("a jump returns every overdue step, each at its own time", alert(), [], 90.0, [S1, S2]),
    ("the chain's end: one supervisors' step", alert(), [S1, S2], 210.0, [S3]),
    ("a restart long after: the whole chain at once", alert(), [], 86_400.0, [S1, S2, S3]),
    ("after the supervisors' step, nothing more", alert(), [S1, S2, S3], 86_400.0, []),
    ("claimed before N: nothing", alert(claimed=True), [], 86_400.0, []),
    ("claimed after step 1: no more, step 1 stays", alert(claimed=True), [S1], 86_400.0, []),
    ("closed: nothing", alert(closed=True), [], 86_400.0, []),
    ("closed after step 2: nothing", alert(closed=True), [S1, S2], 86_400.0, []),
    ("device offline: marked on the step", alert(offline=True), [], 30.0,
     [step(1, "police-b", 30, offline=True)]),
    ("device offline later: marked on the later step only", alert(offline=True), [S1], 90.0,
     [step(2, "regional", 90, offline=True)]),
    ("two routed desks: the shortest timeout sets the pace", alert(("ambulance", "police-a")),
     [], 30.0, [S1]),
    ("a routed desk at the end of its chain: supervisors only", alert(("ambulance",)), [], 45.0,
     [step(1, None, 45)]),
    ("a tie goes to the first routed desk", alert(("ambulance-2", "police-a")), [], 30.0,
     [step(1, None, 30)]),
    ("the chain follows the recorded step, not today's policy", alert(),
     [step(1, "ambulance", 30)], 75.0, [step(2, None, 75)]),
    ("another alert's steps are not this one's", alert(), [step(1, "x", 30, alert_id="a2")],
     30.0, [S1]),
    ("recorded steps in any order", alert(), [S2, S1], 210.0, [S3]),
    ("a cycle ends at the supervisors", alert(("loop-1",)), [], 1000.0,
     [step(1, "loop-2", 10), step(2, None, 20)]),
    ("an infinite timeout never escalates", alert(("never",)), [], 1e12, []),
]


@pytest.mark.parametrize(("case", "state", "done", "after", "expected"), TABLE,
                         ids=[row[0] for row in TABLE])
def test_the_schedule(case: str, state: AlertState, done: list[Step], after: float,
                      expected: list[Step]) -> None:
    assert due_steps(state, DESKS, done, T0 + after) == expected


def test_plain_tuples_are_policies() -> None:
    plain = {"a": (5.0, "b"), "b": (7.0, None)}
    assert due_steps(alert(("a",)), plain, [], T0 + 12) == [  # type: ignore[arg-type]
        step(1, "b", 5), step(2, None, 12)]


@pytest.mark.parametrize(("desks", "state", "message"), [
    (DESKS, alert(("nowhere",)), "desk 'nowhere' has no escalation policy"),
    ({"a": DeskPolicy(10.0, "gone")}, alert(("a",)), "desk 'gone' has no escalation policy"),
    ({"a": DeskPolicy(0.0, None)}, alert(("a",)), "escalate_after_s must be positive"),
    ({"a": DeskPolicy(-5.0, None)}, alert(("a",)), "escalate_after_s must be positive"),
    ({"a": DeskPolicy(math.nan, None)}, alert(("a",)), "escalate_after_s must be positive"),
    (DESKS, alert(()), "routed to no desk"),
])
def test_a_policy_that_cannot_escalate_is_refused(desks: dict[str, DeskPolicy],
                                                  state: AlertState, message: str) -> None:
    with pytest.raises(EscalationError, match=message):
        due_steps(state, desks, [], T0 + 1000)


def test_a_routed_desk_gone_from_the_policies_does_not_stop_a_started_chain() -> None:
    """The chain continues from the last recorded desk; the routed one is not needed any more."""
    policies = {k: v for k, v in DESKS.items() if k != "police-a"}
    assert due_steps(alert(), policies, [S1], T0 + 90) == [S2]


def test_desk_policies_from_a_route_tables_desks() -> None:
    @dataclass
    class Desk:
        escalate_after_s: float
        next: str | None

    assert desk_policies({"a": Desk(30, "b"), "b": Desk(60.5, None)}) == {
        "a": DeskPolicy(30.0, "b"), "b": DeskPolicy(60.5, None)}


def test_desk_policies_from_desks_that_carry_their_id() -> None:
    @dataclass
    class Desk:
        id: str
        escalate_after_s: float
        next: str | None = None

    assert desk_policies((Desk("a", 30, "b"), Desk("b", 60))) == {
        "a": DeskPolicy(30.0, "b"), "b": DeskPolicy(60.0, None)}


def test_state_of_a_stored_alert(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite")
    message = alert_message()
    store.add_alert(message, stored_at=T0)
    record = store.alert(message["alert_id"])
    assert record is not None
    assert state_of(record, ["police-a"]) == AlertState(message["alert_id"], T0, ("police-a",),
                                                        False, False, False)
    store.claim(message["alert_id"], "alice", at=T0 + 5)
    taken = store.alert(message["alert_id"])
    assert taken is not None and state_of(taken, ("police-a",)).claimed
    store.close()


# -- the log -----------------------------------------------------------------------------------

@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "centre.sqlite"


def test_steps_are_stored_and_shown(db: Path) -> None:
    with EscalationLog(db) as log:
        assert log.record([S1, step(2, "regional", 90, offline=True)], now=T0 + 95) == [
            S1, step(2, "regional", 90, offline=True)]
        assert log.steps("a1") == [
            {"alert_id": "a1", "step": 1, "to_desk": "police-b", "due_at": T0 + 30,
             "recorded_at": T0 + 95, "device_offline": False},
            {"alert_id": "a1", "step": 2, "to_desk": "regional", "due_at": T0 + 90,
             "recorded_at": T0 + 95, "device_offline": True}]
        assert log.steps("unknown") == []
    with EscalationLog(db) as reopened:  # in the file, not in the instance
        assert [s["step"] for s in reopened.steps("a1")] == [1, 2]


def test_recorded_at_comes_from_the_clock(db: Path) -> None:
    with EscalationLog(db, clock=lambda: T0 + 31) as log:
        log.record([S1])
        assert log.steps("a1")[0]["recorded_at"] == T0 + 31


def test_two_instances_on_one_file_record_each_step_once(db: Path) -> None:
    with EscalationLog(db) as first, EscalationLog(db) as second:
        assert first.record([S1], now=T0 + 30) == [S1]
        assert second.record([S1, S2], now=T0 + 91) == [S2]  # only what it inserted
        assert first.record([S1, S2, S3], now=T0 + 211) == [S3]
        assert second.record([S1, S2, S3], now=T0 + 212) == []
        shown = second.steps("a1")
        assert [(s["step"], s["to_desk"], s["recorded_at"]) for s in shown] == [
            (1, "police-b", T0 + 30), (2, "regional", T0 + 91), (3, None, T0 + 211)]


def test_a_step_built_on_another_instances_different_step_is_dropped(db: Path) -> None:
    """The other instance sent step 1 elsewhere (other policies): our step 2 followed ours."""
    with EscalationLog(db) as first, EscalationLog(db) as second:
        first.record([step(1, "ambulance", 30)], now=T0 + 30)
        assert second.record([S1, S2], now=T0 + 90) == []
        assert [s["to_desk"] for s in second.steps("a1")] == ["ambulance"]


def test_the_log_shares_the_file_with_the_store(db: Path) -> None:
    store = Store(db)
    message = alert_message()
    store.add_alert(message, stored_at=T0)
    with EscalationLog(db) as log:
        log.record([step(1, "police-b", 30, alert_id=message["alert_id"])], now=T0 + 30)
    assert store.alert(message["alert_id"]) is not None
    store.close()
    with EscalationLog(db) as log:
        assert len(log.steps(message["alert_id"])) == 1


def test_recorded_reads_many_alerts_at_once(db: Path) -> None:
    ids = [f"a{i:04d}" for i in range(1200)]  # more than one `IN (...)` chunk
    with EscalationLog(db) as log:
        log.record([step(1, "police-b", 30, alert_id=a) for a in ids], now=T0 + 30)
        log.record([step(2, "regional", 90, alert_id="a0007")], now=T0 + 90)
        found = log.recorded([*ids, "a0007", "never-escalated"])
    assert set(found) == set(ids)
    assert found["a0007"] == [step(1, "police-b", 30, alert_id="a0007"),
                              step(2, "regional", 90, alert_id="a0007")]


def test_instances_racing_on_one_file_announce_each_step_once(db: Path) -> None:
    steps = [step(n, d, t, alert_id=f"a{i:03d}") for i in range(100)
             for n, d, t in ((1, "police-b", 30), (2, "regional", 90))]
    logs = [EscalationLog(db) for _ in range(4)]
    start = threading.Barrier(len(logs))
    won: list[list[Step]] = [[] for _ in logs]

    def run(i: int) -> None:
        start.wait()
        for k in range(0, len(steps), 10):  # many small transactions, interleaved
            won[i] += logs[i].record(steps[k:k + 10], now=T0 + 90)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(logs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    announced = [s for w in won for s in w]
    assert sorted(announced) == sorted(steps)
    for log in logs:
        log.close()


# -- the watch ---------------------------------------------------------------------------------

class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Centre:
    """A watch with a fake clock over a list of alerts the test changes."""

    opened: ClassVar[list[EscalationLog]] = []

    def __init__(self, db: Path, alerts: list[AlertState], clock: Clock,
                 desks: dict[str, DeskPolicy] = DESKS) -> None:
        self.alerts = alerts
        self.heard: list[Step] = []
        self.log = EscalationLog(db)
        Centre.opened.append(self.log)
        self.watch = EscalationWatch(self.log, desks, lambda: list(self.alerts), self.heard.append,
                                     clock)


@pytest.fixture(autouse=True)
def _close_centres() -> Iterator[None]:
    yield
    while Centre.opened:
        Centre.opened.pop().close()


def test_the_watch_escalates_on_its_clock(db: Path) -> None:
    clock = Clock(T0)
    centre = Centre(db, [alert(), alert(("ambulance",), alert_id="a2")], clock)
    assert centre.watch.check() == []
    clock.now = T0 + 29.999
    assert centre.watch.check() == []
    clock.now = T0 + 30
    assert centre.watch.check() == [S1]
    assert centre.watch.check() == []  # recorded: not again
    clock.now = T0 + 45
    assert centre.watch.check() == [step(1, None, 45, alert_id="a2")]
    clock.now = T0 + 90
    assert centre.watch.check() == [S2]
    assert centre.heard == [S1, step(1, None, 45, alert_id="a2"), S2]
    assert [s["recorded_at"] for s in centre.log.steps("a1")] == [T0 + 30, T0 + 90]


def test_a_centre_back_after_an_outage_catches_up_in_order(db: Path) -> None:
    centre = Centre(db, [alert()], Clock(T0))
    assert centre.watch.check(T0 + 3600) == [S1, S2, S3]
    assert [(s["due_at"], s["recorded_at"]) for s in centre.log.steps("a1")] == [
        (T0 + 30, T0 + 3600), (T0 + 90, T0 + 3600), (T0 + 210, T0 + 3600)]
    assert centre.watch.check(T0 + 7200) == []


def test_a_claim_stops_the_watch(db: Path) -> None:
    centre = Centre(db, [alert()], Clock(T0))
    assert centre.watch.check(T0 + 30) == [S1]
    centre.alerts[0] = alert(claimed=True)
    assert centre.watch.check(T0 + 3600) == []
    assert [s["step"] for s in centre.log.steps("a1")] == [1]  # step 1 stays


def test_a_closed_alert_stops_the_watch(db: Path) -> None:
    centre = Centre(db, [alert(closed=True)], Clock(T0))
    assert centre.watch.check(T0 + 3600) == []
    assert centre.log.steps("a1") == []


def test_the_device_going_offline_is_marked_from_then_on(db: Path) -> None:
    centre = Centre(db, [alert()], Clock(T0))
    centre.watch.check(T0 + 30)
    centre.alerts[0] = alert(offline=True)
    centre.watch.check(T0 + 90)
    assert [s["device_offline"] for s in centre.log.steps("a1")] == [False, True]


def test_two_centre_instances_announce_each_step_once(db: Path) -> None:
    alerts = [alert()]
    first, second = Centre(db, alerts, Clock(T0)), Centre(db, alerts, Clock(T0))
    assert first.watch.check(T0 + 30) == [S1]
    assert second.watch.check(T0 + 30) == []
    assert second.watch.check(T0 + 90) == [S2]
    assert first.watch.check(T0 + 95) == []
    assert (first.heard, second.heard) == ([S1], [S2])


def test_a_failing_announcement_does_not_stop_the_others(
        db: Path, caplog: pytest.LogCaptureFixture) -> None:
    heard: list[Step] = []

    def on_step(s: Step) -> None:
        if s.alert_id == "a1":
            raise RuntimeError("console gone")
        heard.append(s)

    alerts = [alert(), alert(alert_id="a2")]
    log = EscalationLog(db)
    Centre.opened.append(log)
    watch = EscalationWatch(log, DESKS, lambda: alerts, on_step, Clock(T0))
    with caplog.at_level(logging.ERROR, logger="sos.center.escalation"):
        assert watch.check(T0 + 30) == [S1, step(1, "police-b", 30, alert_id="a2")]
    assert heard == [step(1, "police-b", 30, alert_id="a2")]
    assert "could not announce step 1 of alert a1" in caplog.text


def test_an_alert_that_cannot_escalate_does_not_stop_the_others(
        db: Path, caplog: pytest.LogCaptureFixture) -> None:
    centre = Centre(db, [alert(("nowhere",), alert_id="bad"), alert()], Clock(T0))
    with caplog.at_level(logging.ERROR, logger="sos.center.escalation"):
        assert centre.watch.check(T0 + 30) == [S1]
        assert centre.watch.check(T0 + 31) == []
    refusals = [r for r in caplog.records if "alert bad cannot escalate" in r.getMessage()]
    assert len(refusals) == 1  # once, not every second


def test_the_watch_runs_on_its_own(db: Path) -> None:
    """The thread's passes, on a clock already past the whole chain."""
    heard: list[Step] = []
    all_three = threading.Event()

    def on_step(s: Step) -> None:
        heard.append(s)
        if s.step == 3:
            all_three.set()

    log = EscalationLog(db)
    watch = EscalationWatch(log, DESKS, lambda: [alert()], on_step, Clock(T0 + 3600),
                            interval_s=0.01)
    watch.start()
    try:
        assert all_three.wait(10)
    finally:
        watch.stop()
        log.close()
    assert heard == [S1, S2, S3]


def test_a_failing_alerts_source_does_not_end_the_thread(db: Path) -> None:
    calls = 0
    heard = threading.Event()

    def source() -> list[AlertState]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("store being replaced")
        return [alert()]

    log = EscalationLog(db)
    watch = EscalationWatch(log, DESKS, source, lambda s: heard.set(), Clock(T0 + 30),
                            interval_s=0.01)
    watch.start()
    try:
        assert heard.wait(10)
    finally:
        watch.stop()
        log.close()
    assert calls >= 2
