"""`sos-device selftest`: is every part of the device wired and working? One line per check.

Each check is one function that takes exactly what it needs (the port, the pin, a probe, the
clocks), is bounded in time and never raises: a failure, or an exception nobody expected, becomes
a FAIL whose text says what is wrong and how to fix it. `run_selftest` runs them in a fixed order
(CHECKS); `summary` is the JSON-ready result the runtime reports; `SelftestSchedule` says when a
pillar must test itself again (EN 81-28: at least every 3 days). docs/SELFTEST.md has what each
check proves and what it cannot.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import serial

from firmware.config import DeviceConfig
from firmware.gps.fix import Fix
from firmware.gps.nmea import GARBAGE_REASONS, NmeaDecoder
from protocol import utc_iso
from protocol.mqtt import BrokerConfig, make_client

#: The checks, in the order they run and print.
CHECKS = ("camera", "gps", "button", "led", "storage", "clock", "broker")

DEFAULT_MIN_FREE_MB = 100  # the outbox needs little; this leaves room for logs and a clip
DEFAULT_MAX_SKEW_S = 5.0  # NTP keeps a Pi within milliseconds; NMEA arrives < 1 s after its second
PILLAR_INTERVAL_S = 24 * 3600.0  # a pillar tests itself daily ...
MAX_INTERVAL_S = 72 * 3600.0  # ... and EN 81-28 requires at least every 3 days

CAMERA_FIX = ("check the camera's ribbon cable (seated, latch closed, contacts the right way) and "
              "that `rpicam-hello --list-cameras` lists the sensor")
GPS_SILENT_FIX = ("check the receiver's power and its TX wire to the Pi's RX (GPIO15), and "
                  "enable_uart=1 in /boot/firmware/config.txt")
CERT_REFUSED_FIX = ("the broker refused this device's certificate: is it issued by the fleet CA "
                    "and not revoked? see docs/FLASHING.md")
GPS_BUSY_FIX = ("stop it first (`systemctl stop sos-device`); a pillar's scheduled self-test runs "
                "inside the service and judges the service's own GPS reader")
PINS_BUSY_FIX = ("the pin is in use: if sos-device is running it holds the pins (stop it with "
                 "`systemctl stop sos-device`, or let it run its scheduled self-test)")


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    skipped: bool = False  # ok, but there was nothing to test (a pillar without GPS receiver)


@dataclass(frozen=True)
class SelftestLimits:
    """How long each check may take and what it accepts (the simulator shortens the waits)."""

    camera_timeout_s: float = 10.0
    gps_timeout_s: float = 5.0
    broker_timeout_s: float = 5.0
    storage_timeout_s: float = 10.0
    min_free_mb: float = DEFAULT_MIN_FREE_MB
    max_clock_skew_s: float = DEFAULT_MAX_SKEW_S
    led_show_s: float = 0.5  # LED without sense line: how long it is lit for a person to see


def format_line(result: CheckResult) -> str:
    """`PASS gps      /dev/sos-gps: ...` or `FAIL gps      ... -- fix: ...`."""
    status = "SKIP" if result.skipped else ("PASS" if result.ok else "FAIL")
    line = f"{status} {result.name:<8} {result.detail}"
    if not result.ok and result.fix:
        line += f" -- fix: {result.fix}"
    return line


def summary(results: list[CheckResult], at: datetime) -> dict[str, Any]:
    """JSON-ready result for the device's status message: when, whether all passed, what failed."""
    return {"at": utc_iso(at), "ok": all(r.ok for r in results),
            "failed": [r.name for r in results if not r.ok]}


_F = TypeVar("_F", bound=Callable[..., CheckResult])


def _never_raises(name: str) -> Callable[[_F], _F]:
    """An exception nobody foresaw is a FAIL with its text, never a crashed self-test."""

    def wrap(check: _F) -> _F:
        @functools.wraps(check)
        def guarded(*args: Any, **kwargs: Any) -> CheckResult:
            try:
                return check(*args, **kwargs)
            except Exception as exc:
                return CheckResult(name, False, f"the check itself failed: "
                                   f"{type(exc).__name__}: {exc}",
                                   "report this with the device log; the part is untested")
        return guarded  # type: ignore[return-value]

    return wrap


