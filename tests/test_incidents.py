"""Which alerts are one incident (control_center/incidents.py): a table of cases."""

from __future__ import annotations

import pytest

from control_center.incidents import Placed, distance_m, incident_for

AT = 1_800_000_000.0
HERE = (43.2389, 76.8897)  # Almaty
NEAR = (43.2410, 76.8897)  # about 230 m north
FAR = (43.2600, 76.8897)  # about 2.3 km north


def placed(alert_id: str, where=HERE, at: float = AT, call: str | None = None,
           incident: str | None = None) -> Placed:
    lat, lon = where if where is not None else (None, None)
    return Placed(alert_id, at, lat, lon, call, incident)


def test_distances_are_great_circle_metres() -> None:
    assert distance_m(43.0, 76.0, 44.0, 76.0) == pytest.approx(111_195, rel=1e-3)
    assert distance_m(*HERE, *NEAR) == pytest.approx(233.5, abs=1)


@pytest.mark.parametrize(("new", "recent", "expected"), [
    # nothing before it: an incident of its own, named by its own alert id
    (placed("new"), [], "new"),
    # near in space and time: joins
    (placed("new", NEAR, AT + 60), [placed("a", HERE, AT, incident="inc-a")], "inc-a"),
    # near in space, too late
    (placed("new", NEAR, AT + 601), [placed("a", HERE, AT, incident="inc-a")], "new"),
    # in time, too far
    (placed("new", FAR, AT + 60), [placed("a", HERE, AT, incident="inc-a")], "new"),
    # the same dispatch call: joins whatever the distance and time
    (placed("new", FAR, AT + 5000, call="c-7"),
     [placed("a", HERE, AT, call="c-7", incident="inc-a")], "inc-a"),
    # no position: only its call can join it
    (placed("new", None, AT + 10), [placed("a", HERE, AT, incident="inc-a")], "new"),
    (placed("new", None, AT + 10, call="c-7"),
     [placed("a", HERE, AT, call="c-7", incident="inc-a")], "inc-a"),
    # nearby joins even on another dispatch call: one event on the street
    (placed("new", NEAR, AT + 10, call="c-8"),
     [placed("a", HERE, AT, call="c-7", incident="inc-a")], "inc-a"),
    # several incidents match: the oldest one wins
    (placed("new", HERE, AT + 100),
     [placed("b", NEAR, AT + 50, incident="inc-b"), placed("a", HERE, AT, incident="inc-a")],
     "inc-a"),
    # an alert not yet given an incident (being stored right now elsewhere) is no candidate
    (placed("new", NEAR, AT + 10), [placed("a", HERE, AT, incident=None)], "new"),
])
def test_incident_for(new: Placed, recent: list[Placed], expected: str) -> None:
    assert incident_for(new, recent) == expected


def test_the_radius_and_window_are_the_callers() -> None:
    new, old = placed("new", NEAR, AT + 60), placed("a", HERE, AT, incident="inc-a")
    assert incident_for(new, [old], radius_m=100) == "new"
    assert incident_for(new, [old], window_s=30) == "new"
