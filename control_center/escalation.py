"""Escalation: an alert nobody has taken climbs its desks' chain, and the supervisors hear of it.

An SOS is routed to one or more desks (control_center.routing). Each desk says how long an
alert may sit there untaken (`escalate_after_s`) and which desk it goes to then (`next`, or None
at the end of the chain). While an alert is neither claimed nor closed:

- step 1 is due at `stored_at` plus the shortest timeout of its routed desks (the first of them
  with that timeout is where it "sits"): once the most urgent desk's time is up, the caller has
  waited longer than the centre promised, whatever the other desks allow themselves;
- step k+1 is due at step k's due time plus the timeout of the desk step k sent it to;
- each step goes to the current desk's `next` and always to the supervisors; when a desk has no
  `next`, one last step goes to the supervisors only (`to_desk` None) and nothing follows.

A claim or a close stops it: no new steps, the ones already taken stay (they are history the
console shows). Every step records whether the alert's device was offline when it was taken:
an operator looking at an escalated alert whose device went silent knows not to wait for it.

The schedule is computed by a pure function (`due_steps`) from the alert, the desks' policies,
the steps already recorded and `now`; time never comes from anywhere else, so it is tested with
a deterministic clock. The steps taken are stored in the centre's SQLite file, in a table of
their own (`alert_escalations`), keyed by (alert, step): several centre instances run the same
loop on the same file, each step is inserted once, and only the instance that inserted it
announces it (`EscalationWatch`'s `on_step`: the console's louder alarm, the supervisors' view).

This module does not import the route table or the store: the desks come in as plain values
(desk id -> (escalate_after_s, next), see `desk_policies`) and the alerts as `AlertState`s (see
`state_of`), so either side can change without the other.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from control_center.shared_sqlite import SharedTables

log = logging.getLogger("sos.center.escalation")

INTERVAL_S = 1.0  # how late a step may be announced, at most (plus one pass's queries)
_IN_CHUNK = 500  # alert ids per `IN (...)`: well under SQLite's limit on bound parameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_escalations (
    alert_id       TEXT NOT NULL,
    step           INTEGER NOT NULL,
    to_desk        TEXT,
    due_at         REAL NOT NULL,
    recorded_at    REAL NOT NULL,
    device_offline INTEGER NOT NULL,
    PRIMARY KEY (alert_id, step)
);
"""


class AlertState(NamedTuple):
    """What escalation needs to know of one alert: when it was stored, the desks it was routed to
    (the routing decision), and whether someone took it, it was closed, its device is offline."""

    alert_id: str
    stored_at: float
    desks: tuple[str, ...]
    claimed: bool
    closed: bool
    device_offline: bool


class DeskPolicy(NamedTuple):
    """How long an alert may sit untaken at a desk, and where it goes then (None: nowhere but
    the supervisors). A plain `(escalate_after_s, next)` tuple works as well."""

    escalate_after_s: float
    next: str | None


class Step(NamedTuple):
    """One escalation of an alert: number `step` (1, 2, ...), sent to `to_desk` and to the
    supervisors (`to_desk` None: to the supervisors only, the end of the chain), due at `at`
    (its scheduled time, also when it is taken late), with the device offline or not then."""

    alert_id: str
    step: int
    to_desk: str | None
    at: float
    device_offline: bool


class EscalationError(ValueError):
    """The desks' policies cannot escalate this alert (a desk without a policy, a timeout that is
    not positive): a configuration the route table's loader should have refused."""


class _DeskLike(Protocol):
    @property
    def escalate_after_s(self) -> float: ...

    @property
    def next(self) -> str | None: ...


class _AlertLike(Protocol):
    @property
    def alert_id(self) -> str: ...

    @property
    def stored_at(self) -> float: ...

    @property
    def status(self) -> str: ...

    @property
    def claimed_by(self) -> str | None: ...

    @property
    def device_offline(self) -> bool: ...


class _NamedDeskLike(_DeskLike, Protocol):
    @property
    def id(self) -> str: ...