def _bounded(name: str, timeout_s: float, work: Callable[[], CheckResult], fix: str,
             what: str) -> CheckResult:
    """Run `work` in a daemon thread; a hung driver (camera, dying SD card) becomes a FAIL.

    The thread is left behind if it hangs: nothing can interrupt a blocked driver call."""
    box: list[CheckResult] = []

    def target() -> None:
        try:
            box.append(work())
        except Exception as exc:
            box.append(CheckResult(name, False, f"{what} failed: {type(exc).__name__}: {exc}",
                                   fix))

    thread = threading.Thread(target=target, name=f"selftest-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if box:
        return box[0]
    return CheckResult(name, False, f"{what} did not answer within {timeout_s:g} s", fix)


def _pin_label(pin: int | str) -> str:
    return f"GPIO{pin}" if isinstance(pin, int) else str(pin)


# -- camera ----------------------------------------------------------------------------------------


class CameraNotFound(RuntimeError):
    """libcamera lists no camera at all."""


@_never_raises("camera")
def check_camera(probe: Callable[[], int], *, timeout_s: float = 10.0,
                 min_frames: int = 1) -> CheckResult:
    """`probe()` returns how many frames the camera delivered; 0, an error or a hang FAIL."""

    def work() -> CheckResult:
        try:
            frames = probe()
        except ImportError as exc:
            return CheckResult("camera", False, f"camera software missing: {exc}",
                               "install python3-picamera2 (apt) and make the venv with "
                               "--system-site-packages")
        except CameraNotFound as exc:
            return CheckResult("camera", False, f"no camera detected: {exc}", CAMERA_FIX)
        if frames < min_frames:
            return CheckResult("camera", False, f"the camera delivered {frames} frame(s), "
                               f"{min_frames} expected", CAMERA_FIX)
        return CheckResult("camera", True, f"{frames} frames received")

    return _bounded("camera", timeout_s, work, CAMERA_FIX, "the camera")


def picamera2_probe(frames: int = 5, *, camera_num: int = 0) -> int:
    """Start the Pi camera and count `frames` frames (blocks per frame; check_camera bounds it).

    picamera2 is imported here, not at the top: it cannot be imported off the Pi
    (docs/FIELD-NOTES.md).
    """
    from picamera2 import Picamera2  # lazy on purpose

    if not Picamera2.global_camera_info():
        raise CameraNotFound("libcamera lists no camera")
    camera = Picamera2(camera_num)
    try:
        camera.configure(camera.create_video_configuration(main={"size": (640, 480)}))
        camera.start()
        received = 0
        for _ in range(frames):
            camera.capture_metadata()  # returns once the next frame has arrived
            received += 1
        return received
    finally:
        with contextlib.suppress(Exception):
            camera.stop()
        with contextlib.suppress(Exception):
            camera.close()


# -- GPS -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpsProbe:
    """The gps check's result plus the newest fix it decoded (the clock check compares to it)."""

    result: CheckResult
    fix: Fix | None = None


def check_gps(port: str | None, baudrate: int = 9600, **kwargs: Any) -> CheckResult:
    """Does `port` deliver valid NMEA? See probe_gps (which also returns the newest fix)."""
    return probe_gps(port, baudrate, **kwargs).result


def probe_gps(
    port: str | None,
    baudrate: int = 9600,
    *,
    timeout_s: float = 5.0,
    min_sentences: int = 3,
    max_sentences: int = 20,
    serial_factory: Callable[..., Any] = serial.Serial,
    clock: Callable[[], float] = time.monotonic,
    surveyed: dict[str, float] | None = None,
) -> GpsProbe:
    """Open the port and count sentences the NmeaDecoder accepts as NMEA (checksums enforced).

    Stops early after `min_sentences` with a dated fix, or `max_sentences` without one (a receiver
    indoors has no fix: valid NMEA is what this check proves). A missing port, a silent port and a
    port delivering only garbage each FAIL with their own message.
    """
    if port is None:
        where = (f" ({surveyed['lat']:.5f},{surveyed['lon']:.5f})" if surveyed else "")
        return GpsProbe(CheckResult("gps", True, "no receiver fitted; surveyed position "
                                    f"configured{where}", skipped=True))
    try:
        return _read_gps(port, baudrate, timeout_s, min_sentences, max_sentences,
                         serial_factory, clock)
    except Exception as exc:
        return GpsProbe(CheckResult("gps", False, f"the check itself failed: "
                                    f"{type(exc).__name__}: {exc}",
                                    "report this with the device log; the GPS is untested"))


def _open_failure(port: str, exc: BaseException) -> CheckResult:
    code = getattr(exc, "errno", None)
    if code == errno.ENOENT or "No such file" in str(exc):
        return CheckResult("gps", False, f"port {port} does not exist",
                           "for the Pi's UART set enable_uart=1 in /boot/firmware/config.txt and "
                           "reboot; for a USB receiver check its cable (ls /dev/ttyUSB* "
                           "/dev/ttyACM*) and gps.port")
    if code in (errno.EACCES, errno.EPERM):
        return CheckResult("gps", False, f"no permission to open {port}",
                           "add the service user to the 'dialout' group")
    if code in (errno.EAGAIN, errno.EWOULDBLOCK) or "exclusively lock" in str(exc):
        # pyserial's flock for exclusive=True: another exclusive reader, i.e. sos-device's own
        return CheckResult("gps", False, f"GPS port {port} busy: the sos-device service holds "
                           "it", GPS_BUSY_FIX)
    if code == errno.EBUSY or "busy" in str(exc).lower() or "lock" in str(exc).lower():
        return CheckResult("gps", False, f"port {port} is in use by another program",
                           "stop what holds it (sos-device, gpsd, or the serial console: remove "
                           "console=serial0 from /boot/firmware/cmdline.txt)")
    return CheckResult("gps", False, f"cannot open {port}: {exc}",
                       "check gps.port and that the receiver is connected")


def _read_gps(port: str, baudrate: int, timeout_s: float, min_sentences: int,
              max_sentences: int, serial_factory: Callable[..., Any],
              clock: Callable[[], float]) -> GpsProbe:
    start = clock()
    try:
        # exclusive: a second reader would split the bytes with the running service's reader
        ser = serial_factory(port=port, baudrate=baudrate, timeout=min(0.1, timeout_s),
                             exclusive=True)
    except (serial.SerialException, OSError, ValueError) as exc:
        return GpsProbe(_open_failure(port, exc))
    decoder = NmeaDecoder()
    received, fix, first = 0, None, True
    try:
        while clock() - start < timeout_s:
            data = ser.read(getattr(ser, "in_waiting", 0) or 1)
            if not data:
                continue
            received += len(data)
            if first:  # opened mid-sentence? drop the fragment up to the first line end
                data, first = _drop_fragment(data)
            for new in decoder.feed(data, clock()):
                fix = new
            valid = _valid_sentences(decoder)
            if valid >= max_sentences or (valid >= min_sentences and fix and fix.time):
                break
    except (serial.SerialException, OSError) as exc:
        return GpsProbe(CheckResult("gps", False, f"port {port} failed while reading: {exc}",
                                    "a loose USB cable or a UART driver reset: check the "
                                    "connection"), fix)
    finally:
        with contextlib.suppress(Exception):
            ser.close()
    return GpsProbe(_judge_gps(port, baudrate, clock() - start, received, decoder, fix), fix)


def _drop_fragment(data: bytes) -> tuple[bytes, bool]:
    """(what to decode, still looking for the first line start)."""
    if data[:1] in (b"$", b"!"):
        return data, False
    cuts = [i for i in (data.find(b"\r"), data.find(b"\n")) if i >= 0]
    if not cuts:
        return b"", True
    return data[min(cuts) + 1 :], False


def _valid_sentences(decoder: NmeaDecoder) -> int:
    """Sentences with a good checksum that parsed, used or not (GSV, a void fix: still NMEA)."""
    return decoder.accepted + sum(n for reason, n in decoder.counters.items()
                                  if reason not in GARBAGE_REASONS)


def _judge_gps(port: str, baudrate: int, elapsed: float, received: int, decoder: NmeaDecoder,
               fix: Fix | None) -> CheckResult:
    valid = _valid_sentences(decoder)
    damaged = sum(n for reason, n in decoder.counters.items() if reason in GARBAGE_REASONS)
    if received == 0:
        return CheckResult("gps", False, f"no NMEA on {port} in {elapsed:.0f} s (no data at all)",
                           GPS_SILENT_FIX)
    if valid == 0:
        return CheckResult("gps", False, f"port delivers data but no valid NMEA: wrong baud rate? "
                           f"({received} bytes at {baudrate} baud on {port}, {damaged} rejected)",
                           "set gps.baudrate to the receiver's rate (most send 9600, some 38400 "
                           "or 115200)")
    where = (f"fix {fix.lat:.5f},{fix.lon:.5f}" if fix
             else "no position fix yet (normal indoors or on a cold start)")
    damage = f", {damaged} damaged" if damaged else ""
    return CheckResult("gps", True, f"{port}: {valid} valid NMEA sentences in {elapsed:.1f} s"
                       f"{damage}; {where}")


def gps_time_now(fix: Fix | None, now_mono: float) -> datetime | None:
    """The receiver's UTC time now: the fix's time plus how long ago it arrived."""
    if fix is None or fix.time is None:
        return None
    return fix.time + timedelta(seconds=now_mono - fix.received_at)


# -- button and LED ----------------------------------------------------------------------------


@_never_raises("button")
def check_button(
    pin: int | str,
    *,
    pull_up: bool = True,
    pin_factory: Any = None,
    button: Any = None,
    samples: int = 5,
    interval_s: float = 0.01,
    sleep: Callable[[float], None] = time.sleep,
) -> CheckResult:
    """The SOS button input reads released and steady (with its pull resistor: not stuck).

    `button`: an already claimed gpiozero Button (the runtime's); otherwise the pin is claimed
    here through `pin_factory` and released again.
    """
    label = _pin_label(pin)
    owned = None
    if button is None:
        from gpiozero import Button

        try:
            owned = button = Button(pin, pull_up=pull_up, bounce_time=None,
                                    pin_factory=pin_factory)
        except Exception as exc:
            return CheckResult("button", False, f"cannot use {label}: {exc}", PINS_BUSY_FIX)
    try:
        reads = []
        for i in range(samples):
            if i:
                sleep(interval_s)
            reads.append(bool(button.is_pressed))
    finally:
        if owned is not None:
            owned.close()
    span = f"{samples} reads over {(samples - 1) * interval_s * 1000:.0f} ms"
    if all(reads):
        return CheckResult("button", False, f"{label} reads pressed continuously: stuck or "
                           f"shorted ({span})",
                           f"free a jammed button, or find the short between {label} and "
                           f"{'GND' if pull_up else '3V3'}; no SOS can be recognised while it "
                           "reads pressed")
    if any(reads):
        return CheckResult("button", False, f"{label} flickers between pressed and released "
                           f"({span}): a loose wire, or someone pressed it during the test",
                           "run again without touching the button; if it persists, re-seat "
                           "the button's connector")
    return CheckResult("button", True, f"{label} reads released, not stuck ({span}); a press is "
                       "not part of this test")


@_never_raises("led")
def check_led(
    led_pin: int | str,
    *,
    led_sense_pin: int | str | None = None,
    pin_factory: Any = None,
    led: Any = None,
    cycles: int = 2,
    settle_s: float = 0.005,
    show_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> CheckResult:
    """Drive the LED and, where the board has a sense line, check that it follows.

    An output cannot be read back, so only a board with a sense input (wired to see the LED lit,
    active high, pulled down) proves the LED is connected; without one the LED is lit for `show_s`
    and a person must look. `led`: an already claimed gpiozero LED (the runtime's); it is left off.
    """
    label = _pin_label(led_pin)
    owned: list[Any] = []
    try:
        from gpiozero import LED, DigitalInputDevice

        try:
            sense = None
            if led_sense_pin is not None:
                sense = DigitalInputDevice(led_sense_pin, pull_up=False, pin_factory=pin_factory)
                owned.append(sense)
            if led is None:
                led = LED(led_pin, pin_factory=pin_factory)
                owned.append(led)
        except Exception as exc:
            return CheckResult("led", False, f"cannot use {label}: {exc}", PINS_BUSY_FIX)
        if sense is None:
            led.on()
            sleep(show_s)
            led.off()
            return CheckResult("led", True, f"{label} driven on for {show_s:g} s; no sense line "
                               "on this board, confirm visually")
        lit, dark = [], []
        for _ in range(cycles):
            led.on()
            sleep(settle_s)
            lit.append(bool(sense.value))
            led.off()
            sleep(settle_s)
            dark.append(bool(sense.value))
    finally:
        for device in reversed(owned):
            with contextlib.suppress(Exception):
                device.close()
    return _judge_led(label, _pin_label(led_sense_pin), lit, dark)


def _judge_led(label: str, sense: str, lit: list[bool], dark: list[bool]) -> CheckResult:
    if any(dark):
        return CheckResult("led", False, f"sense line {sense} reads lit while the LED on {label} "
                           "is off: sense line shorted, or the LED wired to a supply rail",
                           f"check the wiring of the LED and of its sense line {sense}")
    if not any(lit):
        return CheckResult("led", False, f"LED on {label} driven, but the sense line {sense} "
                           "never saw it lit: LED unplugged, open wire or burnt out",
                           "check the LED's connector and series resistor; replace the LED")
    if not all(lit):
        return CheckResult("led", False, f"the sense line {sense} follows the LED on {label} "
                           f"only {sum(lit)} of {len(lit)} times: a loose contact",
                           "re-seat the LED's connector")
    return CheckResult("led", True, f"sense line {sense} follows the LED on {label} "
                       f"({len(lit)} on/off cycles)")


# -- storage -----------------------------------------------------------------------------------


@_never_raises("storage")
def check_storage(data_dir: str | Path, *, min_free_mb: float = DEFAULT_MIN_FREE_MB,
                  probe_bytes: int = 64 * 1024, timeout_s: float = 10.0) -> CheckResult:
    """Write, fsync, read back and remove a probe file in `data_dir`; then check free space."""
    path = Path(data_dir)
    return _bounded("storage", timeout_s, lambda: _probe_storage(path, min_free_mb, probe_bytes),
                    f"check the SD card (dmesg) and that {path} is a writable directory",
                    f"writing to {path}")


def _storage_fix(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"free space on the partition of {path}"
    if exc.errno == errno.EROFS:
        return ("the filesystem is read-only (a failing SD card is remounted read-only): check "
                "dmesg and replace the card")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"give sos-device's user write access to {path} (chown)"
    return (f"make {path} a writable directory on the data partition (device.data_dir): is the "
            "partition mounted? check dmesg for SD card errors")


def _probe_storage(path: Path, min_free_mb: float, probe_bytes: int) -> CheckResult:
    probe = path / f".selftest-{os.getpid()}.probe"
    data = os.urandom(probe_bytes)
    try:
        path.mkdir(parents=True, exist_ok=True)  # as the runtime's outbox does
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        back = probe.read_bytes()
        stat = os.statvfs(path)
    except OSError as exc:
        return CheckResult("storage", False, f"cannot write to {path}: "
                           f"{exc.strerror or exc}", _storage_fix(path, exc))
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if back != data:
        return CheckResult("storage", False, f"{path}: the probe file read back different bytes",
                           "the card corrupts data: replace it")
    free_mb = stat.f_bavail * stat.f_frsize / 1e6
    if free_mb < min_free_mb:
        return CheckResult("storage", False, f"{path}: only {free_mb:.0f} MB free, "
                           f"{min_free_mb:g} MB needed",
                           f"free space on the partition of {path} (old logs, uploaded clips) "
                           "or fit a larger card")
    return CheckResult("storage", True, f"{path}: wrote, synced and read back "
                       f"{probe_bytes // 1024} KiB; {free_mb:.0f} MB free")


# -- clock -------------------------------------------------------------------------------------


@_never_raises("clock")
def check_clock(now_utc: datetime, *, gps_time: datetime | None = None, min_year: int = 2025,
                max_year: int = 2099, max_skew_s: float = DEFAULT_MAX_SKEW_S) -> CheckResult:
    """The system clock is set (a plausible year) and agrees with GPS time when there is one.

    TLS certificate checks and every alert's time depend on it; a Pi has no RTC by default and
    starts from 1970 or its last shutdown until NTP answers."""
    now = now_utc if now_utc.tzinfo else now_utc.replace(tzinfo=UTC)
    shown = utc_iso(now)
    gps_text = f"; GPS says {utc_iso(gps_time)}" if gps_time else ""
    if not min_year <= now.year <= max_year:
        return CheckResult("clock", False, f"system clock says {shown}: not set{gps_text}",
                           "check network time (`timedatectl status` must say 'System clock "
                           "synchronized: yes') or the RTC battery")
    if gps_time is None:
        return CheckResult("clock", True, f"{shown}; no GPS time to compare (year check only)")
    skew = (now - gps_time).total_seconds()
    if abs(skew) > max_skew_s:
        return CheckResult("clock", False, f"system clock is {skew:+.1f} s off GPS time "
                           f"(limit {max_skew_s:g} s): {shown}{gps_text}",
                           "check network time (`timedatectl timesync-status`); alert times are "
                           "off by as much")
    return CheckResult("clock", True, f"{shown}, {skew:+.2f} s from GPS time")


# -- broker ------------------------------------------------------------------------------------


@_never_raises("broker")
def check_broker(broker: BrokerConfig, client_id: str, *, timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> CheckResult:
    """MQTT 5 connect with the device's certificate; PASS on a successful CONNACK.

    For `sos-device selftest` with the device service stopped: the broker makes every client id
    the certificate's name (docs/FLASHING.md), so this connection would take over, and with its
    clean start discard, the running device's session. The running device judges its own link
    instead (`broker_probe` of run_selftest).
    """
    target = f"{broker.host}:{broker.port}"
    missing = _missing_files(broker)
    if missing:
        return CheckResult("broker", False, f"{missing}: file not found",
                           "install this device's certificate, key and the fleet CA "
                           "(see docs/FLASHING.md)")
    client = make_client(client_id, broker)
    client.connect_timeout = timeout_s
    outcome: dict[str, Any] = {}
    client.on_connect = lambda c, u, f, rc, p: outcome.setdefault("connack", rc)
    client.on_disconnect = lambda c, u, f, rc, p: outcome.setdefault("closed", rc)
    started = clock()
    try:
        client.connect(broker.host, broker.port, keepalive=max(5, int(timeout_s) + 5),
                       clean_start=True)
    except OSError as exc:
        return _connect_failure(target, broker, exc, timeout_s)
    try:
        while not outcome and clock() - started < timeout_s:
            if client.loop(0.05) != 0 and not outcome:
                outcome["closed"] = "connection lost"
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
    return _judge_broker(target, broker, client_id, outcome, clock() - started, timeout_s)


def _missing_files(broker: BrokerConfig) -> str | None:
    for key, name in (("ca_file", broker.ca_file), ("cert_file", broker.cert_file),
                      ("key_file", broker.key_file)):
        if name and not Path(name).is_file():
            return f"broker.{key} {name}"
    return None


def _connect_failure(target: str, broker: BrokerConfig, exc: OSError,
                     timeout_s: float) -> CheckResult:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CheckResult("broker", False, f"{target}: the broker's certificate did not verify "
                           f"({exc.verify_message})",
                           "broker.ca_file must be the fleet CA, and broker.host the name in the "
                           "broker's certificate; check the clock too")
    if isinstance(exc, ssl.SSLError):
        return CheckResult("broker", False, f"{target}: TLS handshake refused "
                           f"({exc.reason or exc})", _cert_fix(broker))
    if isinstance(exc, socket.gaierror):
        return CheckResult("broker", False, f"cannot resolve {broker.host}: {exc.strerror}",
                           "check broker.host and the device's DNS / network")
    if isinstance(exc, TimeoutError):
        return CheckResult("broker", False, f"no answer from {target} within {timeout_s:g} s",
                           f"is the broker running / reachable at {target}? (network, firewall)")
    return CheckResult("broker", False, f"cannot reach {target}: {exc.strerror or exc}",
                       f"is the broker running / reachable at {target}?")


def _cert_fix(broker: BrokerConfig) -> str:
    if not broker.cert_file:
        return ("no client certificate configured: set broker.cert_file and broker.key_file "
                "(see docs/FLASHING.md)")
    return CERT_REFUSED_FIX


def _judge_broker(target: str, broker: BrokerConfig, client_id: str, outcome: dict[str, Any],
                  elapsed: float, timeout_s: float) -> CheckResult:
    connack = outcome.get("connack")
    if connack is not None and not connack.is_failure:
        return CheckResult("broker", True, f"{target} accepted {_cert_name(broker)} "
                           f"(client id {client_id}) in {elapsed * 1000:.0f} ms")
    if connack is not None:
        fix = (_cert_fix(broker) if connack.value in (134, 135, 138)
               else f"see the broker's log for {client_id}")
        return CheckResult("broker", False, f"{target} refused the connection: {connack} "
                           f"(CONNACK {connack.value})", fix)
    if "closed" in outcome:
        return CheckResult("broker", False, f"{target} closed the connection before accepting "
                           f"it ({outcome['closed']})", _cert_fix(broker))
    return CheckResult("broker", False, f"{target}: connected, but no CONNACK within "
                       f"{timeout_s:g} s", f"is {target} the broker's MQTT (TLS) port?")


def _cert_name(broker: BrokerConfig) -> str:
    """`certificate CN=... (valid until ...)`, or what is known when it cannot be read."""
    if not broker.cert_file:
        return "this device without a client certificate"
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = x509.load_pem_x509_certificate(Path(broker.cert_file).read_bytes())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = names[0].value if names else "?"
        return f"certificate CN={cn} (valid until {cert.not_valid_after_utc:%Y-%m-%d})"
    except Exception:
        return f"certificate {broker.cert_file}"


# -- all checks --------------------------------------------------------------------------------


def run_selftest(
    config: DeviceConfig,
    *,
    pin_factory: Any = None,
    camera_probe: Callable[[], int] = picamera2_probe,
    led_sense_pin: int | str | None = None,
    utc_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    clock: Callable[[], float] = time.monotonic,
    serial_factory: Callable[..., Any] = serial.Serial,
    sleep: Callable[[float], None] = time.sleep,
    limits: SelftestLimits = SelftestLimits(),  # frozen: safe to share
    button: Any = None,
    led: Any = None,
    gps_probe: Callable[[], GpsProbe] | None = None,
    broker_probe: Callable[[], CheckResult] | None = None,
) -> list[CheckResult]:
    """Every check in CHECKS order.

    Run in-process by the runtime, the parts are already in use: pass its gpiozero `button` and
    `led`, a `gps_probe` judging its GpsReader's data (the reader holds the port exclusively; a
    second open would fail, and without the lock would split the bytes between two readers), and a
    `broker_probe` judging its own MQTT link (a second connection as this device would take the
    device's session over).
    """
    results = [check_camera(camera_probe, timeout_s=limits.camera_timeout_s)]
    gps = gps_probe() if gps_probe is not None else probe_gps(
        config.gps.port, config.gps.baudrate, timeout_s=limits.gps_timeout_s,
        serial_factory=serial_factory, clock=clock, surveyed=config.gps.surveyed)
    results.append(gps.result)
    results.append(check_button(config.button.pin, pull_up=config.button.pull_up,
                                pin_factory=pin_factory, button=button, sleep=sleep))
    results.append(check_led(config.feedback.led_pin, led_sense_pin=led_sense_pin,
                             pin_factory=pin_factory, led=led, show_s=limits.led_show_s,
                             sleep=sleep))
    results.append(check_storage(config.data_dir, min_free_mb=limits.min_free_mb,
                                 timeout_s=limits.storage_timeout_s))
    results.append(check_clock(utc_clock(), gps_time=gps_time_now(gps.fix, clock()),
                               max_skew_s=limits.max_clock_skew_s))
    results.append(broker_probe() if broker_probe is not None else check_broker(
        config.broker, f"{config.device_id}-selftest", timeout_s=limits.broker_timeout_s,
        clock=clock))
    return results


def print_results(results: list[CheckResult], write: Callable[[str], Any] = print) -> int:
    """One line per check; the exit status: 0 when all passed, 1 otherwise."""
    for result in results:
        write(format_line(result))
    return 0 if all(r.ok for r in results) else 1


# -- schedule ----------------------------------------------------------------------------------


class SelftestSchedule:
    """When the next self-test is due, on the monotonic clock. Pure: the runtime asks `due(now)`
    and calls `done(now)` after each run. Due at once after start-up (a pillar that was powered
    off or serviced tests itself first), then every `interval_s`: 24 h for a pillar by default,
    never more than 72 h (EN 81-28: an automatic test at least every 3 days)."""

    def __init__(self, interval_s: float = PILLAR_INTERVAL_S) -> None:
        if not 0 < interval_s <= MAX_INTERVAL_S:
            raise ValueError(f"self-test interval {interval_s:g} s: must be > 0 and at most "
                             f"{MAX_INTERVAL_S:g} s (EN 81-28: at least every 3 days)")
        self.interval_s = interval_s
        self._next: float | None = None

    @property
    def next_due(self) -> float | None:
        """Monotonic time of the next test; None: due now (never run)."""
        return self._next

    def due(self, now_mono: float) -> bool:
        return self._next is None or now_mono >= self._next

    def done(self, now_mono: float) -> None:
        self._next = now_mono + self.interval_s
