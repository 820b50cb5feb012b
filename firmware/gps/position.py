"""The device position that goes into alert messages: live GPS, surveyed, last known, or none."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC
from typing import Any

from firmware.gps.fix import Fix

#: Horizontal accuracy estimate: HDOP times a typical user range error of 5 m.
HDOP_TO_METRES = 5.0

_FIELDS = (
    "source", "lat", "lon", "alt_m", "accuracy_m", "fix_time", "age_s",
    "speed_mps", "course_deg", "satellites", "hdop",
)


class PositionProvider:
    """Chooses the position to report.

    Order: a live fix (younger than ``live_max_age_s``), else the surveyed position if
    configured (a pillar's surveyed kiosk location beats a stale GPS fix), else the last known
    fix, else nothing.
    """

    def __init__(
        self,
        reader_latest: Callable[[], Fix | None],
        *,
        clock: Callable[[], float] = time.monotonic,
        live_max_age_s: float = 3.0,
        surveyed: dict[str, float] | None = None,
    ) -> None:
        self._latest = reader_latest
        self._clock = clock
        self._live_max_age_s = live_max_age_s
        if surveyed is not None:
            missing = {"lat", "lon"} - surveyed.keys()
            if missing:
                raise ValueError(f"surveyed position lacks {sorted(missing)}")
        self._surveyed = surveyed

    def current(self) -> dict[str, Any]:
        """JSON-ready position dict; always has exactly the same keys."""
        fix = self._latest()
        age = fix.age(self._clock()) if fix is not None else None
        if fix is not None and age is not None and age < self._live_max_age_s:
            return _from_fix("live", fix, age)
        if self._surveyed is not None:
            s = self._surveyed
            return _shape(
                source="surveyed",
                lat=float(s["lat"]),
                lon=float(s["lon"]),
                alt_m=_opt_float(s.get("alt_m")),
                accuracy_m=_opt_float(s.get("accuracy_m")),
            )
        if fix is not None and age is not None:
            return _from_fix("last_known", fix, age)
        return _shape(source="none")


def _from_fix(source: str, fix: Fix, age: float) -> dict[str, Any]:
    # A receiver can send a well-formed sentence with impossible values (course 361, speed -0.1,
    # HDOP -1). The decoder rejects such sentences (firmware/gps/nmea.py, "implausible"); this
    # stays as the last guard, because the alert that carries a Fix must always be valid.
    hdop = _within(fix.hdop, 0.0, None)
    return _shape(
        source=source,
        lat=fix.lat,
        lon=fix.lon,
        alt_m=fix.alt_m,
        accuracy_m=round(hdop * HDOP_TO_METRES, 1) if hdop is not None else None,
        fix_time=_iso_ms(fix),
        age_s=round(max(age, 0.0), 1),
        speed_mps=_within(fix.speed_mps, 0.0, None),
        course_deg=_within(fix.course_deg, 0.0, 360.0),
        satellites=_within(fix.satellites, 0, None),
        hdop=hdop,
    )


def _within(value: Any, low: float, high: float | None) -> Any:
    if value is None or value < low or (high is not None and value > high):
        return None
    return value


def _shape(**values: Any) -> dict[str, Any]:
    return {name: values.get(name) for name in _FIELDS}


def _iso_ms(fix: Fix) -> str | None:
    if fix.time is None:
        return None
    t = fix.time.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
