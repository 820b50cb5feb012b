"""NMEA 0183 byte stream -> position fixes. Pure logic: no I/O, no wall clock.

Framing. Bytes are buffered until CR or LF (any mix). A line may hold several sentences when a
receiver dropped a line end ("...*1E$GPRMC,..."), so each line is cut before every ``$`` or ``!``;
bytes before the first ``$`` are junk, and a lone ``$`` (``$$GPRMC``) is skipped silently. A
candidate without a line end is held back. When more than ``MAX_LINE`` bytes are held back (a
binary burst, a receiver in a binary protocol), framing resynchronises on the last ``$`` or
``!``: the junk before it is dropped, never a sentence already started, so the fixes do not
depend on how the bytes were cut into reads. A sentence longer than ``MAX_LINE`` is dropped.
Every candidate must carry a valid ``*HH`` checksum (a missing checksum is rejected too).

Sentences. Only the types used (RMC, GGA, GLL, GNS, GSA, VTG, ZDA, any talker) are split into
fields, by this module, after the checksum is verified: the decoder runs on every byte the
receiver sends, and without a general parser it decodes, epochs included, at about 0.85 of the
lines/s of a bare ``pynmea2.parse`` (``python -m bench``). Other sentences with a valid checksum
count as ``unsupported``.

Plausibility. A checksum is an 8-bit XOR: one damaged line in 256 passes it, and some receivers
send impossible values in well-formed sentences. Each value used must be plausible, else the
whole sentence is rejected as ``implausible`` and decoding goes on: a time of day 00:00:00 to
23:59:59; a date from ``MIN_YEAR`` to ``MAX_YEAR`` as sent (before the week rollover correction
below); latitude/longitude within +-90/+-180 with minutes below 60; speed 0 to ``MAX_SPEED_MPS``;
course 0 to 360; HDOP 0 to ``MAX_HDOP``; satellites 0 to ``MAX_SATELLITES``; GGA quality 0 to 8
(NMEA 0183 4.x); altitude ``MIN_ALT_M`` to ``MAX_ALT_M``.

Epochs. Sentences carrying the same UTC time of day (RMC, GGA, GLL, GNS, ZDA) belong to one
epoch; GSA and VTG carry no time and join the epoch currently open. A sentence with a different
time of day opens the next epoch. A position sentence (RMC, GGA, GLL, GNS) or ZDA whose time field
is empty is counted as ``no_time`` and joins no epoch: its position was not measured at the open
epoch's time, and its date is not that epoch's date (the empty ZDA a receiver sends before it has
time is such a sentence). Position is trusted only from GGA quality > 0, RMC/GLL status A, GNS
mode not N; GGA quality 7/8 and FAA mode M/S (manual input, simulator) are not measurements and
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

import re
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

from firmware.gps.fix import Fix

KNOTS_TO_MPS = 1852.0 / 3600.0
ROLLOVER = timedelta(weeks=1024)
DEFAULT_DATE_FLOOR = date(2025, 1, 1)
MAX_LINE = 512  # NMEA allows 82 characters; proprietary sentences run longer
HALF_DAY_US = 12 * 3600 * 1_000_000
#: GGA quality 7 (manual input) and 8 (simulator) are not measurements: never trusted.
NOT_MEASURED_QUALITY = frozenset({7, 8})
#: FAA mode letters (RMC, GLL, VTG, GNS) that mean "no real fix".
NOT_MEASURED_MODES = frozenset("NMS")

# Plausibility bounds (see the module docstring).
#: GPS time starts on 1980-01-06: an older date as sent is damage. A 10-bit week receiver
#: reports dates 1024 (or, from the 1990s, 2048) weeks early: for a date after 2025, after 1985.
MIN_YEAR = 1980
MAX_YEAR = 2099  # RMC carries a two-digit year; ZDA's four digits are bounded the same
MAX_SPEED_MPS = 600.0  # above any airliner (and above the 515 m/s COCOM export limit)
MAX_HDOP = 99.99  # the largest value receivers print (u-blox, MediaTek: "99.99" = no geometry)
MAX_SATELLITES = 99  # a two-digit field ("00-99" in NMEA 0183 4.x GNS)
MAX_GGA_QUALITY = 8  # NMEA 0183 4.x: 0 invalid .. 8 simulator
MIN_ALT_M, MAX_ALT_M = -1_000.0, 100_000.0  # Dead Sea shore to a stratospheric balloon

#: Reasons in ``NmeaDecoder.counters`` that mean the bytes were damaged or were not NMEA
#: (``implausible``: a valid checksum around impossible values, usually damage the 8-bit XOR
#: missed). The others are valid sentences we do not use: unsupported, void_fix (no fix: a
#: normal state), no_time (a position or ZDA sentence with an empty time field: the receiver has
#: no time yet) and no_epoch (a sentence without time, e.g. GSA, before any timed sentence).
GARBAGE_REASONS = frozenset(
    {"checksum", "no_checksum", "parse_error", "not_nmea", "overlong", "implausible"}
)

#: "*HH" checksum digits -> value, either case (a dict lookup: int() would take " 4" or "+4").
_HEX = {(a + b).encode(): int(a + b, 16)
        for a in "0123456789abcdefABCDEF" for b in "0123456789abcdefABCDEF"}
_DOLLAR, _BANG, _STAR, _STAR_BYTE, _P, _LF, _CR = 0x24, 0x21, b"*", 0x2A, 0x50, 0x0A, 0x0D
_PRINTABLE = bytes(range(0x20, 0x7F))
_START = re.compile(rb"[$!]")


class _Rejected(Exception):
    """A sentence that must not be used; ``reason`` goes into the counters."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Epoch:
    """What one time of day has gathered so far (slots: one is made per receiver second)."""

    __slots__ = ("alt_m", "course_deg", "date", "first_at", "gsa_hdop", "gsa_mode",
                 "gsa_satellites", "hdop", "key", "lat", "lon", "quality", "satellites",
                 "speed_mps", "tod_us", "when")

    def __init__(self, tod_us: int, day: date | None) -> None:
        self.tod_us = tod_us
        self.date = day
        self.when: datetime | None = None  # made once per epoch, when the date is known
        self.lat: float | None = None
        self.lon: float | None = None
        self.alt_m: float | None = None
        self.speed_mps: float | None = None
        self.course_deg: float | None = None
        self.quality: int | None = None
        self.gsa_mode: int | None = None
        self.satellites: int | None = None
        self.hdop: float | None = None
        self.gsa_satellites = 0
        self.gsa_hdop: float | None = None
        self.first_at: float | None = None
        self.key: tuple | None = None  # the fields of the last Fix emitted


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
        self._date_cache: tuple[str, date] | None = None  # RMC date text -> corrected date

    # ---- framing -------------------------------------------------------------------------

    def reset_framing(self) -> None:
        """Forget a partial line (the port was reopened: its end will never come)."""
        self._buf = b""

    def feed(self, data: bytes, now: float) -> list[Fix]:
        """Add received bytes; return the Fixes (new or updated) they completed.

        Written for speed (it runs on every read from the port): one-byte tests use ``int in
        bytes``, which is several times cheaper than ``bytes in bytes`` or a method call."""
        out: list[Fix] = []
        if type(data) is not bytes:
            data = bytes(data)
        if _LF not in data and _CR not in data:  # no line end: only the held-back part grows
            buf = self._buf + data
            self._buf = buf if len(buf) <= MAX_LINE else self._resync(buf)
            return out
        cut = max(data.rfind(_LF), data.rfind(_CR))
        complete = self._buf + data[: cut + 1] if self._buf else data[: cut + 1]
        rest = data[cut + 1 :]
        self._buf = rest if len(rest) <= MAX_LINE else self._resync(rest)
        sentence = self._sentence
        for line in complete.splitlines():
            if not line:
                continue
            if line[0] == _DOLLAR and _BANG not in line and line.count(_DOLLAR) == 1:
                sentence(line, now, out)  # the usual case: one sentence on the line
            else:
                self._line(line, now, out)
        return out

    def _resync(self, buf: bytes) -> bytes:
        """Too much held back without a line end: keep only the sentence started last."""
        start = max(buf.rfind(b"$"), buf.rfind(b"!"))
        if (buf if start < 0 else buf[:start]).strip():
            self.counters["not_nmea"] += 1  # junk, as before the first "$" of a line
        if start < 0:
            return b""
        if len(buf) - start > MAX_LINE:
            self.counters["overlong"] += 1
            return b""
        return buf[start:]

    def _line(self, line: bytes, now: float, out: list[Fix]) -> None:
        """A line with junk before its first sentence, or several sentences spliced."""
        starts = [m.start() for m in _START.finditer(line)]
        if (line[: starts[0]] if starts else line).strip():
            self.counters["not_nmea"] += 1
        if not starts:
            return
        for i, j in zip(starts, [*starts[1:], len(line)], strict=True):
            part = line[i:j]
            if len(part.rstrip()) > 1:  # a lone "$" or "!" is a repeated start ("$$GPRMC")
                self._sentence(part, now, out)

    def _sentence(self, raw: bytes, now: float, out: list[Fix]) -> None:
        """One candidate starting with ``$`` or ``!``: check it, then hand it to its type.

        Written for speed (it sees every line the receiver sends): the type is looked up on the
        bytes, and only the sentences used are decoded and split into fields."""
        n = len(raw)
        if n < 4 or raw[-3] != _STAR_BYTE:
            raw = raw.rstrip()  # trailing white space is tolerated
            n = len(raw)
        if n > MAX_LINE:
            self.counters["overlong"] += 1
            return
        if raw[0] == _BANG:
            self.counters["unsupported"] += 1  # AIS encapsulation (!AIVDM/!AIVDO)
            return
        want = _HEX.get(raw[-2:]) if n >= 4 and raw[-3] == _STAR_BYTE else None
        body = raw[1:-3]
        if n <= 131:  # the checksum (see _xor), unrolled for up to 128 bytes: nearly every line
            x = int.from_bytes(body, "little")
            if n > 67:
                x ^= x >> 512
            x ^= x >> 256
            x ^= x >> 128
            x ^= x >> 64
            x ^= x >> 32
            x ^= x >> 16
            x ^= x >> 8
            x &= 0xFF
        else:
            x = _xor(body)
        if x != want:
            self.counters[_why_bad(raw)] += 1
            return
        handler = _HANDLERS.get(raw[3:6]) if raw[6:7] == b"," and raw[1] != _P else None
        if handler is None:
            self.counters["not_nmea" if body.translate(None, _PRINTABLE) else "unsupported"] += 1
            return
        text = body.decode("ascii") if body.isascii() else "\x00"
        if not text.isprintable():
            self.counters["not_nmea"] += 1
            return
        if "*" in text:
            self.counters["parse_error"] += 1  # spliced: "...*00.0000,N,0,,*51"
            return
        try:
            handler(self, text[6:].split(","), now, out)
        except _Rejected as rej:
            self.counters[rej.reason] += 1
            return
        except Exception:  # never let a malformed field take the reader down
            self.counters["parse_error"] += 1
            return
        self.accepted += 1

    # ---- epochs --------------------------------------------------------------------------

    def _open(self, tod_us: int) -> _Epoch:
        """The epoch for a sentence with this time of day."""
        ep = self._epoch
        if ep is not None and ep.tod_us == tod_us:
            return ep
        last = self._last_tod
        if self._date is not None and last is not None and tod_us < last - HALF_DAY_US:
            self._date += timedelta(days=1)  # the time of day wrapped past midnight
        self._last_tod = tod_us
        ep = _Epoch(tod_us, self._date)
        self._epoch = ep
        return ep

    def _current(self) -> _Epoch:
        """The open epoch, for a sentence that carries no time (GSA, VTG)."""
        if self._epoch is None:
            raise _Rejected("no_epoch")
        return self._epoch

    def _set_date(self, ep: _Epoch, d: date) -> None:
        if ep.date != d:
            ep.date = d
            ep.when = None
        if ep is self._epoch:
            self._date = d
            self._last_tod = ep.tod_us

    def _corrected(self, d: date) -> date:
        """A plausible date as sent, moved past the week rollover (module docstring)."""
        if self.date_floor is not None:
            while d < self.date_floor:
                d += ROLLOVER
        return d

    def _emit(self, ep: _Epoch, now: float, out: list[Fix]) -> None:
        if ep.lat is None or ep.lon is None:
            return
        when = ep.when
        if when is None and ep.date is not None:
            d, us = ep.date, ep.tod_us
            secs, us = divmod(us, 1_000_000)
            mins, secs = divmod(secs, 60)
            when = ep.when = datetime(d.year, d.month, d.day, mins // 60, mins % 60, secs, us,
                                      tzinfo=UTC)
        gsa_mode = ep.gsa_mode
        mode = gsa_mode if gsa_mode == 2 or gsa_mode == 3 else (3 if ep.alt_m is not None else 2)
        sats = ep.satellites if ep.satellites is not None else (ep.gsa_satellites or None)
        hdop = ep.hdop if ep.hdop is not None else ep.gsa_hdop
        key = (when, ep.lat, ep.lon, ep.alt_m, ep.speed_mps, ep.course_deg, ep.quality, mode,
               sats, hdop)
        if key == ep.key:
            return
        ep.key = key
        if ep.first_at is None:
            ep.first_at = now
        out.append(Fix(*key, received_at=ep.first_at))

    # ---- sentences (fields after the type, as sent; missing trailing fields are empty) --------

    def _rmc(self, f: list[str], now: float, out: list[Fix]) -> None:
        if len(f) < 12:
            f += [""] * (12 - len(f))
        tod = _tod_us(f[0])
        if f[1] != "A" or f[11][:1] in NOT_MEASURED_MODES:
            if tod is not None:
                self._open(tod)
            raise _Rejected("void_fix")
        if tod is None:
            raise _Rejected("no_time")
        lat, lon = _position(f[2], f[3], f[4], f[5])
        speed = _num(f[6])
        if speed is not None:
            speed *= KNOTS_TO_MPS
            if not 0.0 <= speed <= MAX_SPEED_MPS:
                raise _Rejected("implausible")
        course = _course(f[7])
        day = self._rmc_date(f[8]) if f[8] else None
        ep = self._open(tod)
        if day is not None:
            self._set_date(ep, day)
        ep.lat, ep.lon = lat, lon
        if speed is not None:
            ep.speed_mps = speed
        if course is not None:
            ep.course_deg = course
        self._emit(ep, now, out)

    def _gga(self, f: list[str], now: float, out: list[Fix]) -> None:
        if len(f) < 9:
            f += [""] * (9 - len(f))
        tod = _tod_us(f[0])
        quality = _int(f[5])
        if quality is not None and not 0 <= quality <= MAX_GGA_QUALITY:
            raise _Rejected("implausible")
        if not quality or quality in NOT_MEASURED_QUALITY:
            if tod is not None:
                self._open(tod)
            raise _Rejected("void_fix")
        if tod is None:
            raise _Rejected("no_time")
        lat, lon = _position(f[1], f[2], f[3], f[4])
        sats = _satellites(f[6])
        hdop = _hdop(f[7])
        alt = _altitude(f[8])
        ep = self._open(tod)
        ep.lat, ep.lon, ep.quality = lat, lon, quality
        _set_quality_fields(ep, sats, hdop, alt)
        self._emit(ep, now, out)

    def _gll(self, f: list[str], now: float, out: list[Fix]) -> None:
        if len(f) < 7:
            f += [""] * (7 - len(f))
        tod = _tod_us(f[4])
        if f[5] != "A" or f[6][:1] in NOT_MEASURED_MODES:
            if tod is not None:
                self._open(tod)
            raise _Rejected("void_fix")
        if tod is None:
            raise _Rejected("no_time")
        lat, lon = _position(f[0], f[1], f[2], f[3])
        ep = self._open(tod)
        ep.lat, ep.lon = lat, lon
        self._emit(ep, now, out)

    def _gns(self, f: list[str], now: float, out: list[Fix]) -> None:
        if len(f) < 9:
            f += [""] * (9 - len(f))
        tod = _tod_us(f[0])
        modes = f[5]
        if not modes or set(modes) <= NOT_MEASURED_MODES:
            if tod is not None:
                self._open(tod)
            raise _Rejected("void_fix")
        if tod is None:
            raise _Rejected("no_time")
        lat, lon = _position(f[1], f[2], f[3], f[4])
        sats = _satellites(f[6])
        hdop = _hdop(f[7])
        alt = _altitude(f[8])
        ep = self._open(tod)
        ep.lat, ep.lon = lat, lon
        _set_quality_fields(ep, sats, hdop, alt)
        self._emit(ep, now, out)

    def _gsa(self, f: list[str], now: float, out: list[Fix]) -> None:
        if len(f) < 16:
            f += [""] * (16 - len(f))
        mode = _int(f[1])
        if mode == 2 or mode == 3:
            used = sum(1 for v in f[2:14] if v and not v.isspace())
            hdop = _hdop(f[15])
            ep = self._current()
            ep.gsa_mode = mode
            ep.gsa_satellites += used
            if hdop is not None:
                ep.gsa_hdop = hdop
        else:
            ep = self._current()
        self._emit(ep, now, out)

    def _vtg(self, f: list[str], now: float, out: list[Fix]) -> None:
        if len(f) < 9:
            f += [""] * (9 - len(f))
        if f[8][:1] in NOT_MEASURED_MODES:
            raise _Rejected("void_fix")
        course = _course(f[0])
        knots = _num(f[4])
        speed = knots * KNOTS_TO_MPS if knots is not None else None
        if speed is None:
            kmh = _num(f[6])
            speed = kmh / 3.6 if kmh is not None else None
        if speed is not None and not 0.0 <= speed <= MAX_SPEED_MPS:
            raise _Rejected("implausible")
        ep = self._current()
        if speed is not None:
            ep.speed_mps = speed
        if course is not None:
            ep.course_deg = course
        self._emit(ep, now, out)

    def _zda(self, f: list[str], now: float, out: list[Fix]) -> None:
        if len(f) < 4:
            f += [""] * (4 - len(f))
        tod = _tod_us(f[0])
        if tod is None or not (f[1] and f[2] and f[3]):
            raise _Rejected("no_time")  # the receiver has no (complete) time yet
        if not (f[1].isdigit() and f[2].isdigit() and f[3].isdigit()):
            raise _Rejected("parse_error")
        day = self._corrected(_plausible_date(int(f[3]), int(f[2]), int(f[1])))
        ep = self._open(tod)
        self._set_date(ep, day)
        self._emit(ep, now, out)

    def _rmc_date(self, text: str) -> date:
        """DDMMYY (YY 69..99: 19YY, as strptime's %y), plausible and rollover-corrected."""
        cached = self._date_cache
        if cached is not None and cached[0] == text:
            return cached[1]
        if len(text) != 6 or not text.isdigit():
            raise _Rejected("parse_error")
        yy = int(text[4:])
        day = _plausible_date(yy + (1900 if yy >= 69 else 2000), int(text[2:4]), int(text[:2]))
        day = self._corrected(day)
        self._date_cache = (text, day)
        return day


