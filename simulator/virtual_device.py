"""One simulated device as its own process: the real firmware runtime on virtual hardware.

The button is a gpiozero MockPin driven with realistic contact bounce, the GPS is whatever pty the
config names (the simulator's receiver), the battery drains slowly. The process reads instructions
as JSON lines on stdin and reports what a person near the device would notice as JSON lines on
stdout. It is a real process so the simulator can SIGKILL it and start it again.

stdin:  {"op": "press", "hold_s": 2.0, "seed": 7, "gap_s": 0.5}   {"op": "cancel", "seed": 3}
        {"op": "dock"} {"op": "undock"} (the dock's GPIO input, when [upload] has a dock_pin)
        {"op": "door", "open": true} (the kiosk door's tamper switch, when the profile has one)
stdout: {"ev": "ready"} {"ev": "link", "up": true} {"ev": "trigger", "alert_id": ...}
        {"ev": "button", ...} {"ev": "button_released", ...} (a press has been played)
        {"ev": "feedback", "state": "sending"} ... each with "wall" (Unix time)
        {"ev": "microphone", "start_unix": ...} once, when a device with sound starts its
        microphone: the wall time of its sample 0 (the WAV plays in a loop from then on)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from firmware.config import load_device_config
from firmware.simulated import simulated_runtime
from protocol.configfile import ConfigError
from simulator.virtual_button import play, sequence_pattern

_print_lock = threading.Lock()


def emit(name: str, fields: dict[str, Any]) -> None:
    line = json.dumps({"ev": name, "wall": time.time(), **fields})
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class DrainingBattery:
    """A token battery that loses `drain_per_hour` percent per hour of the process's life."""

    def __init__(self, percent: float, drain_per_hour: float = 8.0) -> None:
        self._start, self._percent, self._drain = time.monotonic(), percent, drain_per_hour

    def read(self) -> dict[str, Any]:
        used = (time.monotonic() - self._start) / 3600 * self._drain
        return {"percent": round(max(0.0, self._percent - used), 1), "charging": False}


def _cancel_gesture(rng: random.Random) -> list[tuple[float, bool]]:
    # docs/BUTTON.md: at least 2 s released, three short taps, then a 3 s hold.
    quiet_s = 2.2
    return sequence_pattern(rng, [(quiet_s, 0.2), (0.5, 0.2), (0.5, 0.2), (0.5, 3.3)])


def serve_stdin(pin, pull_up: bool, stop: threading.Event, dock_pin=None,
                door: Callable[[bool], None] | None = None) -> None:
    for line in sys.stdin:
        try:
            order = json.loads(line)
            rng = random.Random(order.get("seed", 0))
            if order["op"] == "door":
                if door is None:
                    raise ValueError("this device has no door switch ([tamper] in its profile)")
                door(bool(order["open"]))
                emit("door", {"open": bool(order["open"])})
                continue
            if order["op"] in ("dock", "undock"):
                if dock_pin is None:
                    raise ValueError("this device has no dock input ([upload] dock_pin)")
                docked = order["op"] == "dock"
                dock_pin.drive_high() if docked else dock_pin.drive_low()
                emit("dock", {"docked": docked})
                continue
            if order["op"] == "press":
                # gap_s: released time before the first contact, as a thumb lifting between presses
                pattern = sequence_pattern(rng, [(float(order.get("gap_s", 0.0)),
                                                  float(order["hold_s"]))])
            elif order["op"] == "cancel":
                pattern = _cancel_gesture(rng)
            else:
                raise ValueError(f"unknown op {order['op']!r}")
        except (ValueError, KeyError, TypeError) as exc:
            logging.getLogger("sos.sim").error("bad instruction %r: %s", line.strip(), exc)
            continue
        emit("button", {"op": order["op"], "hold_s": order.get("hold_s")})
        if play(pin, pattern, pull_up=pull_up, wait=stop.wait):
            emit("button_released", {"op": order["op"]})
    stop.set()  # stdin closed: the simulator is gone


def report_microphone_start(source: Any) -> None:
    """Emit "microphone" once, with the wall time of the microphone's sample 0 (chunk 0's
    `utc`): with it, a marker at t s into the looped WAV was "spoken" at start_unix + t
    (modulo the loop), which the voice benchmark needs for mouth-to-ear latency."""
    if source is None:
        return
    unsubscribe: list[Callable[[], None]] = []

    def first_chunk(chunk: Any) -> None:
        if unsubscribe:
            unsubscribe.pop()()
            emit("microphone", {"start_unix": chunk.utc.timestamp() - chunk.index / 48_000,
                                "index": chunk.index})

    unsubscribe.append(source.subscribe(first_chunk))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulator.virtual_device",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--battery", type=float, help="start percent (omit for mains power)")
    parser.add_argument("--gps-port", help="the simulator's pty, in place of the board's UART")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    battery = DrainingBattery(args.battery) if args.battery is not None else None
    try:  # a config error (a missing signing key too) is one line, as `sos-device run` says it
        config = load_device_config(args.config)
        if args.gps_port:
            config = dataclasses.replace(config, gps=dataclasses.replace(config.gps,
                                                                         port=args.gps_port))
        device = simulated_runtime(config, battery=battery, observer=emit)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    runtime, factory = device.runtime, device.pins
    report_microphone_start(runtime.audio_source)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pin = factory.pin(config.button.pin)
    dock_pin = None
    if config.upload is not None and config.upload.dock_pin is not None:
        dock_pin = factory.pin(config.upload.dock_pin)
    door = device.set_door if config.tamper is not None else None
    threading.Thread(target=serve_stdin, args=(pin, config.button.pull_up, stop, dock_pin, door),
                     daemon=True).start()
    emit("ready", {"device_id": config.device_id, "pending": runtime.outbox.count()})
    runtime.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
