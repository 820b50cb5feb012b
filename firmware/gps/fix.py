"""One GNSS position fix, as combined from the NMEA sentences of one epoch."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Fix:
    """A trusted position for one receiver epoch (one UTC time of day).

    ``time`` is None until a date is known (from RMC or ZDA). ``received_at`` is the value of
    the injected monotonic clock when the epoch first had a trusted position: later sentences
    of the same epoch may add fields but do not make the position younger.
    """

    time: datetime | None
    lat: float
    lon: float
    alt_m: float | None
    speed_mps: float | None
    course_deg: float | None
    quality: int | None
    mode: int
    satellites: int | None
    hdop: float | None
    received_at: float

    def age(self, now: float) -> float:
        """Seconds since the fix was received, on the same clock as ``received_at``."""
        return now - self.received_at
