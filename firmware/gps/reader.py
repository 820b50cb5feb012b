"""Serial adapter: a background thread that keeps a GPS UART open and feeds the NMEA decoder.

The port may vanish (USB receiver unplugged, UART driver reset): the thread closes it and reopens
with exponential backoff (reset once data flows again), logging once per change of state: one
warning when the port is lost or cannot be opened, one info line when data arrives again; the
retries in between are logged at debug level only.
The port is opened with ``exclusive=True`` (pyserial 3.5 takes a non-blocking ``flock`` on POSIX):
two readers of one UART would each get a share of the bytes and both decode garbage, so a second
exclusive opener fails instead; a port busy at start is retried like a missing one.
Damaged input is never fatal; it is counted by the decoder and logged as a one-line summary at
most every ``summary_interval_s``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import serial

from firmware.gps.fix import Fix
from firmware.gps.nmea import GARBAGE_REASONS, NmeaDecoder

LOG = logging.getLogger(__name__)


class GpsReader:
    """Reads NMEA from ``port`` in a thread; ``latest()`` is the newest Fix (or None)."""

    def __init__(
        self,
        port: str,
        baudrate: int = 9600,
        *,
        clock: Callable[[], float] = time.monotonic,
        serial_factory: Callable[..., Any] = serial.Serial,
        on_fix: Callable[[Fix], None] | None = None,
        reopen_min_s: float = 0.5,
        reopen_max_s: float = 10.0,
        summary_interval_s: float = 60.0,
        logger: logging.Logger = LOG,
        read_timeout_s: float = 0.2,
        decoder: NmeaDecoder | None = None,
        silence_s: float = 10.0,
    ) -> None:
        """`silence_s`: an open port that delivers no byte for this long is reported by
        `problem()` (the receiver is unpowered or its TX wire is loose)."""
        self.port = port
        self.baudrate = baudrate
        self._clock = clock
        self._serial_factory = serial_factory
        self._on_fix = on_fix
        self._reopen_min_s = reopen_min_s
        self._reopen_max_s = reopen_max_s
        self._summary_interval_s = summary_interval_s
        self._log = logger
        self._read_timeout_s = read_timeout_s
        self._decoder = decoder if decoder is not None else NmeaDecoder()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: Set while the port is open (tests wait on it before writing to a pty).
        self.connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._serial: Any = None
        self._latest: Fix | None = None
        self._own: dict[str, int] = {"opens": 0, "open_failures": 0, "port_errors": 0}
        self._reported: dict[str, int] = {}
        self._next_summary = 0.0
        self._callback_failed = False
        self._failing = False  # a warning was logged and the port has not delivered data since
        self._silence_s = silence_s
        self._problem: str | None = None  # why the port is unavailable, while it is
        self._quiet_since: float | None = None  # open and no byte since this clock value

    # ---- public API ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("GpsReader already started")
        self._stop.clear()
        self._next_summary = self._clock() + self._summary_interval_s
        self._thread = threading.Thread(target=self._run, name=f"gps-{self.port}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and close the port; returns within about ``timeout`` seconds."""
        self._stop.set()
        ser = self._serial
        if ser is not None and hasattr(ser, "cancel_read"):
            # wake a blocking read at once; the port may be closing under us (then the read
            # timeout still bounds the wait)
            with contextlib.suppress(Exception):
                ser.cancel_read()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._log.warning("GPS reader %s did not stop within %.1f s", self.port, timeout)
            self._thread = None

    def latest(self) -> Fix | None:
        with self._lock:
            return self._latest

    def problem(self) -> str | None:
        """Why the GPS gives nothing now, in words, or None: the port cannot be opened or was
        lost (until it delivers data again), or it is open and silent for `silence_s`. The
        device reports it in its status (`faults.gps`); the reader keeps retrying either way."""
        with self._lock:
            if self._problem is not None:
                return self._problem
            quiet = self._quiet_since
        if quiet is not None and self._clock() - quiet >= self._silence_s:
            return f"no data from {self.port} for {self._silence_s:g} s (receiver power, TX wire)"
        return None

    @property
    def counters(self) -> dict[str, int]:
        """Decoder reject reasons plus port events (opens, open_failures, port_errors)."""
        with self._lock:
            out = dict(self._decoder.counters)
            out.update(self._own)
            return out

    # ---- thread --------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._reopen_min_s
        while not self._stop.is_set():
            try:
                ser = self._serial_factory(
                    port=self.port, baudrate=self.baudrate, timeout=self._read_timeout_s,
                    exclusive=True,
                )
            except (serial.SerialException, OSError, ValueError) as exc:
                with self._lock:
                    self._own["open_failures"] += 1
                self._failed(f"GPS port {self.port} unavailable ({exc}); retrying", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, self._reopen_max_s)
                continue
            with self._lock:
                self._own["opens"] += 1
                self._decoder.reset_framing()
                self._quiet_since = self._clock()
            self._serial = ser
            self.connected.set()
            got_data = False
            try:
                got_data = self._read_until_stopped(ser)
            except Exception as exc:  # SerialException/OSError; anything else must not kill GPS
                with self._lock:
                    self._own["port_errors"] += 1
                self._failed(f"GPS port {self.port} lost ({exc}); reopening", exc)
            finally:
                self.connected.clear()
                with self._lock:
                    self._quiet_since = None
                self._serial = None
                with contextlib.suppress(Exception):  # closing a dead port can fail too
                    ser.close()
            if self._stop.is_set():
                break
            if got_data:
                delay = self._reopen_min_s  # it worked for a while: start the backoff again
            self._stop.wait(delay)
            delay = min(delay * 2, self._reopen_max_s)

    def _failed(self, message: str, exc: BaseException) -> None:
        """One warning when the port goes bad; retries while it stays bad only at debug."""
        with self._lock:
            self._problem = _brief(message.partition(" (")[0], exc)
        if self._failing:
            self._log.debug("%s", message)
            return
        self._failing = True
        if isinstance(exc, (serial.SerialException, OSError, ValueError)):
            self._log.warning("%s", message)
        else:
            self._log.exception("%s", message)

    def _read_until_stopped(self, ser: Any) -> bool:
        """Read and decode until stop() (returns) or a port error (raises)."""
        got_data = False
        skipping = True  # the first line after opening is usually a fragment: drop it
        while not self._stop.is_set():
            data = ser.read(getattr(ser, "in_waiting", 0) or 1)
            if data:
                if not got_data and self._failing:
                    self._failing = False
                    self._log.info("GPS port %s back: receiving again", self.port)
                with self._lock:
                    self._problem = None
                    self._quiet_since = self._clock()
                got_data = True
                if skipping:
                    cut = _first_eol(data)
                    if cut < 0:
                        continue
                    skipping = False
                    data = data[cut + 1 :]
                self._feed(data)
            self._maybe_summarise()
        return got_data

    def _feed(self, data: bytes) -> None:
        now = self._clock()
        with self._lock:
            fixes = self._decoder.feed(data, now)
            if fixes:
                self._latest = fixes[-1]
        if self._on_fix is not None:
            for fix in fixes:
                try:
                    self._on_fix(fix)
                except Exception:
                    if not self._callback_failed:
                        self._log.exception("GPS on_fix callback failed (logged once)")
                        self._callback_failed = True

    def _maybe_summarise(self) -> None:
        now = self._clock()
        if now < self._next_summary:
            return
        self._next_summary = now + self._summary_interval_s
        with self._lock:
            counts = {k: v for k, v in self._decoder.counters.items() if k in GARBAGE_REASONS}
        delta = {k: v - self._reported.get(k, 0) for k, v in counts.items()}
        delta = {k: v for k, v in sorted(delta.items()) if v > 0}
        self._reported = counts
        if delta:
            text = " ".join(f"{k}={v}" for k, v in delta.items())
            self._log.info("GPS %s: discarded input in the last %.0f s: %s",
                           self.port, self._summary_interval_s, text)


def _brief(what: str, exc: BaseException) -> str:
    """`what` and the cause in a few words, for the status (at most 200 characters): pyserial's
    own messages repeat the port's path twice."""
    number = getattr(exc, "errno", None)
    cause = os.strerror(number) if isinstance(number, int) else str(exc)
    return f"{what}: {cause}"[:200]


def _first_eol(data: bytes) -> int:
    """Index of the first CR or LF, or -1."""
    found = [i for i in (data.find(b"\r"), data.find(b"\n")) if i >= 0]
    return min(found) if found else -1
