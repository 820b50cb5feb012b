"""NMEA 0183 byte stream -> position fixes. Pure logic: no I/O, no wall clock.

Framing. Bytes are buffered until CR or LF (any mix). A line may hold several sentences when a
receiver dropped a line end ("...*1E$GPRMC,..."), so each line is cut before every ``$`` or ``!``;
bytes before the first ``$`` are junk. A candidate without a line end is held back; one longer
than ``MAX_LINE`` bytes is dropped. Every candidate must carry a valid ``*HH`` checksum
(``pynmea2.parse(check=True)``, and a missing checksum is rejected too).

Epochs. Sentences carrying the same UTC time of day (RMC, GGA, GLL, GNS, ZDA) belong to one
epoch; GSA and VTG carry no time and join the epoch currently open. A sentence with a different
time of day opens the next epoch. Position is trusted only from GGA quality > 0, RMC/GLL status A,
GNS mode not N; GGA quality 7/8 and FAA mode M/S (manual input, simulator) are not measurements and
are rejected too. Within an epoch the last trusted position wins, as in gpsd.

Emission rule (latency matters for alerts): a Fix is emitted as soon as its epoch has a trusted
position, i.e. on the first position sentence of the epoch, without waiting for the epoch to end.
When a later sentence of the same epoch changes any field (GGA adding altitude, ZDA adding the
date, ...), an updated Fix with the same ``time`` is emitted; sentences that change nothing emit
nothing. ``received_at`` stays the clock value of the first emission of the epoch. Consumers keep
the last Fix they got; the last Fix emitted for a time is the complete one.

Dates. The date comes from RMC (valid ones only: a void RMC's date is often the receiver's
unset clock) or ZDA and is carried forward to later epochs, advancing one day when the time of
day wraps past midnight. GPS week rollover: receivers with a 10-bit week counter report dates
1024 weeks (19.6 years) early once their firmware's window has passed (e.g. 2019-04-07 reported
as 1999-08-22). A date before ``date_floor`` (default: this firmware's release, 2025-01-01) is
moved forward by 1024 weeks until it is not; this is right for any real date before
``date_floor + 1024 weeks`` (2044-08). Pass ``date_floor=None`` to keep dates as sent (replaying
old logs).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import pynmea2

from firmware.gps.fix import Fix

KNOTS_TO_MPS = 1852.0 / 3600.0
ROLLOVER = timedelta(weeks=1024)
DEFAULT_DATE_FLOOR = date(2025, 1, 1)
MAX_LINE = 512
HALF_DAY_US = 12 * 3600 * 1_000_000
#: GGA quality 7 (manual input) and 8 (simulator) are not measurements: never trusted.
NOT_MEASURED_QUALITY = frozenset({7, 8})
#: FAA mode letters (RMC, GLL, VTG, GNS) that mean "no real fix".
NOT_MEASURED_MODES = frozenset("NMS")

#: Reasons in ``NmeaDecoder.counters`` that mean the bytes were damaged or were not NMEA.
#: The others are valid sentences we do not use: unsupported, void_fix (no fix: a normal state)
#: and no_epoch (a sentence without time, e.g. GSA, before any timed sentence).
GARBAGE_REASONS = frozenset({"checksum", "no_checksum", "parse_error", "not_nmea", "overlong"})

_EOL = re.compile(rb"[\r\n]+")
_SENTENCE_START = re.compile(rb"(?=[$!])")
_PRINTABLE = re.compile(rb"^[\x20-\x7e]*$")
_CHECKSUM_TAIL = re.compile(r"\*[0-9A-Fa-f]{2}$")


class _Rejected(Exception):
    """A sentence that must not be used; ``reason`` goes into the counters."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Epoch:
    tod_us: int
    date: date | None = None
    lat: float | None = None
    lon: float | None = None
    alt_m: float | None = None
    speed_mps: float | None = None
    course_deg: float | None = None
    quality: int | None = None
    gsa_mode: int | None = None
    satellites: int | None = None
    hdop: float | None = None
    gsa_satellites: int = 0
    gsa_hdop: float | None = None
    first_at: float | None = None
    emitted: Fix | None = None