_HANDLERS: dict[bytes, Callable[[NmeaDecoder, list[str], float, list[Fix]], None]] = {
    b"RMC": NmeaDecoder._rmc,
    b"GGA": NmeaDecoder._gga,
    b"GLL": NmeaDecoder._gll,
    b"GNS": NmeaDecoder._gns,
    b"GSA": NmeaDecoder._gsa,
    b"VTG": NmeaDecoder._vtg,
    b"ZDA": NmeaDecoder._zda,
}



def _set_quality_fields(ep: _Epoch, sats: int | None, hdop: float | None,
                        alt: float | None) -> None:
    """GGA and GNS: the fields a sentence gave (an empty one keeps the epoch's value)."""
    if sats is not None:
        ep.satellites = sats
    if hdop is not None:
        ep.hdop = hdop
    if alt is not None:
        ep.alt_m = alt

def _xor(body: bytes) -> int:
    """The NMEA checksum: XOR of all bytes, folded in halves on one integer (a Python loop over
    the bytes would cost more than the rest of the decoding)."""
    x = int.from_bytes(body, "little")
    shift = 512
    while shift < len(body) * 8:
        shift <<= 1
    while shift >= 8:
        x ^= x >> shift
        shift >>= 1
    return x & 0xFF


def _why_bad(raw: bytes) -> str:
    """Why a candidate's checksum did not verify: not text, no checksum, two (spliced), wrong."""
    if not (raw.isascii() and raw.decode("ascii").isprintable()):
        return "not_nmea"
    if _STAR not in raw:
        return "no_checksum"
    if raw[-3:-2] == _STAR and _STAR in raw[1:-3]:
        return "parse_error"
    return "checksum"