def desk_policies(desks: Mapping[str, _DeskLike] | Iterable[_NamedDeskLike]
                  ) -> dict[str, DeskPolicy]:
    """The policies of a route table's desks: a mapping desk id -> desk, or the desks themselves
    with their `id` (as `RouteTable.desks` lists them); a desk is anything with
    `escalate_after_s` and `next`, so the route table's own types need not be imported here."""
    pairs = (desks.items() if isinstance(desks, Mapping)
             else ((d.id, d) for d in desks))
    return {desk_id: DeskPolicy(float(d.escalate_after_s), d.next) for desk_id, d in pairs}


def state_of(alert: _AlertLike, desks: Sequence[str]) -> AlertState:
    """An AlertState from a store record (control_center.store.AlertRecord or alike) and the
    desks its routing decision named."""
    return AlertState(alert.alert_id, alert.stored_at, tuple(desks), alert.claimed_by is not None,
                      alert.status == "closed", bool(alert.device_offline))


def _policy(desks: Mapping[str, DeskPolicy], desk: str) -> tuple[float, str | None]:
    if desk not in desks:
        raise EscalationError(f"desk '{desk}' has no escalation policy")
    after, nxt = desks[desk]
    if not after > 0:  # also NaN; math.inf is fine: that desk never escalates
        raise EscalationError(f"desk '{desk}': escalate_after_s must be positive, not {after}")
    return after, nxt


def _start_desk(alert: AlertState, desks: Mapping[str, DeskPolicy]) -> str:
    """Where the alert sits first: the routed desk with the shortest timeout (the first of them
    on a tie)."""
    if not alert.desks:
        raise EscalationError(f"alert {alert.alert_id} was routed to no desk")
    return min(alert.desks, key=lambda d: _policy(desks, d)[0])


def due_steps(alert: AlertState, desks: Mapping[str, DeskPolicy], done: Sequence[Step],
              now: float) -> list[Step]:
    """The steps of `alert` due by `now` and not in `done` (the steps recorded so far), in order,
    each with its own due time as `at`: after an outage (`now` jumped) every overdue step is
    returned at once, so the record shows when each should have happened.

    The chain continues from the last recorded step (its desk and due time), not from the
    current policies: a desk's policy changed while an alert climbs does not rewrite its past.
    A desk already on this alert's path is not visited twice (a cycle in the chain ends it:
    the supervisors get the last step). EscalationError for a desk without a usable policy."""
    if alert.claimed or alert.closed:
        return []
    mine = sorted((s for s in done if s.alert_id == alert.alert_id), key=lambda s: s.step)
    if mine:
        last = mine[-1]
        if last.to_desk is None:  # the supervisors' step: the chain has ended
            return []
        desk, since, number = last.to_desk, last.at, last.step
        visited = {s.to_desk for s in mine}
        with contextlib.suppress(EscalationError):  # a routed desk gone: the path is known
            visited.add(_start_desk(alert, desks))
    else:
        desk, since, number = _start_desk(alert, desks), alert.stored_at, 0
        visited = {desk}
    steps: list[Step] = []
    while True:
        after, nxt = _policy(desks, desk)
        due = since + after
        if math.isnan(due) or due > now:
            return steps
        number += 1
        to_desk = nxt if nxt not in visited else None
        steps.append(Step(alert.alert_id, number, to_desk, due, alert.device_offline))
        if to_desk is None:
            return steps
        visited.add(to_desk)
        desk, since = to_desk, due