class NmeaDecoder:
    """Feed raw receiver bytes, get Fixes (see the module docstring for the rules)."""

    def __init__(self, *, date_floor: date | None = DEFAULT_DATE_FLOOR) -> None:
        self.date_floor = date_floor
        self.counters: Counter[str] = Counter()
        self.accepted = 0
        self._buf = b""
        self._epoch: _Epoch | None = None
        self._date: date | None = None
        self._last_tod: int | None = None

    # ---- framing -------------------------------------------------------------------------

    def reset_framing(self) -> None:
        """Forget a partial line (the port was reopened: its end will never come)."""
        self._buf = b""

    def feed(self, data: bytes, now: float) -> list[Fix]:
        """Add received bytes; return the Fixes (new or updated) they completed."""
        out: list[Fix] = []
        buf = self._buf + bytes(data)
        cut = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
        if cut >= 0:
            complete, buf = buf[: cut + 1], buf[cut + 1 :]
            for line in _EOL.split(complete):
                if line:
                    self._line(line, now, out)
        if len(buf) > MAX_LINE:
            self.counters["overlong"] += 1
            buf = b""
        self._buf = buf
        return out

    def _line(self, line: bytes, now: float, out: list[Fix]) -> None:
        for i, part in enumerate(_SENTENCE_START.split(line)):
            if not part:
                continue
            if i == 0 and part[:1] not in (b"$", b"!"):
                if part.strip():
                    self.counters["not_nmea"] += 1
                continue
            try:
                self._sentence(part.rstrip(), now, out)
            except _Rejected as rej:
                self.counters[rej.reason] += 1
            except Exception:  # never let a malformed field take the reader down
                self.counters["parse_error"] += 1

    def _sentence(self, raw: bytes, now: float, out: list[Fix]) -> None:
        if raw.startswith(b"!"):
            raise _Rejected("unsupported")  # AIS encapsulation (!AIVDM/!AIVDO)
        if len(raw) > MAX_LINE:
            raise _Rejected("overlong")
        if not _PRINTABLE.match(raw):
            raise _Rejected("not_nmea")
        text = raw.decode("ascii")
        if "*" not in text:
            raise _Rejected("no_checksum")
        if not _CHECKSUM_TAIL.search(text):
            raise _Rejected("checksum")
        try:
            msg = pynmea2.parse(text, check=True)
        except pynmea2.ChecksumError as exc:
            raise _Rejected("checksum") from exc
        except pynmea2.SentenceTypeError as exc:
            raise _Rejected("unsupported") from exc
        except ValueError as exc:
            raise _Rejected("parse_error") from exc
        handler = _HANDLERS.get(getattr(msg, "sentence_type", None)) if isinstance(
            msg, pynmea2.TalkerSentence
        ) else None
        if handler is None:
            raise _Rejected("unsupported")
        handler(self, msg, now, out)
        self.accepted += 1

    # ---- epochs --------------------------------------------------------------------------

    def _open(self, tod_us: int | None) -> _Epoch:
        """The epoch for a sentence with this time of day (None: the open epoch)."""
        ep = self._epoch
        if tod_us is None:
            if ep is None:
                raise _Rejected("no_epoch")
            return ep
        if ep is not None and ep.tod_us == tod_us:
            return ep
        wrapped = self._last_tod is not None and tod_us < self._last_tod - HALF_DAY_US
        if self._date is not None and wrapped:
            self._date += timedelta(days=1)  # the time of day wrapped past midnight
        self._last_tod = tod_us
        ep = _Epoch(tod_us=tod_us, date=self._date)
        self._epoch = ep
        return ep

    def _set_date(self, ep: _Epoch, d: date) -> None:
        if self.date_floor is not None:
            while d < self.date_floor:
                d += ROLLOVER
        ep.date = d
        if ep is self._epoch:
            self._date = d
            self._last_tod = ep.tod_us

    def _emit(self, ep: _Epoch, now: float, out: list[Fix]) -> None:
        if ep.lat is None or ep.lon is None:
            return
        if ep.first_at is None:
            ep.first_at = now
        when = None
        if ep.date is not None:
            when = datetime.combine(ep.date, time(tzinfo=UTC)) + timedelta(
                microseconds=ep.tod_us
            )
        mode = ep.gsa_mode if ep.gsa_mode in (2, 3) else (3 if ep.alt_m is not None else 2)
        sats = ep.satellites if ep.satellites is not None else (ep.gsa_satellites or None)
        fix = Fix(
            time=when,
            lat=ep.lat,
            lon=ep.lon,
            alt_m=ep.alt_m,
            speed_mps=ep.speed_mps,
            course_deg=ep.course_deg,
            quality=ep.quality,
            mode=mode,
            satellites=sats,
            hdop=ep.hdop if ep.hdop is not None else ep.gsa_hdop,
            received_at=ep.first_at,
        )
        if fix != ep.emitted:
            ep.emitted = fix
            out.append(fix)

    # ---- sentences -----------------------------------------------------------------------

    def _rmc(self, msg: pynmea2.RMC, now: float, out: list[Fix]) -> None:
        tod = _tod_us(msg.timestamp)
        valid = msg.status == "A" and _faa_ok(msg, "mode_indicator")
        if not valid:
            if tod is not None:
                self._open(tod)
            raise _Rejected("void_fix")
        lat, lon = _position(msg)
        speed = _float(msg.data[6]) if len(msg.data) > 6 else None
        course = _float(msg.data[7]) if len(msg.data) > 7 else None
        day = msg.datestamp
        ep = self._open(tod)
        if isinstance(day, date):
            self._set_date(ep, day)
        ep.lat, ep.lon = lat, lon
        if speed is not None:
            ep.speed_mps = speed * KNOTS_TO_MPS
        if course is not None:
            ep.course_deg = course
        self._emit(ep, now, out)

    def _gga(self, msg: pynmea2.GGA, now: float, out: list[Fix]) -> None:
        tod = _tod_us(msg.timestamp)
        quality = _int(msg.data[5]) if len(msg.data) > 5 else None
        if not quality or quality in NOT_MEASURED_QUALITY:
            if tod is not None:
                self._open(tod)
            raise _Rejected("void_fix")
        lat, lon = _position(msg)
        sats = _int(msg.num_sats)
        hdop = _float(msg.horizontal_dil)
        alt = _float(msg.data[8]) if len(msg.data) > 8 else None
        ep = self._open(tod)
        ep.lat, ep.lon, ep.quality = lat, lon, quality
        _merge_present(ep, satellites=sats, hdop=hdop, alt_m=alt)
        self._emit(ep, now, out)

    def _gll(self, msg: pynmea2.GLL, now: float, out: list[Fix]) -> None:
        tod = _tod_us(msg.timestamp)
        if msg.status != "A" or not _faa_ok(msg, "faa_mode"):
            if tod is not None:
                self._open(tod)
            raise _Rejected("void_fix")
        lat, lon = _position(msg)
        ep = self._open(tod)
        ep.lat, ep.lon = lat, lon
        self._emit(ep, now, out)

    def _gns(self, msg: pynmea2.GNS, now: float, out: list[Fix]) -> None:
        tod = _tod_us(msg.timestamp)
        modes = msg.mode_indicator or ""
        if not modes or set(modes) <= NOT_MEASURED_MODES:
            if tod is not None:
                self._open(tod)
            raise _Rejected("void_fix")
        lat, lon = _position(msg)
        sats = _int(msg.num_sats)
        hdop = _float(msg.hdop)
        alt = _float(msg.altitude)
        ep = self._open(tod)
        ep.lat, ep.lon = lat, lon
        _merge_present(ep, satellites=sats, hdop=hdop, alt_m=alt)
        self._emit(ep, now, out)

    def _gsa(self, msg: pynmea2.GSA, now: float, out: list[Fix]) -> None:
        mode = _int(msg.mode_fix_type)
        ids = [v for v in msg.data[2:14] if v.strip()]
        hdop = _float(msg.hdop)
        ep = self._open(None)
        if mode in (2, 3):
            ep.gsa_mode = mode
            ep.gsa_satellites += len(ids)
            if hdop is not None:
                ep.gsa_hdop = hdop
        self._emit(ep, now, out)

    def _vtg(self, msg: pynmea2.VTG, now: float, out: list[Fix]) -> None:
        if not _faa_ok(msg, "faa_mode"):
            raise _Rejected("void_fix")
        course = _float(msg.data[0]) if msg.data else None
        knots = _float(msg.data[4]) if len(msg.data) > 4 else None
        kmh = _float(msg.data[6]) if len(msg.data) > 6 else None
        ep = self._open(None)
        if knots is not None:
            ep.speed_mps = knots * KNOTS_TO_MPS
        elif kmh is not None:
            ep.speed_mps = kmh / 3.6
        if course is not None:
            ep.course_deg = course
        self._emit(ep, now, out)

    def _zda(self, msg: pynmea2.ZDA, now: float, out: list[Fix]) -> None:
        tod = _tod_us(msg.timestamp)
        if tod is None:
            raise _Rejected("parse_error")
        try:
            day = date(int(msg.data[3]), int(msg.data[2]), int(msg.data[1]))
        except (ValueError, IndexError) as exc:
            raise _Rejected("parse_error") from exc
        ep = self._open(tod)
        self._set_date(ep, day)
        self._emit(ep, now, out)


