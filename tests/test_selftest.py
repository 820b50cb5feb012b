"""`sos-device selftest`: the virtual board passes; each unplugged part fails its own check, and
only that one, with its own message; each check's failure messages are distinct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest
import serial
from gpiozero import LED, Button
from gpiozero.pins.mock import MockConnectedPin, MockFactory, MockPin

from control_center.fleet import Fleet
from firmware.gps.fix import Fix
from firmware.gps.reader import GpsReader
from firmware.selftest import (
    CHECKS,
    MAX_INTERVAL_S,
    PILLAR_INTERVAL_S,
    CheckResult,
    SelftestSchedule,
    check_broker,
    check_button,
    check_camera,
    check_clock,
    check_gps,
    check_led,
    check_storage,
    format_line,
    gps_time_now,
    picamera2_probe,
    summary,
)
from protocol.mqtt import BrokerConfig
from simulator.broker import PrivateBroker, free_port
from simulator.cli import main as sim_main
from simulator.device_config import render_device_toml
from simulator.gps_receiver import PtyGps, RouteReceiver, nmea_sentence
from simulator.selftest import UNPLUGGABLE, ShortedToGroundPin, run_virtual_selftest

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)
NO_SLEEP = lambda s: None  # noqa: E731 - MockPins change at once: nothing to wait for


def failed(results: list[CheckResult]) -> list[str]:
    return [r.name for r in results if not r.ok]


# -- the virtual board (the acceptance) ----------------------------------------------------


def test_the_virtual_token_passes_every_check_in_order() -> None:
    results = run_virtual_selftest()
    assert [r.name for r in results] == list(CHECKS)
    assert failed(results) == [], "\n".join(map(format_line, results))
    gps, clock = results[1], results[5]
    assert "valid NMEA sentences" in gps.detail and "fix 52.3" in gps.detail
    assert "from GPS time" in clock.detail  # the clock was compared with the receiver's time


def test_the_virtual_pillar_passes_and_says_it_has_no_gps_receiver() -> None:
    results = {r.name: r for r in run_virtual_selftest(kind="pillar")}
    assert failed(list(results.values())) == []
    assert results["gps"].skipped and "surveyed position configured" in results["gps"].detail
    assert format_line(results["gps"]).startswith("SKIP gps ")


# What each unplugged part must say (detail) and what it must tell the technician to do (fix).
UNPLUGGED = {
    "camera": ("delivered 0 frame(s)", "rpicam-hello --list-cameras"),
    "gps": ("no NMEA on /dev/", "TX wire to the Pi's RX (GPIO15)"),
    "button": ("reads pressed continuously: stuck or shorted", "short between GPIO17 and GND"),
    "led": ("never saw it lit: LED unplugged", "LED's connector"),
    "storage": ("cannot write to", "is the partition mounted?"),
    "clock": ("system clock says 1970-01-01", "timedatectl status"),
    "broker": ("closed the connection before accepting it", "not revoked"),
}


@pytest.mark.parametrize("part", UNPLUGGABLE)
def test_an_unplugged_part_fails_its_own_check_and_no_other(part: str) -> None:
    results = {r.name: r for r in run_virtual_selftest(unplugged={part})}
    assert failed(list(results.values())) == [part], "\n".join(map(format_line, results.values()))
    detail, fix = UNPLUGGED[part]
    assert detail in results[part].detail
    assert results[part].fix and fix in results[part].fix
    others = [r.detail + (r.fix or "") for r in results.values() if r.name != part]
    assert not any(detail in text for text in others)


def test_sos_sim_selftest_prints_a_line_per_check_and_exits_like_sos_device(capsys) -> None:
    assert sim_main(["selftest", "--unplug", "led", "camera"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "virtual token tok-sim-selftest, unplugged: camera, led"
    assert [line[:4] for line in lines[1:]] == ["FAIL", "PASS", "PASS", "FAIL", "PASS", "PASS",
                                               "PASS"]
    assert lines[1].startswith("FAIL camera ") and " -- fix: " in lines[1]
    assert sim_main(["selftest", "--kind", "pillar", "--unplug", "gps"]) == 2
    assert "no GPS receiver" in capsys.readouterr().err


def test_sos_device_selftest_on_a_board_whose_parts_are_missing(tmp_path: Path) -> None:
    """The real command: gpiozero's mock pins (no sense line), no picamera2 off the Pi, a GPS
    port that does not exist and a broker that is not running."""
    broker = PrivateBroker(tmp_path / "broker")  # never started
    config = tmp_path / "device.toml"
    config.write_text(render_device_toml(device_id="tok-cli-001", profile="token",
                                         data_dir=tmp_path / "data", broker=broker,
                                         gps_port=str(tmp_path / "ttyNONE")))
    env = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock"}
    done = subprocess.run([sys.executable, "-m", "firmware.cli", "--config", str(config),
                           "selftest"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert list(lines) == list(CHECKS)
    assert lines["camera"].startswith("FAIL") and "picamera2" in lines["camera"]
    assert lines["gps"].startswith("FAIL") and "does not exist" in lines["gps"]
    assert lines["led"].startswith("PASS") and "confirm visually" in lines["led"]
    assert lines["broker"].startswith("FAIL") and "is the broker running" in lines["broker"]
    for name in ("button", "storage", "clock"):
        assert lines[name].startswith("PASS"), lines[name]


# -- gps ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeSerial:
    """Hands out `chunks` one per read; an empty read costs the read timeout on `clock`."""

    in_waiting = 0

    def __init__(self, chunks: list[bytes | Exception], clock: FakeClock, **kwargs) -> None:
        self.chunks, self.clock, self.kwargs = list(chunks), clock, kwargs
        self.closed = False

    def read(self, n: int) -> bytes:
        self.clock.t += 0.1
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if isinstance(chunk, Exception):
            raise chunk
        return chunk

    def close(self) -> None:
        self.closed = True


def gps_check(chunks: list[bytes | Exception], **kwargs) -> CheckResult:
    clock = FakeClock()
    opened: list[FakeSerial] = []

    def factory(**kw) -> FakeSerial:
        opened.append(FakeSerial(chunks, clock, **kw))
        return opened[-1]

    result = check_gps("/dev/serial0", 9600, timeout_s=5.0, serial_factory=factory, clock=clock,
                       **kwargs)
    assert all(s.closed for s in opened)
    return result


FIX_EPOCH = (nmea_sentence("GPRMC,100000.00,A,5222.7328,N,00454.0180,E,0.0,0.0,231126,,,A")
             + nmea_sentence("GPGGA,100000.00,5222.7328,N,00454.0180,E,1,08,1.0,1.2,M,47.0,M,,")
             + nmea_sentence("GPGSA,A,3,01,02,03,04,05,06,07,08,,,,,1.6,1.0,1.3")).encode()
VOID_EPOCH = (nmea_sentence("GPRMC,100001.00,V,,,,,,,231126,,,N")
              + nmea_sentence("GPGGA,100001.00,,,,,0,00,99.99,,,,,,")).encode()


def test_gps_passes_on_valid_nmea_and_stops_as_soon_as_it_has_a_dated_fix() -> None:
    result = gps_check([b"4.0180,E*3C\r\n" + FIX_EPOCH, FIX_EPOCH])  # opened mid-sentence
    assert result.ok
    assert "/dev/serial0: 3 valid NMEA sentences in 0.1 s" in result.detail
    assert "fix 52.37888,4.90030" in result.detail


def test_gps_passes_without_a_fix_because_valid_nmea_is_what_it_proves() -> None:
    result = gps_check([VOID_EPOCH])
    assert result.ok and "no position fix yet" in result.detail
    assert "2 valid NMEA sentences in 5." in result.detail  # waited for a fix until the timeout


def test_a_gps_port_that_does_not_exist_is_not_a_silent_one(tmp_path: Path) -> None:
    missing = check_gps(str(tmp_path / "ttyNONE"), 9600, timeout_s=1.0)
    assert not missing.ok and missing.detail == f"port {tmp_path / 'ttyNONE'} does not exist"
    assert "enable_uart=1" in missing.fix

    silent = gps_check([])
    assert not silent.ok
    assert silent.detail == "no NMEA on /dev/serial0 in 5 s (no data at all)"
    assert "TX wire to the Pi's RX (GPIO15)" in silent.fix


def test_garbage_alone_is_a_wrong_baud_rate_not_nmea() -> None:
    rng = __import__("random").Random(3)
    noise = [bytes(rng.randrange(256) for _ in range(200)) + b"\r\n" for _ in range(5)]
    bad_checksum = FIX_EPOCH.replace(b"*", b"*Z")  # NMEA-shaped, checksums broken
    result = gps_check([*noise, bad_checksum])
    assert not result.ok
    assert result.detail.startswith("port delivers data but no valid NMEA: wrong baud rate?")
    assert "gps.baudrate" in result.fix


def test_damaged_sentences_beside_valid_ones_are_counted_but_pass() -> None:
    damaged = FIX_EPOCH.replace(b"*", b"*F", 1)  # first sentence's checksum broken
    result = gps_check([damaged, FIX_EPOCH])
    assert result.ok and "damaged" in result.detail


def test_a_gps_port_failing_while_read_says_so() -> None:
    result = gps_check([b"$GP", serial.SerialException("device reports readiness to read but "
                                                        "returned no data")])
    assert not result.ok and "failed while reading" in result.detail


def test_an_unexpected_error_in_a_check_is_a_fail_with_its_text() -> None:
    def broken(**kw):
        raise RuntimeError("driver bug")

    result = check_gps("/dev/serial0", 9600, timeout_s=1.0, serial_factory=broken)
    assert not result.ok and "RuntimeError: driver bug" in result.detail


def test_the_gps_check_opens_the_port_exclusively() -> None:
    asked: list[dict] = []

    def factory(**kw):
        asked.append(kw)
        raise serial.SerialException(2, "could not open port /dev/sos-gps: No such file")

    check_gps("/dev/sos-gps", 9600, timeout_s=1.0, serial_factory=factory)
    assert asked[0]["exclusive"] is True


def test_a_selftest_beside_the_running_service_says_the_port_is_busy_in_one_line() -> None:
    """The service's GpsReader holds the port: the standalone check is refused the port (it
    would otherwise split the bytes with the service) and says so in one line, no traceback."""
    route = RouteReceiver([(52.37, 4.89), (52.38, 4.90)], start_utc=NOW, seed=1,
                          speed_mps=10.0)
    receiver = PtyGps(route, speed=20.0)
    service = GpsReader(receiver.port)
    receiver.start()
    service.start()
    try:
        assert service.connected.wait(5.0)
        result = check_gps(receiver.port, 9600, timeout_s=1.0)
    finally:
        service.stop()
        receiver.stop()
    assert format_line(result) == (
        f"FAIL gps      GPS port {receiver.port} busy: the sos-device service holds it -- fix: "
        "stop it first (`systemctl stop sos-device`); a pillar's scheduled self-test runs "
        "inside the service and judges the service's own GPS reader")


def test_gps_time_now_adds_the_age_of_the_fix() -> None:
    fix = Fix(NOW, 52.0, 4.0, None, None, None, 1, 3, 8, 1.0, received_at=10.0)
    assert gps_time_now(fix, 12.5) == NOW + timedelta(seconds=2.5)
    assert gps_time_now(None, 12.5) is None


# -- button and LED ----------------------------------------------------------------------------


def test_a_released_button_passes_and_its_pin_is_released_again() -> None:
    factory = MockFactory()
    result = check_button(17, pin_factory=factory, sleep=NO_SLEEP)
    assert result.ok and "GPIO17 reads released" in result.detail
    Button(17, pin_factory=factory).close()  # free again


def test_a_button_shorted_at_boot_fails_as_stuck() -> None:
    factory = MockFactory()
    factory.pin(17, pin_class=ShortedToGroundPin)
    result = check_button(17, pin_factory=factory, sleep=NO_SLEEP)
    assert not result.ok
    assert result.detail.startswith("GPIO17 reads pressed continuously: stuck or shorted")


def test_a_flickering_button_is_not_called_stuck() -> None:
    class Flickering:
        reads = iter([False, True, False, True, False])

        @property
        def is_pressed(self) -> bool:
            return next(self.reads)

    result = check_button(17, button=Flickering(), sleep=NO_SLEEP)
    assert not result.ok and "flickers between pressed and released" in result.detail


def test_a_pin_held_by_the_running_device_is_named_as_such() -> None:
    factory = MockFactory()
    with Button(17, pin_factory=factory):
        result = check_button(17, pin_factory=factory, sleep=NO_SLEEP)
    assert not result.ok and result.detail.startswith("cannot use GPIO17")
    assert "systemctl stop sos-device" in result.fix


class StuckHighPin(MockPin):
    def __init__(self, factory, info) -> None:
        super().__init__(factory, info)
        self._state = True

    def drive_low(self) -> None:
        pass


def led_board(sense_class: type[MockPin] | None) -> MockFactory:
    factory = MockFactory()
    if sense_class is MockConnectedPin:
        factory.pin(27, pin_class=MockConnectedPin, input_pin=factory.pin(24))
    elif sense_class is not None:
        factory.pin(24, pin_class=sense_class)
    return factory


def test_an_led_whose_sense_line_follows_passes_and_is_left_off() -> None:
    factory = led_board(MockConnectedPin)
    result = check_led(27, led_sense_pin=24, pin_factory=factory, sleep=NO_SLEEP)
    assert result.ok and "follows the LED on GPIO27 (2 on/off cycles)" in result.detail
    assert factory.pin(27).state is False
    LED(27, pin_factory=factory).close()  # released


def test_an_unplugged_led_and_a_shorted_sense_line_fail_differently() -> None:
    open_led = check_led(27, led_sense_pin=24, pin_factory=led_board(None), sleep=NO_SLEEP)
    assert not open_led.ok and "never saw it lit" in open_led.detail
    shorted = check_led(27, led_sense_pin=24, pin_factory=led_board(StuckHighPin),
                        sleep=NO_SLEEP)
    assert not shorted.ok and "reads lit while the LED on GPIO27 is off" in shorted.detail


def test_without_a_sense_line_the_led_is_lit_for_a_person_to_see() -> None:
    factory, slept = MockFactory(), []
    result = check_led(27, pin_factory=factory, show_s=0.5, sleep=slept.append)
    assert result.ok and result.detail.endswith("no sense line on this board, confirm visually")
    assert slept == [0.5]
    assert [s.state for s in factory.pin(27).states][-2:] == [True, False]


# -- storage -----------------------------------------------------------------------------------


def test_storage_writes_reads_back_and_leaves_nothing(tmp_path: Path) -> None:
    result = check_storage(tmp_path / "data", min_free_mb=1)
    assert result.ok and "wrote, synced and read back 64 KiB" in result.detail
    assert list((tmp_path / "data").iterdir()) == []


def test_storage_that_cannot_be_written_and_a_full_disk_fail_differently(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    blocked = check_storage(tmp_path / "file", min_free_mb=1)
    assert not blocked.ok and blocked.detail.startswith(f"cannot write to {tmp_path / 'file'}")
    full = check_storage(tmp_path, min_free_mb=1e12)
    assert not full.ok and "MB free, 1e+12 MB needed" in full.detail
    assert "free space" in full.fix


def test_a_storage_check_given_nonsense_fails_instead_of_raising() -> None:
    result = check_storage(None)  # type: ignore[arg-type]
    assert not result.ok and "the check itself failed: TypeError" in result.detail


# -- clock -------------------------------------------------------------------------------------


def test_clock_year_and_gps_skew() -> None:
    assert check_clock(NOW).ok
    assert "year check only" in check_clock(NOW).detail
    unset = check_clock(datetime(1970, 1, 1, 0, 3, tzinfo=UTC))
    assert not unset.ok and "not set" in unset.detail and "timedatectl" in unset.fix
    near = check_clock(NOW, gps_time=NOW - timedelta(seconds=0.4))
    assert near.ok and "+0.40 s from GPS time" in near.detail
    off = check_clock(NOW, gps_time=NOW - timedelta(seconds=30), max_skew_s=5)
    assert not off.ok and "+30.0 s off GPS time" in off.detail


# -- camera ------------------------------------------------------------------------------------


def test_camera_frames_none_an_error_and_a_hang() -> None:
    assert check_camera(lambda: 5).ok
    none = check_camera(lambda: 0)
    assert not none.ok and "rpicam-hello --list-cameras" in none.fix

    def busy() -> int:
        raise OSError("Device or resource busy")

    error = check_camera(busy)
    assert not error.ok and "Device or resource busy" in error.detail and "ribbon" in error.fix

    release = threading.Event()
    try:
        hang = check_camera(lambda: int(release.wait(10)), timeout_s=0.2)
    finally:
        release.set()
    assert not hang.ok and "did not answer within 0.2 s" in hang.detail


def test_picamera2_is_imported_only_when_probed(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)  # as off the Pi
    result = check_camera(picamera2_probe)
    assert not result.ok and "camera software missing" in result.detail


def test_the_picamera2_probe_counts_frames_and_closes_the_camera(monkeypatch) -> None:
    calls: list[str] = []

    class FakePicamera2:
        cameras: ClassVar[list[dict]] = [{"Model": "imx708"}]

        @classmethod
        def global_camera_info(cls):
            return cls.cameras

        def __init__(self, num: int) -> None:
            calls.append(f"open {num}")

        def create_video_configuration(self, **kw):
            return kw

        def configure(self, cfg) -> None:
            calls.append("configure")

        def start(self) -> None:
            calls.append("start")

        def capture_metadata(self) -> dict:
            calls.append("frame")
            return {}

        def stop(self) -> None:
            calls.append("stop")

        def close(self) -> None:
            calls.append("close")

    monkeypatch.setitem(sys.modules, "picamera2", types.SimpleNamespace(Picamera2=FakePicamera2))
    assert picamera2_probe(3) == 3
    assert calls == ["open 0", "configure", "start", "frame", "frame", "frame", "stop", "close"]
    FakePicamera2.cameras = []
    result = check_camera(picamera2_probe)
    assert not result.ok and result.detail.startswith("no camera detected")


# -- broker ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory) -> Iterator[PrivateBroker]:
    with PrivateBroker(tmp_path_factory.mktemp("selftest-broker")) as running:
        yield running


def test_the_broker_accepts_the_devices_certificate(fleet_broker) -> None:
    """Stand-alone (`sos-device selftest`, service stopped): the running device judges its own
    link instead, since the broker makes this connection the device itself."""
    identity = fleet_broker.identity("tok-st-001")
    result = check_broker(identity, "tok-st-001-selftest", timeout_s=3)
    assert result.ok, result.detail
    assert "accepted certificate CN=tok-st-001" in result.detail


def test_broker_failures_each_say_what_is_wrong(fleet_broker, tmp_path: Path) -> None:
    down = check_broker(BrokerConfig("127.0.0.1", free_port()), "tok-st-002-selftest",
                        timeout_s=2)
    assert not down.ok and "is the broker running / reachable at 127.0.0.1:" in down.fix

    anonymous = check_broker(fleet_broker.anonymous(), "tok-st-002-selftest", timeout_s=2)
    assert not anonymous.ok and "closed the connection before accepting it" in anonymous.detail
    assert anonymous.fix.startswith("no client certificate configured")

    other_ca = Fleet.create(tmp_path / "other").ca.cert_file
    identity = fleet_broker.identity("tok-st-002")
    stranger = check_broker(BrokerConfig(identity.host, identity.port, ca_file=str(other_ca),
                                         cert_file=identity.cert_file,
                                         key_file=identity.key_file),
                            "tok-st-002-selftest", timeout_s=2)
    assert not stranger.ok and "the broker's certificate did not verify" in stranger.detail

    gone = check_broker(BrokerConfig(identity.host, identity.port, ca_file=identity.ca_file,
                                     cert_file=str(tmp_path / "nope.pem"),
                                     key_file=identity.key_file), "tok-st-002-selftest")
    assert not gone.ok and gone.detail.endswith("nope.pem: file not found")


def test_a_revoked_certificate_is_named_as_the_cause(fleet_broker) -> None:
    identity = fleet_broker.identity("tok-st-003")
    fleet_broker.revoke("tok-st-003")  # restarts the broker with the new CRL
    result = check_broker(identity, "tok-st-003-selftest", timeout_s=3)
    assert not result.ok
    assert "not revoked? see docs/FLASHING.md" in result.fix


# -- results, summary, schedule ----------------------------------------------------------------


def test_lines_and_summary() -> None:
    results = [CheckResult("gps", True, "/dev/serial0: 12 valid NMEA sentences in 2.0 s"),
               CheckResult("led", False, "never saw it lit", "check the LED"),
               CheckResult("camera", True, "ignored fix", "not shown")]
    assert format_line(results[0]) == "PASS gps      /dev/serial0: 12 valid NMEA sentences in 2.0 s"
    assert format_line(results[1]) == "FAIL led      never saw it lit -- fix: check the LED"
    assert "not shown" not in format_line(results[2])
    report = summary(results, NOW)
    assert report == {"at": "2026-11-23T10:00:00.000Z", "ok": False, "failed": ["led"]}
    assert json.loads(json.dumps(report)) == report


def test_the_pillar_schedule_is_daily_and_never_beyond_three_days() -> None:
    schedule = SelftestSchedule()
    assert schedule.interval_s == PILLAR_INTERVAL_S == 24 * 3600
    assert schedule.due(5.0)  # at once after start-up
    schedule.done(5.0)
    assert not schedule.due(5.0 + PILLAR_INTERVAL_S - 1)
    assert schedule.due(5.0 + PILLAR_INTERVAL_S)
    assert SelftestSchedule(MAX_INTERVAL_S).interval_s == 72 * 3600
    with pytest.raises(ValueError, match="EN 81-28"):
        SelftestSchedule(MAX_INTERVAL_S + 1)
