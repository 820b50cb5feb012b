"""Incidents: one id for the alerts that are one event on the street.

A paramedic's SOS, the dispatch call the crew was on, and the SOS a bystander raises at a pillar
round the corner a minute later are one incident, and the operators should see them together.
A new alert joins an incident when

- its token is on a dispatch call (the last `call_started` its device reported, not ended since)
  that an alert of that incident was raised on; or
- it was raised within `radius_m` and `window_s` of an alert of that incident (positions with
  coordinates only: an alert with no position joins by its call, or starts its own).

Otherwise it starts a new incident, whose id is its own alert id. When it matches alerts of
several incidents, the oldest incident wins (the one the operators have been working longest).

Pure: the caller passes the candidates (recent alerts, with their incident ids) and the new
alert's call id; distances are great-circle (haversine) metres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

EARTH_RADIUS_M = 6_371_008.8  # mean radius (IUGG)
RADIUS_M = 500.0
WINDOW_S = 600.0


@dataclass(frozen=True)
class Placed:
    """An alert as incidents see it."""

    alert_id: str
    stored_at: float
    lat: float | None
    lon: float | None
    call_id: str | None
    incident_id: str | None = None  # None for the new alert


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def incident_for(new: Placed, recent: Sequence[Placed], *, radius_m: float = RADIUS_M,
                 window_s: float = WINDOW_S) -> str:
    """The incident `new` belongs to: an existing one's id, or its own alert id."""
    joined = [other for other in recent
              if other.alert_id != new.alert_id and other.incident_id is not None
              and (_same_call(new, other) or _near(new, other, radius_m, window_s))]
    if not joined:
        return new.alert_id
    return min(joined, key=lambda p: (p.stored_at, p.alert_id)).incident_id or new.alert_id


def _same_call(new: Placed, other: Placed) -> bool:
    return new.call_id is not None and other.call_id == new.call_id


def _near(new: Placed, other: Placed, radius_m: float, window_s: float) -> bool:
    if abs(new.stored_at - other.stored_at) > window_s:
        return False
    if new.lat is None or new.lon is None or other.lat is None or other.lon is None:
        return False
    return distance_m(new.lat, new.lon, other.lat, other.lon) <= radius_m
