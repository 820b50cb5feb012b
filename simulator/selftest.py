"""`sos-sim selftest`: the real `run_selftest` on a virtual board whose parts can be unplugged.

The virtual board: a private Mosquitto (mutual TLS) that knows the device's certificate, a GPS
receiver writing NMEA into a pty at 10 Hz, gpiozero mock pins for the button and the LED with an
LED sense line that mirrors the LED, a camera that yields frames, a data directory and a clock.
Unplugging a part gives the fault a technician would meet:

- camera:  the camera delivers no frames (ribbon cable out);
- gps:     the receiver is silent (its TX wire is off; the port itself is still there);
- button:  the button input is shorted to ground: it reads pressed whatever the pull-up does;
- led:     the LED is disconnected: its sense line never follows the output;
- storage: the data directory's path runs through a regular file (the partition is not mounted
           where the config says): nothing can be created or written there;
- clock:   the system clock was never set: it counts up from 1970-01-01;
- broker:  the device's certificate has been revoked at the broker.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gpiozero.pins.mock import MockConnectedPin, MockFactory, MockPin

from firmware.config import DeviceConfig, load_device_config
from firmware.selftest import CHECKS, CheckResult, SelftestLimits, print_results, run_selftest
from simulator.broker import PrivateBroker
from simulator.device_config import render_device_toml
from simulator.gps_receiver import PtyGps, RouteReceiver

UNPLUGGABLE = CHECKS
DEVICE_IDS = {"token": "tok-sim-selftest", "pillar": "pil-sim-selftest"}
#: The virtual board's LED sense input (BCM); the real profiles have none yet.
LED_SENSE_PIN = 24
GPS_RATE_HZ = 10.0
AMSTERDAM = (52.37888, 4.90030)
#: Short waits: virtual parts answer at once, and an unplugged one must not hold a test up.
LIMITS = SelftestLimits(camera_timeout_s=2.0, gps_timeout_s=1.0, broker_timeout_s=3.0,
                        storage_timeout_s=5.0, min_free_mb=1.0)


class ShortedToGroundPin(MockPin):
    """A button input shorted to GND: the pull-up cannot lift it, it always reads low."""

    def drive_high(self) -> None:
        pass


class TimedReceiver:
    """A RouteReceiver sending `rate_hz` epochs a second, each stamped with its wall time.

    PtyGps asks for epoch n; RouteReceiver's time advances one second per epoch, so epoch n is
    asked for n / rate_hz: GPS time keeps pace with the clock, as a real 10 Hz receiver's does."""

    def __init__(self, receiver: RouteReceiver, rate_hz: float) -> None:
        self.receiver = receiver
        self.rate_hz = rate_hz

    def sentences_at(self, n: float) -> list[str]:
        return self.receiver.sentences_at(n / self.rate_hz)


class VirtualCamera:
    """Yields `frames` frames, or none when unplugged."""

    def __init__(self, plugged: bool = True, frames: int = 5) -> None:
        self.plugged = plugged
        self.frames = frames

    def probe(self) -> int:
        return self.frames if self.plugged else 0


def unset_clock(start: float | None = None) -> Callable[[], datetime]:
    """A clock that was never set: 1970-01-01 plus the time since `start` (monotonic)."""
    t0 = time.monotonic() if start is None else start
    return lambda: datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=time.monotonic() - t0)


@dataclass
class VirtualBoard:
    """What run_selftest needs, wired to the virtual parts."""

    config: DeviceConfig
    pin_factory: MockFactory
    camera: VirtualCamera
    utc_clock: Callable[[], datetime]
    broker: PrivateBroker
    gps: PtyGps | None

    def run(self, limits: SelftestLimits = LIMITS) -> list[CheckResult]:
        return run_selftest(self.config, pin_factory=self.pin_factory,
                            camera_probe=self.camera.probe, led_sense_pin=LED_SENSE_PIN,
                            utc_clock=self.utc_clock, limits=limits)