class EscalationLog(SharedTables):
    """The escalation steps taken, in the centre's SQLite file (table `alert_escalations`), shared
    by every centre instance on that file. `clock` gives `recorded_at` when `record` is not
    told the time."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(path, _SCHEMA)
        self._clock = clock


    def record(self, steps: Iterable[Step], now: float | None = None) -> list[Step]:
        """Insert the steps not yet recorded; returns those this call inserted (in the order
        given, each alert's by step number): the ones this instance is to announce.

        Another instance running the same loop computes the same steps; whichever inserts a step
        first announces it. If the step already stored differs from ours (that instance went by
        other policies), our later steps of that alert built on ours and are dropped: the next
        pass continues from what is stored."""
        now = self._clock() if now is None else now
        by_alert: dict[str, list[Step]] = {}
        for step in steps:
            by_alert.setdefault(step.alert_id, []).append(step)
        inserted: list[Step] = []
        with self._lock, self._transaction():
            for alert_steps in by_alert.values():
                for step in sorted(alert_steps, key=lambda s: s.step):
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO alert_escalations(alert_id, step, to_desk, "
                        "due_at, recorded_at, device_offline) VALUES (?,?,?,?,?,?)",
                        (step.alert_id, step.step, step.to_desk, step.at, now,
                         int(step.device_offline)))
                    if cur.rowcount == 1:
                        inserted.append(step)
                        continue
                    stored = self._db.execute(
                        "SELECT to_desk, due_at FROM alert_escalations WHERE alert_id = ? "
                        "AND step = ?", (step.alert_id, step.step)).fetchone()
                    if stored != (step.to_desk, step.at):
                        break
        return inserted

    def steps(self, alert_id: str) -> list[dict[str, object]]:
        """The alert's steps in order, as the console shows them: `to_desk` None is the
        supervisors-only step at the end of the chain (every step also went to them)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT alert_id, step, to_desk, due_at, recorded_at, device_offline "
                "FROM alert_escalations WHERE alert_id = ? ORDER BY step", (alert_id,)).fetchall()
        return [{"alert_id": a, "step": n, "to_desk": d, "due_at": due, "recorded_at": rec,
                 "device_offline": bool(off)} for a, n, d, due, rec, off in rows]

    def recorded(self, alert_ids: Iterable[str]) -> dict[str, list[Step]]:
        """The recorded steps of these alerts (each in step order; an alert with none is left
        out): what `due_steps` takes as `done`, for many alerts in a few queries."""
        ids = list(dict.fromkeys(alert_ids))
        found: dict[str, list[Step]] = {}
        with self._lock:
            for chunk in _chunks(ids, _IN_CHUNK):
                rows = self._db.execute(
                    "SELECT alert_id, step, to_desk, due_at, device_offline FROM "
                    f"alert_escalations WHERE alert_id IN ({','.join('?' * len(chunk))}) "
                    "ORDER BY alert_id, step", chunk).fetchall()
                for a, n, d, due, off in rows:
                    found.setdefault(a, []).append(Step(a, n, d, due, bool(off)))
        return found


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class EscalationWatch:
    """Every `interval_s`: the open alerts from `alerts_source`, their due steps, recorded in
    `log`, and `on_step` called for each step this instance recorded (a failing call is logged
    and the others still run). `policies` is read on every pass, so a mapping the caller updates
    in place takes effect at the next one.

    A claim that lands during a pass (after `alerts_source` read the alert) may still be
    followed by that pass's step; the console shows the alert as taken all the same."""

    def __init__(self, log: EscalationLog, policies: Mapping[str, DeskPolicy],
                 alerts_source: Callable[[], Sequence[AlertState]],
                 on_step: Callable[[Step], None], clock: Callable[[], float] = time.time,
                 interval_s: float = INTERVAL_S) -> None:
        self._log = log
        self._policies = policies
        self._alerts_source = alerts_source
        self._on_step = on_step
        self._clock = clock
        self._interval_s = interval_s
        self._refused: dict[str, str] = {}  # alert -> the error last logged for it (log once)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="centre-escalation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check()
            except Exception:  # the store being replaced, say: the next pass tries again
                log.exception("escalation: a pass failed")

    def check(self, now: float | None = None) -> list[Step]:
        """One pass at `now` (the clock's time if not given): the steps this instance recorded
        and announced (announced also when `on_step` failed for them)."""
        now = self._clock() if now is None else now
        waiting = [a for a in self._alerts_source() if not (a.claimed or a.closed)]
        done = self._log.recorded(a.alert_id for a in waiting)
        due: list[Step] = []
        for alert in waiting:
            try:
                due += due_steps(alert, self._policies, done.get(alert.alert_id, []), now)
            except EscalationError as exc:  # one misconfigured desk must not stop the others
                if self._refused.get(alert.alert_id) != str(exc):
                    self._refused[alert.alert_id] = str(exc)
                    log.error("escalation: alert %s cannot escalate: %s", alert.alert_id, exc)
        ids = {a.alert_id for a in waiting}
        self._refused = {a: e for a, e in self._refused.items() if a in ids}
        new = self._log.record(due, now) if due else []
        for step in new:
            try:
                self._on_step(step)
            except Exception:  # one failing announcement must not silence the others
                log.exception("escalation: could not announce step %d of alert %s",
                              step.step, step.alert_id)
        return new
