"""PositionProvider: which position an alert carries (live, surveyed, last known, none)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from firmware.gps.fix import Fix
from firmware.gps.position import PositionProvider

KEYS = {
    "source", "lat", "lon", "alt_m", "accuracy_m", "fix_time", "age_s",
    "speed_mps", "course_deg", "satellites", "hdop",
}
SURVEYED = {"lat": 52.3702, "lon": 4.8952, "alt_m": 2.0, "accuracy_m": 1.5}


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_fix(received_at: float, **kw) -> Fix:
    values = dict(
        time=datetime(2026, 11, 23, 14, 45, 1, tzinfo=UTC),
        lat=52.37, lon=4.89, alt_m=12.5, speed_mps=1.25, course_deg=90.0,
        quality=1, mode=3, satellites=9, hdop=0.9, received_at=received_at,
    )
    values.update(kw)
    return Fix(**values)


def provider(fix: Fix | None, clock: FakeClock, **kw) -> PositionProvider:
    return PositionProvider(lambda: fix, clock=clock, **kw)


def test_a_fresh_fix_is_live_with_every_field():
    clock = FakeClock(100.0)
    pos = provider(make_fix(received_at=99.04), clock).current()
    assert pos == {
        "source": "live", "lat": 52.37, "lon": 4.89, "alt_m": 12.5,
        "accuracy_m": 4.5, "fix_time": "2026-11-23T14:45:01.000Z", "age_s": 1.0,
        "speed_mps": 1.25, "course_deg": 90.0, "satellites": 9, "hdop": 0.9,
    }


def test_fix_time_keeps_milliseconds():
    fix = make_fix(100.0, time=datetime(2026, 11, 23, 14, 45, 1, 799000, tzinfo=UTC))
    assert provider(fix, FakeClock(100.0)).current()["fix_time"] == "2026-11-23T14:45:01.799Z"


def test_a_fix_without_a_date_has_no_fix_time():
    pos = provider(make_fix(100.0, time=None), FakeClock(100.0)).current()
    assert (pos["source"], pos["fix_time"]) == ("live", None)


def test_a_fix_without_hdop_has_no_accuracy():
    assert provider(make_fix(100.0, hdop=None), FakeClock(100.0)).current()["accuracy_m"] is None


def test_a_stale_fix_without_survey_is_last_known_with_its_age():
    clock = FakeClock(100.0)
    p = provider(make_fix(received_at=90.0), clock)
    pos = p.current()
    assert (pos["source"], pos["age_s"], pos["lat"]) == ("last_known", 10.0, 52.37)


def test_the_fix_turns_stale_at_live_max_age():
    clock = FakeClock(100.0)
    p = provider(make_fix(received_at=100.0), clock, live_max_age_s=3.0)
    clock.t = 102.9
    assert p.current()["source"] == "live"
    clock.t = 103.0
    assert p.current()["source"] == "last_known"


def test_a_surveyed_pillar_beats_a_stale_fix():
    p = provider(make_fix(received_at=0.0), FakeClock(100.0), surveyed=SURVEYED)
    assert p.current() == {
        "source": "surveyed", "lat": 52.3702, "lon": 4.8952, "alt_m": 2.0,
        "accuracy_m": 1.5, "fix_time": None, "age_s": None,
        "speed_mps": None, "course_deg": None, "satellites": None, "hdop": None,
    }


def test_a_live_fix_beats_the_survey():
    p = provider(make_fix(received_at=99.0), FakeClock(100.0), surveyed=SURVEYED)
    assert p.current()["source"] == "live"


def test_survey_without_any_fix_is_surveyed():
    assert provider(None, FakeClock(), surveyed=SURVEYED).current()["source"] == "surveyed"


def test_no_fix_and_no_survey_is_none_with_all_fields_none():
    pos = provider(None, FakeClock()).current()
    assert pos == dict.fromkeys(KEYS) | {"source": "none"}


def test_the_shape_is_always_the_same():
    clock = FakeClock(100.0)
    cases = [
        provider(make_fix(99.0), clock),
        provider(make_fix(0.0), clock),
        provider(make_fix(0.0), clock, surveyed=SURVEYED),
        provider(None, clock),
    ]
    assert [set(p.current()) for p in cases] == [KEYS] * 4


def test_the_provider_follows_the_reader():
    clock = FakeClock(100.0)
    latest: list[Fix | None] = [None]
    p = PositionProvider(lambda: latest[0], clock=clock)
    assert p.current()["source"] == "none"
    latest[0] = make_fix(received_at=100.0)
    assert p.current()["source"] == "live"


def test_a_survey_needs_lat_and_lon():
    with pytest.raises(ValueError):
        PositionProvider(lambda: None, surveyed={"lat": 1.0})


def test_impossible_values_from_a_well_formed_sentence_are_dropped_not_passed_on() -> None:
    from dataclasses import replace

    from protocol import MessageKind, validate
    from tests.helpers import alert_message

    fix = replace(_fix_for_sanity(), course_deg=361.0, speed_mps=-0.1, hdop=-1.0)
    position = PositionProvider(lambda: fix, clock=lambda: fix.received_at).current()
    assert (position["course_deg"], position["speed_mps"], position["hdop"]) == (None, None, None)
    validate(MessageKind.ALERT, alert_message(position=position))


def _fix_for_sanity():
    from datetime import UTC, datetime

    from firmware.gps.fix import Fix

    return Fix(time=datetime(2026, 11, 23, 10, 0, tzinfo=UTC), lat=52.37, lon=4.89, alt_m=2.0,
               speed_mps=1.0, course_deg=10.0, quality=1, mode=3, satellites=8, hdop=0.9,
               received_at=100.0)