def _pins(config: DeviceConfig, unplugged: frozenset[str]) -> MockFactory:
    factory = MockFactory()
    sense = factory.pin(LED_SENSE_PIN)
    if "button" in unplugged:
        factory.pin(config.button.pin, pin_class=ShortedToGroundPin)
    if "led" not in unplugged:  # plugged: the sense line sees the LED lit when it is driven
        factory.pin(config.feedback.led_pin, pin_class=MockConnectedPin, input_pin=sense)
    return factory


@contextlib.contextmanager
def virtual_board(workdir: Path, *, kind: str = "token",
                  unplugged: frozenset[str] | set[str] = frozenset()) -> Iterator[VirtualBoard]:
    """Build and start the virtual board in `workdir`; stop everything on exit."""
    unplugged = frozenset(unplugged)
    unknown = unplugged - set(UNPLUGGABLE)
    if unknown:
        raise ValueError(f"cannot unplug {', '.join(sorted(unknown))} "
                         f"(one of {', '.join(UNPLUGGABLE)})")
    if kind == "pillar" and "gps" in unplugged:
        raise ValueError("the pillar has no GPS receiver to unplug (it uses its surveyed position)")
    device_id = DEVICE_IDS[kind]
    broker = PrivateBroker(workdir / "broker")
    gps = None
    if kind == "token":
        receiver = RouteReceiver([AMSTERDAM], start_utc=datetime.now(UTC), seed=1, noise_m=2.0)
        gps = PtyGps(TimedReceiver(receiver, GPS_RATE_HZ), speed=GPS_RATE_HZ)  # type: ignore[arg-type]
    data_dir = workdir / "data"
    if "storage" in unplugged:
        (workdir / "not-mounted").write_text("a file where the data partition should be\n")
        data_dir = workdir / "not-mounted" / "data"
    config_file = workdir / "device.toml"
    config_file.write_text(render_device_toml(  # enrols the device with the broker's fleet
        device_id=device_id, profile=kind, data_dir=data_dir, broker=broker,
        gps_port=gps.port if gps else None,
        surveyed=None if gps else {"lat": AMSTERDAM[0], "lon": AMSTERDAM[1], "accuracy_m": 1.0}))
    if "broker" in unplugged:
        broker.revoke(device_id)  # before start: the broker starts with the new CRL
    config = load_device_config(config_file)
    try:
        broker.start()
        if gps is not None and "gps" not in unplugged:
            gps.start()
        yield VirtualBoard(config, _pins(config, unplugged),
                           VirtualCamera(plugged="camera" not in unplugged),
                           unset_clock() if "clock" in unplugged else (lambda: datetime.now(UTC)),
                           broker, gps)
    finally:
        if gps is not None:
            gps.stop()
        broker.stop()


def run_virtual_selftest(*, kind: str = "token", unplugged: frozenset[str] | set[str] = frozenset(),
                         workdir: Path | None = None) -> list[CheckResult]:
    """Build a virtual board (in a temporary directory unless `workdir`), run the self-test."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sos-st-")))
        board = stack.enter_context(virtual_board(workdir, kind=kind, unplugged=unplugged))
        return board.run()


def add_selftest_parser(sub: Any) -> None:
    """`sos-sim selftest` (called by simulator/cli.py)."""
    parser = sub.add_parser("selftest", help="run `sos-device selftest` on a virtual board; "
                            "--unplug a part to see its check fail")
    parser.add_argument("--unplug", action="extend", nargs="+", default=[], metavar="PART",
                        choices=UNPLUGGABLE, help=f"one or more of: {', '.join(UNPLUGGABLE)}")
    parser.add_argument("--kind", choices=sorted(DEVICE_IDS), default="token",
                        help="the virtual device (default: %(default)s)")


def cmd_selftest(args: argparse.Namespace) -> int:
    """Print one line per check; exit 0 if all passed, 1 if any failed (as sos-device does)."""
    unplugged = frozenset(args.unplug)
    try:
        results = run_virtual_selftest(kind=args.kind, unplugged=unplugged)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"virtual {args.kind} {DEVICE_IDS[args.kind]}, unplugged: "
          f"{', '.join(sorted(unplugged)) or 'nothing'}")
    return print_results(results)
