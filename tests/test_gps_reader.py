"""GpsReader on real ptys: fixes arrive, a vanished port is reopened with backoff, stop() is
prompt, bad input is summarised."""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import random
import threading
import time
import tty
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
import serial

from firmware.gps.fix import Fix
from firmware.gps.reader import GpsReader
from simulator.gps_receiver import PtyGps, RouteReceiver, nmea_sentence

ROUTE_A = [(52.3700, 4.8900), (52.3800, 4.9000)]
ROUTE_B = [(48.1500, 11.5800), (48.1600, 11.5900)]
START_A = datetime(2026, 11, 23, 14, 45, 0, tzinfo=UTC)
START_B = datetime(2026, 11, 24, 8, 0, 0, tzinfo=UTC)
WAIT_S = 5.0


class Collector:
    """Thread-safe list with a wait: tests wait on conditions, never sleep."""

    def __init__(self) -> None:
        self.items: list = []
        self._cond = threading.Condition()

    def add(self, item) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list], bool], timeout: float = WAIT_S) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self.items), timeout)

    def snapshot(self) -> list:
        with self._cond:
            return list(self.items)


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records = Collector()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.add(record)

    def messages(self, level: int | None = None) -> list[str]:
        return [
            r.getMessage() for r in self.records.snapshot() if level is None or r.levelno == level
        ]


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, LogCapture]]:
    logger = logging.getLogger(f"test.gps.{uuid.uuid4().hex}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    capture = LogCapture()
    logger.addHandler(capture)
    yield logger, capture
    logger.removeHandler(capture)


@pytest.fixture
def raw_pty() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    fcntl.fcntl(master, fcntl.F_SETFL, fcntl.fcntl(master, fcntl.F_GETFL) | os.O_NONBLOCK)
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


def receiver(route, start: datetime, seed: int) -> RouteReceiver:
    return RouteReceiver(route, start_utc=start, seed=seed, speed_mps=10.0)


def dated_on(day: datetime) -> Callable[[list[Fix]], bool]:
    return lambda fixes: any(f.time is not None and f.time.date() == day.date() for f in fixes)


def test_reader_gets_fixes_from_a_pty_receiver(log):
    logger, _ = log
    fixes = Collector()
    gps = PtyGps(receiver(ROUTE_A, START_A, 1), speed=20.0)
    reader = GpsReader(gps.port, on_fix=fixes.add, logger=logger)
    reader.start()
    try:
        assert reader.connected.wait(WAIT_S)
        gps.start()
        assert fixes.wait_for(lambda f: len({x.time for x in f}) >= 3)
    finally:
        reader.stop()
        gps.stop()
    got = fixes.snapshot()
    assert all(abs(f.lat - 52.37) < 0.01 and abs(f.lon - 4.89) < 0.01 for f in got)
    dated = [f.time for f in got if f.time is not None]  # the very first RMC was dropped
    assert dated and dated[0] >= START_A
    assert reader.latest() == got[-1]
    assert reader.counters["opens"] == 1


def test_the_first_line_after_opening_is_dropped_as_a_possible_fragment(raw_pty, log):
    master, port = raw_pty
    logger, _ = log
    fixes = Collector()
    reader = GpsReader(port, on_fix=fixes.add, logger=logger)
    reader.start()
    try:
        assert reader.connected.wait(WAIT_S)
        first = nmea_sentence("GPRMC,144501.00,A,5222.19864,N,00453.40235,E,0.0,,231126,,,A")
        second = nmea_sentence("GPRMC,144502.00,A,5222.19864,N,00453.40235,E,0.0,,231126,,,A")
        os.write(master, (first + second).encode())
        assert fixes.wait_for(lambda f: len(f) >= 1)
    finally:
        reader.stop()
    assert [f.time.second for f in fixes.snapshot()] == [2]


def test_vanished_port_is_reopened_with_backoff_and_recovers(tmp_path, log):
    """The device path is a symlink (like /dev/serial/by-id/...) that is re-pointed at a new pty
    after the first one disappears, as when a USB receiver is unplugged and plugged back."""
    logger, capture = log
    link = tmp_path / "gps0"
    fixes = Collector()
    attempts = Collector()

    def factory(**kwargs):
        attempts.add(time.monotonic())
        return serial.Serial(**kwargs)

    gps1 = PtyGps(receiver(ROUTE_A, START_A, 1), speed=20.0)
    os.symlink(gps1.port, link)
    reader = GpsReader(str(link), serial_factory=factory, on_fix=fixes.add, logger=logger,
                       reopen_min_s=0.05, reopen_max_s=0.4)
    reader.start()
    gps2 = None
    try:
        assert reader.connected.wait(WAIT_S)
        gps1.start()
        assert fixes.wait_for(dated_on(START_A))

        gps1.stop()  # unplugged: the pty is gone, and udev removes its by-id link (a dangling
        link.unlink()  # link could meet a reused /dev/pts number of another program's pty)
        assert capture.records.wait_for(lambda r: any("lost" in x.getMessage() for x in r))
        assert attempts.wait_for(lambda a: len(a) >= 6)  # first open + 5 failed reopens

        gps2 = PtyGps(receiver(ROUTE_B, START_B, 2), speed=20.0)
        tmp_link = tmp_path / "gps0.new"
        os.symlink(gps2.port, tmp_link)
        os.replace(tmp_link, link)  # plugged back in (atomically, like udev)
        assert reader.connected.wait(WAIT_S)
        gps2.start()
        assert fixes.wait_for(dated_on(START_B))
    finally:
        reader.stop()
        if gps2 is not None:
            gps2.stop()

    gaps = [b - a for a, b in itertools.pairwise(attempts.items[1:])]
    nominal = [0.1, 0.2, 0.4, 0.4]  # after the 0.05 s first retry: doubling, capped at 0.4
    assert all(g >= 0.9 * n for g, n in zip(gaps, nominal, strict=False)), gaps
    assert abs(reader.latest().lat - 48.15) < 0.01
    # one line per change of state (lost, back), however many reopen attempts failed between
    [lost] = capture.messages(logging.WARNING)
    assert "lost" in lost
    [back] = capture.messages(logging.INFO)
    assert "receiving again" in back
    counters = reader.counters
    assert counters["opens"] == 2
    assert counters["port_errors"] == 1
    assert counters["open_failures"] >= 4


def test_stop_returns_promptly_while_the_port_is_silent(raw_pty, log):
    _, port = raw_pty
    reader = GpsReader(port, logger=log[0], read_timeout_s=5.0)
    reader.start()
    assert reader.connected.wait(WAIT_S)
    t0 = time.monotonic()
    reader.stop()
    assert time.monotonic() - t0 < 2.5  # well under the 5 s read timeout


def test_stop_returns_promptly_during_a_long_backoff(tmp_path, log):
    attempts = Collector()

    def factory(**kwargs):
        attempts.add(kwargs["port"])
        return serial.Serial(**kwargs)

    reader = GpsReader(str(tmp_path / "missing"), serial_factory=factory, logger=log[0],
                       reopen_min_s=30.0, reopen_max_s=60.0)
    reader.start()
    assert attempts.wait_for(lambda a: len(a) >= 1)
    t0 = time.monotonic()
    reader.stop()
    assert time.monotonic() - t0 < 5.0  # well under the 30 s backoff
    assert len(attempts.items) == 1
    assert reader.counters["open_failures"] == 1


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_garbage_is_summarised_in_one_line_per_interval(raw_pty, log):
    master, port = raw_pty
    logger, capture = log
    clock = FakeClock()
    fixes = Collector()
    reader = GpsReader(port, clock=clock, on_fix=fixes.add, logger=logger,
                       summary_interval_s=60.0, read_timeout_s=0.05)
    reader.start()
    try:
        assert reader.connected.wait(WAIT_S)
        garbage = (
            b"first line is dropped\r\n"
            + b"$GPRMC,000346.03,A,4808\r\n" * 5
            + b"$GPGGA,1,2,3*00\r\n" * 3
            + b"\xb5b\x01\x07\x5c\x00\xff\r\n"
        )
        good = nmea_sentence("GPRMC,144502.00,A,5222.19864,N,00453.40235,E,0.0,,231126,,,A")
        os.write(master, garbage + good.encode())
        assert fixes.wait_for(lambda f: len(f) == 1)
        assert capture.messages() == []  # nothing logged per bad line

        clock.t += 61.0
        assert capture.records.wait_for(lambda r: len(r) >= 1)

        clock.t += 61.0  # a clean interval logs nothing
        for second, count in ((3, 2), (4, 3)):  # the 2nd fix proves the 1st loop pass finished
            os.write(master, nmea_sentence(
                f"GPRMC,14450{second}.00,A,5222.19864,N,00453.40235,E,0.0,,231126,,,A"
            ).encode())
            assert fixes.wait_for(lambda f, n=count: len(f) == n)
    finally:
        reader.stop()
    [summary] = capture.messages()
    counts = dict(tok.split("=") for tok in summary.split() if "=" in tok)
    assert counts == {"no_checksum": "5", "checksum": "3", "not_nmea": "1"}
    assert reader.counters["no_checksum"] == 5


def test_a_failing_on_fix_callback_does_not_stop_the_reader(raw_pty, log):
    master, port = raw_pty
    logger, capture = log
    calls = Collector()

    def on_fix(fix: Fix) -> None:
        calls.add(fix)
        raise RuntimeError("consumer bug")

    reader = GpsReader(port, on_fix=on_fix, logger=logger)
    reader.start()
    try:
        assert reader.connected.wait(WAIT_S)
        lines = "\r\n" + "".join(
            nmea_sentence(f"GPRMC,14450{s}.00,A,5222.19864,N,00453.40235,E,0.0,,231126,,,A")
            for s in range(1, 4)
        )
        os.write(master, lines.encode())
        assert calls.wait_for(lambda c: len(c) == 3)
    finally:
        reader.stop()
    assert sum("callback" in m for m in capture.messages(logging.ERROR)) == 1
    assert reader.latest().time.second == 3


def test_a_port_missing_at_start_warns_once_and_recovers(raw_pty, log):
    master, port = raw_pty
    logger, capture = log
    attempts = Collector()
    fixes = Collector()

    def factory(**kwargs):
        attempts.add(kwargs["port"])
        if len(attempts.items) <= 4:
            raise serial.SerialException(f"could not open port {kwargs['port']}")
        return serial.Serial(**kwargs)

    reader = GpsReader(port, serial_factory=factory, on_fix=fixes.add, logger=logger,
                       reopen_min_s=0.01, reopen_max_s=0.05)
    reader.start()
    try:
        assert reader.connected.wait(WAIT_S)
        os.write(master, ("\r\n" + nmea_sentence(
            "GPRMC,144501.00,A,5222.19864,N,00453.40235,E,0.0,,231126,,,A")).encode())
        assert fixes.wait_for(lambda f: len(f) == 1)
    finally:
        reader.stop()
    [unavailable] = capture.messages(logging.WARNING)
    assert "unavailable" in unavailable
    assert len(capture.messages(logging.DEBUG)) == 3  # the other failed attempts
    [back] = capture.messages(logging.INFO)
    assert "receiving again" in back
    assert reader.counters["open_failures"] == 4


class ScriptedPort:
    """A serial port that returns scripted reads, then behaves like a silent line (each read
    waits for its timeout or for cancel_read)."""

    def __init__(self, reads: list[bytes], timeout: float) -> None:
        self._reads = list(reads)
        self._timeout = timeout
        self._cancelled = threading.Event()
        self.in_waiting = 0

    def read(self, size: int = 1) -> bytes:
        if self._reads:
            return self._reads.pop(0)
        self._cancelled.wait(self._timeout)
        return b""

    def cancel_read(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self._cancelled.set()


def test_binary_bursts_read_in_small_pieces_lose_no_fix(log):
    """A receiver mixing binary output with NMEA: the reader reads 1..64 bytes at a time, and
    every sentence after a burst of a few hundred bytes still gives its fix."""
    rng = random.Random(3)
    noise = bytes(b for b in range(256) if b not in (0x0A, 0x0D))
    stream = b"\r\n"  # the reader drops everything up to the first line end
    for second in range(1, 9):
        stream += bytes(rng.choice(noise) for _ in range(rng.randint(300, 700)))
        stream += nmea_sentence(
            f"GPRMC,1445{second:02d}.00,A,5222.19864,N,00453.40235,E,0.0,,231126,,,A").encode()
    reads, i = [], 0
    while i < len(stream):
        n = rng.randint(1, 64)
        reads.append(stream[i : i + n])
        i += n
    fixes = Collector()
    reader = GpsReader("scripted", serial_factory=lambda **kw: ScriptedPort(reads, kw["timeout"]),
                       on_fix=fixes.add, logger=log[0])
    reader.start()
    try:
        assert fixes.wait_for(lambda f: len(f) >= 8)
    finally:
        reader.stop()
    assert [f.time.second for f in fixes.snapshot()] == list(range(1, 9))


def test_the_reader_holds_its_port_exclusively_so_a_second_reader_is_refused(raw_pty, log):
    """Two readers of one UART would each get part of the bytes; the second is refused."""
    _, port = raw_pty
    reader = GpsReader(port, logger=log[0])
    reader.start()
    try:
        assert reader.connected.wait(WAIT_S)
        with pytest.raises(serial.SerialException, match="Could not exclusively lock port"):
            serial.Serial(port=port, baudrate=9600, timeout=0.1, exclusive=True)
    finally:
        reader.stop()
    serial.Serial(port=port, baudrate=9600, timeout=0.1, exclusive=True).close()  # freed


def test_a_port_busy_at_start_is_retried_until_its_holder_lets_go(raw_pty, log):
    """Busy like `sos-device selftest` holding it while the service starts: one warning, then
    the fix arrives once the other program closes the port."""
    master, port = raw_pty
    logger, capture = log
    fixes = Collector()
    holder = serial.Serial(port=port, baudrate=9600, timeout=0.1, exclusive=True)
    reader = GpsReader(port, on_fix=fixes.add, logger=logger, reopen_min_s=0.01,
                       reopen_max_s=0.05)
    reader.start()
    try:
        assert capture.records.wait_for(
            lambda records: sum("unavailable" in r.getMessage() for r in records) >= 3)
        assert not reader.connected.is_set()
        holder.close()
        assert reader.connected.wait(WAIT_S)
        os.write(master, ("\r\n" + nmea_sentence(
            "GPRMC,144501.00,A,5222.19864,N,00453.40235,E,0.0,,231126,,,A")).encode())
        assert fixes.wait_for(lambda f: len(f) == 1)
    finally:
        holder.close()
        reader.stop()
    [busy] = capture.messages(logging.WARNING)
    assert "Could not exclusively lock port" in busy
    assert reader.counters["open_failures"] >= 3


# -- problem(): what the device reports as its GPS fault --------------------------------------


def test_a_port_that_cannot_be_opened_is_a_problem_until_it_delivers(raw_pty, log):
    master, port = raw_pty
    fixes = Collector()
    holder = serial.Serial(port=port, baudrate=9600, timeout=0.1, exclusive=True)
    reader = GpsReader(port, on_fix=fixes.add, logger=log[0], reopen_min_s=0.01,
                       reopen_max_s=0.05)
    reader.start()
    try:
        assert log[1].records.wait_for(
            lambda records: any("unavailable" in r.getMessage() for r in records))
        problem = reader.problem()
        assert problem is not None and problem.startswith(f"GPS port {port} unavailable")
        holder.close()
        assert reader.connected.wait(WAIT_S)
        os.write(master, ("\r\n" + nmea_sentence(
            "GPRMC,144501.00,A,5222.19864,N,00453.40235,E,0.0,,231126,,,A")).encode())
        assert fixes.wait_for(lambda f: len(f) == 1)  # decoded after the problem was cleared
        assert reader.problem() is None
    finally:
        holder.close()
        reader.stop()


def test_an_open_port_that_stays_silent_is_a_problem_after_silence_s():
    clock = FakeClock()
    reader = GpsReader("scripted", clock=clock, silence_s=10.0,
                       serial_factory=lambda **kw: ScriptedPort([], kw["timeout"]))
    reader.start()
    try:
        assert reader.connected.wait(WAIT_S)
        clock.t += 9.9
        assert reader.problem() is None
        clock.t += 0.2
        assert reader.problem() == "no data from scripted for 10 s (receiver power, TX wire)"
    finally:
        reader.stop()


class GatedPort(ScriptedPort):
    """Gives its reads only once `gate` is set; `asked_again` is set when the reader asks for
    more after the scripted reads, i.e. once it has handled them."""

    def __init__(self, reads: list[bytes], timeout: float) -> None:
        super().__init__(reads, timeout)
        self.gate = threading.Event()
        self.asked_again = threading.Event()

    def read(self, size: int = 1) -> bytes:
        if not self.gate.wait(self._timeout):
            return b""
        if not self._reads:
            self.asked_again.set()
        return super().read(size)


def test_bytes_of_any_kind_end_the_silence():
    """Binary output with no line end still proves the receiver is powered and wired."""
    clock = FakeClock()
    port = GatedPort([b"\xb5\x62\x01\x07"], timeout=0.05)  # a UBX frame's start, no NMEA
    reader = GpsReader("scripted", clock=clock, silence_s=10.0,
                       serial_factory=lambda **kw: port)
    reader.start()
    try:
        assert reader.connected.wait(WAIT_S)
        clock.t += 9.0
        port.gate.set()
        assert port.asked_again.wait(WAIT_S)
        clock.t += 9.0  # 18 s after opening, 9 s after the bytes
        assert reader.problem() is None
    finally:
        reader.stop()