_HANDLERS = {
    "RMC": NmeaDecoder._rmc,
    "GGA": NmeaDecoder._gga,
    "GLL": NmeaDecoder._gll,
    "GNS": NmeaDecoder._gns,
    "GSA": NmeaDecoder._gsa,
    "VTG": NmeaDecoder._vtg,
    "ZDA": NmeaDecoder._zda,
}


def _tod_us(value: object) -> int | None:
    """Time of day in microseconds; pynmea2 gives None for an empty field, str if malformed."""
    if value is None:
        return None
    if not isinstance(value, time):
        raise _Rejected("parse_error")
    return ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond


def _position(msg: pynmea2.TalkerSentence) -> tuple[float, float]:
    """Signed degrees; empty or out-of-range coordinates are a parse error, never 0.0."""
    if not msg.lat or not msg.lon or msg.lat_dir not in ("N", "S") or msg.lon_dir not in (
        "E",
        "W",
    ):
        raise _Rejected("parse_error")
    lat, lon = msg.latitude, msg.longitude  # ValueError on a malformed ddmm.mmm
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise _Rejected("parse_error")
    return lat, lon


def _faa_ok(msg: pynmea2.TalkerSentence, name: str) -> bool:
    """NMEA 2.3+ mode indicator: N (not valid), M (manual), S (simulator) are not fixes."""
    idx = type(msg).name_to_idx[name]
    return idx >= len(msg.data) or msg.data[idx][:1] not in NOT_MEASURED_MODES


def _float(text: str | None) -> float | None:
    """Empty field: None. 'nan'/'inf' would break the JSON alerts: a parse error."""
    text = (text or "").strip()
    if not text:
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _int(text: str | None) -> int | None:
    text = (text or "").strip()
    if not text:
        return None
    return int(text)


def _merge_present(epoch: object, **fields: object) -> None:
    """Set the fields this sentence carried; an empty field keeps what the epoch already has."""
    for name, value in fields.items():
        if value is not None:
            setattr(epoch, name, value)