def _tod_us(s: str) -> int | None:
    """hhmmss[.sss] as microseconds of the day; None for an empty field."""
    if not s:
        return None
    frac = s[6:]
    if not s[:6].isdigit() or len(s) < 6 or (frac and (frac[0] != "." or not (
            frac[1:].isdigit() or len(frac) == 1))):
        raise _Rejected("parse_error")
    h, m, sec = int(s[:2]), int(s[2:4]), int(s[4:6])
    if h > 23 or m > 59 or sec > 59:
        raise _Rejected("implausible")
    us = int((frac[1:] + "00000")[:6]) if len(frac) > 1 else 0
    return ((h * 60 + m) * 60 + sec) * 1_000_000 + us


def _plausible_date(year: int, month: int, day: int) -> date:
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise _Rejected("implausible")
    try:
        return date(year, month, day)
    except ValueError:
        raise _Rejected("implausible") from None


def _degrees(dm: str, limit: float) -> float:
    """(d)ddmm.mmm as degrees, as pynmea2 computes it; minutes must be below 60."""
    dot = dm.find(".")
    if dot < 3 or not dm[:dot].isdigit() or not dm[dot + 1 :].isdigit():
        raise _Rejected("parse_error")
    minutes = float(dm[dot - 2 :])
    value = float(dm[: dot - 2]) + minutes / 60
    if minutes >= 60.0 or value > limit:
        raise _Rejected("implausible")
    return value


