"""Virtual GPS hardware: NMEA sentences along a route, written to a pty like a receiver's UART."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import math
import os
import random
import threading
import time
import tty
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

EARTH_RADIUS_M = 6_371_000.0
METRES_PER_DEG_LAT = 111_320.0
MPS_TO_KNOTS = 3600.0 / 1852.0
GEOID_SEPARATION_M = 47.0


def nmea_sentence(body: str) -> str:
    """``$body*HH\\r\\n`` with the NMEA checksum (XOR of the bytes between ``$`` and ``*``)."""
    checksum = 0
    for ch in body.encode("ascii"):
        checksum ^= ch
    return f"${body}*{checksum:02X}\r\n"


def _haversine_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(
        (lon2 - lon1) / 2
    ) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(h))


def _bearing_deg(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    y = math.sin(lon2 - lon1) * math.cos(lat2)
    x = math.cos(lat1) * math.sin(lat2) - math.sin(lat1) * math.cos(lat2) * math.cos(lon2 - lon1)
    return math.degrees(math.atan2(y, x)) % 360.0


def _ddmm(value: float, deg_digits: int, pos: str, neg: str) -> tuple[str, str]:
    hemi = pos if value >= 0 else neg
    value = abs(value)
    deg = int(value)
    minutes = (value - deg) * 60.0
    if round(minutes, 5) >= 60.0:
        deg, minutes = deg + 1, 0.0
    return f"{deg:0{deg_digits}d}{minutes:08.5f}", hemi


class RouteReceiver:
    """Pure generator of one receiver epoch (RMC, GGA, GSA) at ``t`` seconds after start.

    The position moves along ``route`` at ``speed_mps`` and STOPS at the last waypoint (an
    ambulance arrives and stays): from then on speed is 0 and the course is the last leg's.
    Noise, satellites and HDOP are drawn from a generator seeded with (seed, t), so the same
    ``t`` always gives the same sentences. Inside a ``dropouts`` window (start_s, end_s) the
    receiver has no fix: GGA quality 0 with empty position, RMC status V, GSA mode 1.
    """

    def __init__(
        self,
        route: Sequence[tuple[float, float]],
        *,
        speed_mps: float = 12.0,
        start_utc: datetime,
        seed: int,
        noise_m: float = 3.0,
        dropouts: Sequence[tuple[float, float]] = (),
        alt_m: float = 50.0,
    ) -> None:
        if not route:
            raise ValueError("route needs at least one waypoint")
        if start_utc.tzinfo is None:
            raise ValueError("start_utc must be timezone-aware (UTC)")
        self.route = [(float(lat), float(lon)) for lat, lon in route]
        self.speed_mps = speed_mps
        self.start_utc = start_utc
        self.seed = seed
        self.noise_m = noise_m
        self.dropouts = list(dropouts)
        self.alt_m = alt_m
        self._legs = [_haversine_m(a, b) for a, b in itertools.pairwise(self.route)]
        self.length_m = sum(self._legs)

    def true_position(self, t: float) -> tuple[float, float, float, float]:
        """(lat, lon, speed_mps, course_deg) without noise at ``t``."""
        travelled = max(t, 0.0) * self.speed_mps
        course = _bearing_deg(self.route[0], self.route[1]) if len(self.route) > 1 else 0.0
        for (a, b), leg in zip(itertools.pairwise(self.route), self._legs, strict=True):
            course = _bearing_deg(a, b) if leg > 0 else course
            if travelled <= leg and leg > 0:
                f = travelled / leg
                return (a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, self.speed_mps,
                        course)
            travelled -= leg
        lat, lon = self.route[-1]
        return lat, lon, 0.0, course

    def in_dropout(self, t: float) -> bool:
        return any(start <= t < end for start, end in self.dropouts)

    def sentences_at(self, t: float) -> list[str]:
        """RMC, GGA and GSA for the epoch ``t`` seconds after ``start_utc`` (CRLF-terminated)."""
        rng = random.Random(f"{self.seed}:{round(t * 1000)}")
        when = self.start_utc + timedelta(seconds=t)
        hhmmss = when.strftime("%H%M%S") + f".{when.microsecond // 10000:02d}"
        ddmmyy = when.strftime("%d%m%y")
        sats = max(4, min(12, round(8 + 2.5 * math.sin(t / 47.0 + self.seed) + rng.gauss(0, 0.7))))
        hdop = round(max(0.5, 9.0 / sats + rng.gauss(0, 0.08)), 1)
        if self.in_dropout(t):
            return [
                nmea_sentence(f"GPRMC,{hhmmss},V,,,,,,,{ddmmyy},,,N"),
                nmea_sentence(f"GPGGA,{hhmmss},,,,,0,00,99.99,,,,,,"),
                nmea_sentence("GPGSA,A,1,,,,,,,,,,,,,99.99,99.99,99.99"),
            ]
        lat, lon, speed, course = self.true_position(t)
        north, east = rng.gauss(0, self.noise_m), rng.gauss(0, self.noise_m)
        lat += north / METRES_PER_DEG_LAT
        lon += east / (METRES_PER_DEG_LAT * max(math.cos(math.radians(lat)), 1e-6))
        alt = self.alt_m + rng.gauss(0, self.noise_m * 1.5)
        moving_mps = max(0.0, speed + rng.gauss(0, 0.1)) if speed > 0 else abs(rng.gauss(0, 0.03))
        knots = moving_mps * MPS_TO_KNOTS
        la, ns = _ddmm(lat, 2, "N", "S")
        lo, ew = _ddmm(lon, 3, "E", "W")
        prns = ",".join(f"{p:02d}" for p in sorted(rng.sample(range(1, 33), sats)))
        prns += "," * (12 - sats)
        pdop, vdop = round(hdop * 1.6, 2), round(hdop * 1.3, 2)
        return [
            nmea_sentence(
                f"GPRMC,{hhmmss},A,{la},{ns},{lo},{ew},{knots:.3f},{course:.2f},{ddmmyy},,,A"
            ),
            nmea_sentence(
                f"GPGGA,{hhmmss},{la},{ns},{lo},{ew},1,{sats:02d},{hdop:.1f},{alt:.1f},M,"
                f"{GEOID_SEPARATION_M:.1f},M,,"
            ),
            nmea_sentence(f"GPGSA,A,3,{prns},{pdop:.2f},{hdop:.2f},{vdop:.2f}"),
        ]


class PtyGps:
    """A receiver on a pseudo-terminal: ``.port`` is the tty path a GpsReader opens.

    One epoch per GPS second, paced on ``clock`` and scaled by ``speed`` (speed=4: an epoch
    every 0.25 s of wall time, still 1 s apart in GPS time). ``drift_ppm`` stretches the wall
    interval as a receiver oscillator that runs slow (positive) or fast (negative) would. Writes
    never block: if nobody drains the port, an epoch is lost, as on a real UART.
    """

    def __init__(
        self,
        receiver: RouteReceiver,
        *,
        speed: float = 1.0,
        drift_ppm: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.receiver = receiver
        self.interval_s = (1.0 / speed) * (1.0 + drift_ppm * 1e-6)
        self._clock = clock
        self._on_epoch = on_epoch
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo or CR/LF mangling before the reader configures it
        flags = fcntl.fcntl(self._master, fcntl.F_GETFL)
        fcntl.fcntl(self._master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.port = os.ttyname(self._slave)
        self.epochs_written = 0
        self.epochs_dropped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("PtyGps already started")
        self._thread = threading.Thread(target=self._run, name="pty-gps", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop writing and close the pty: the port disappears, as when a receiver is unplugged."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if not self._closed:
            self._closed = True
            for fd in (self._master, self._slave):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def write_raw(self, data: bytes) -> int:
        """Write bytes to the port now (tests, fault injection); returns bytes accepted."""
        try:
            return os.write(self._master, data)
        except BlockingIOError:
            return 0

    def _run(self) -> None:
        start = self._clock()
        n = 0
        while not self._stop.is_set():
            deadline = start + n * self.interval_s
            delay = deadline - self._clock()
            if delay > 0 and self._stop.wait(delay):
                break
            data = "".join(self.receiver.sentences_at(float(n))).encode("ascii")
            try:
                written = os.write(self._master, data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EBADF):
                    break
                raise
            if written < len(data):
                self.epochs_dropped += 1
            else:
                self.epochs_written += 1
            if self._on_epoch is not None:
                self._on_epoch(n)
            n += 1
