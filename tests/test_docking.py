"""When the shift-end upload starts: the pure policy, the probes on mock pins and real sockets."""

from __future__ import annotations

import socket
import threading

import pytest
from gpiozero.pins.mock import MockFactory

from firmware.uplink.docking import (
    DockDetector,
    DockPolicy,
    DockReading,
    StationSchedule,
    is_docked,
    run_when_docked,
    tcp_reachable,
)
from firmware.uplink.upload_settings import UploadSettings

DOCK_PIN = 27


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def factory():
    factory = MockFactory()
    yield factory
    factory.reset()


# -- pure ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("gpio", "station", "docked"), [
    (None, None, False),  # nothing configured: only an explicit request uploads
    (True, None, True), (False, None, False),
    (None, True, True), (None, False, False),
    (True, True, True), (True, False, False), (False, True, False),
])
def test_every_configured_probe_must_say_docked(gpio, station, docked) -> None:
    assert is_docked(DockReading(gpio, station)) is docked


def test_a_pass_starts_once_docked_for_the_settle_time() -> None:
    policy = DockPolicy(interval_s=30.0, settle_s=2.0)
    policy.observe(10.0, True)
    assert not policy.should_start(11.9)
    assert policy.should_start(12.0)


def test_a_dock_contact_that_bounces_restarts_the_settle_time() -> None:
    policy = DockPolicy(interval_s=30.0, settle_s=2.0)
    policy.observe(10.0, True)
    policy.observe(11.0, False)
    policy.observe(11.5, True)
    assert not policy.should_start(12.5)
    assert policy.should_start(13.5)


def test_while_docked_the_next_pass_comes_an_interval_after_the_last_ended() -> None:
    policy = DockPolicy(interval_s=30.0, settle_s=2.0)
    policy.observe(0.0, True)
    policy.started(2.0)
    assert not policy.should_start(3.0)  # one pass at a time
    policy.finished(10.0)
    assert not policy.should_start(39.9)
    assert policy.next_check(20.0) == 40.0
    assert policy.should_start(40.0)


def test_docking_again_starts_a_pass_at_once_after_settling() -> None:
    policy = DockPolicy(interval_s=3600.0, settle_s=1.0)
    policy.observe(0.0, True)
    policy.started(1.0)
    policy.finished(5.0)
    policy.observe(6.0, False)
    policy.observe(7.0, True)
    assert policy.should_start(8.0)


def test_an_explicit_request_starts_a_pass_undocked_and_is_used_once() -> None:
    policy = DockPolicy()
    policy.observe(0.0, False)
    assert not policy.should_start(0.0)
    policy.request()
    assert policy.should_start(0.0)
    policy.started(0.0)
    policy.finished(1.0)
    assert not policy.should_start(1.0)


def test_the_station_is_probed_at_most_once_an_interval() -> None:
    schedule = StationSchedule(30.0)
    assert schedule.due(0.0)
    schedule.record(0.0, True)
    assert not schedule.due(29.9) and schedule.due(30.0)
    assert schedule.next_due() == 30.0


# -- probes ----------------------------------------------------------------------------------
def test_the_dock_pin_reads_docked_when_driven_to_its_active_level(factory) -> None:
    detector = DockDetector(pin=DOCK_PIN, active_high=True, pin_factory=factory)
    pin = factory.pin(DOCK_PIN)
    assert not detector.docked()  # pulled down: an open contact is "not docked"
    pin.drive_high()
    assert detector.docked()
    detector.close()


def test_an_active_low_dock_pin(factory) -> None:
    detector = DockDetector(pin=DOCK_PIN, active_high=False, pin_factory=factory)
    pin = factory.pin(DOCK_PIN)
    assert not detector.docked()  # pulled up
    pin.drive_low()
    assert detector.docked()
    detector.close()


def test_the_station_probe_runs_only_when_due() -> None:
    clock = FakeClock()
    calls: list[tuple[str, int]] = []

    def probe(host: str, port: int) -> bool:
        calls.append((host, port))
        return True

    detector = DockDetector(station=("ingest.example", 8443), check_interval_s=30.0,
                            clock=clock, probe=probe)
    assert detector.docked() and detector.docked()
    assert calls == [("ingest.example", 8443)]
    clock.t += 30.0
    detector.docked()
    assert len(calls) == 2


def test_tcp_reachable_against_a_listening_and_a_closed_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert tcp_reachable("127.0.0.1", port, timeout_s=2.0)
    assert not tcp_reachable("127.0.0.1", port, timeout_s=2.0)  # closed now: refused


def test_from_settings(factory) -> None:
    settings = UploadSettings.from_dict({"url": "https://ingest.example:8443",
                                         "dock_pin": DOCK_PIN, "station_host": "10.1.1.1",
                                         "check_interval_s": 5})
    seen: list[tuple[str, int]] = []
    detector = DockDetector.from_settings(settings, pin_factory=factory,
                                          probe=lambda h, p: seen.append((h, p)) or True)
    factory.pin(DOCK_PIN).drive_high()
    assert detector.docked()
    assert seen == [("10.1.1.1", 8443)]
    detector.close()


def test_taking_the_device_out_of_the_dock_stops_a_running_pass(factory) -> None:
    clock = FakeClock()
    detector = DockDetector(pin=DOCK_PIN, pin_factory=factory, clock=clock, settle_s=0.0)
    pin = factory.pin(DOCK_PIN)
    pin.drive_high()
    assert detector.should_start()
    stop = detector.begin_pass()
    assert not stop.is_set()
    pin.drive_low()  # MockPin runs the callback synchronously
    assert stop.is_set()
    detector.end_pass()
    detector.close()


def test_the_loop_runs_a_pass_when_docked_and_ends_on_close(factory) -> None:
    clock = FakeClock()
    detector = DockDetector(pin=DOCK_PIN, pin_factory=factory, clock=clock, settle_s=0.0,
                            check_interval_s=3600.0)
    factory.pin(DOCK_PIN).drive_high()
    passes: list[threading.Event] = []

    def run_pass(stop: threading.Event) -> None:
        passes.append(stop)
        detector.close()  # the runtime shutting down during the pass

    loop = threading.Thread(target=run_when_docked, args=(detector, run_pass), daemon=True)
    loop.start()
    loop.join(timeout=10)
    assert not loop.is_alive(), "close() did not end the loop"
    assert len(passes) == 1 and passes[0].is_set()


def test_a_request_wakes_the_loop(factory) -> None:
    detector = DockDetector(check_interval_s=3600.0)  # no probes: only requests
    ran = threading.Event()

    def run_pass(stop: threading.Event) -> None:
        ran.set()
        detector.close()

    loop = threading.Thread(target=run_when_docked, args=(detector, run_pass))
    loop.start()
    detector.request()
    loop.join(timeout=10)
    assert ran.is_set() and not loop.is_alive()