def _position(lat: str, ns: str, lon: str, ew: str) -> tuple[float, float]:
    """Signed degrees; empty or malformed coordinates are a parse error, never 0.0."""
    if not lat or not lon or ns not in ("N", "S") or ew not in ("E", "W"):
        raise _Rejected("parse_error")
    y = _degrees(lat, 90.0)
    x = _degrees(lon, 180.0)
    return (y if ns == "N" else -y), (x if ew == "E" else -x)


def _num(text: str) -> float | None:
    """Empty field: None. 'nan'/'inf' would break the JSON alerts: a parse error."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        if text.isspace():
            return None
        raise
    if value - value != 0.0:  # inf or nan
        raise _Rejected("parse_error")
    return value


def _int(text: str) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        if text.isspace():
            return None
        raise


def _course(text: str) -> float | None:
    value = _num(text)
    if value is not None and not 0.0 <= value <= 360.0:
        raise _Rejected("implausible")
    return value


def _hdop(text: str) -> float | None:
    value = _num(text)
    if value is not None and not 0.0 <= value <= MAX_HDOP:
        raise _Rejected("implausible")
    return value


def _altitude(text: str) -> float | None:
    value = _num(text)
    if value is not None and not MIN_ALT_M <= value <= MAX_ALT_M:
        raise _Rejected("implausible")
    return value


def _satellites(text: str) -> int | None:
    if len(text) > 3:  # int() of a huge digit string is slow: no count has more digits
        raise _Rejected("implausible")
    value = _int(text)
    if value is not None and not 0 <= value <= MAX_SATELLITES:
        raise _Rejected("implausible")
    return value
