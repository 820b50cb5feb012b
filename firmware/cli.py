"""`sos-device`: the firmware's entry point on the Pi (and in the simulator's device processes)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

from protocol.configfile import ConfigError

if TYPE_CHECKING:
    from firmware.config import DeviceConfig

log = logging.getLogger("sos.device")
DEFAULT_CONFIG = os.environ.get("SOS_DEVICE_CONFIG", "/etc/sos-device/device.toml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sos-device",
        description="Firmware of the SOS video token and the SOS pillar: the SOS button, GPS, "
                    "feedback outputs, the durable uplink to the control centre, encrypted "
                    "evidence video with live view during an SOS, and the shift-end upload.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="device config TOML (default: $SOS_DEVICE_CONFIG or %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="action", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run the device until SIGTERM/SIGINT (what the systemd unit runs)",
        description="Run the device until SIGTERM/SIGINT. On a Pi it needs the GPIO library of "
                    "the board profile's pin factory (lgpio): without it it exits 2 with one "
                    "line naming what is missing. Without picamera2 (with [camera]) it runs "
                    "without the camera and reports the camera fault to the centre.")
    run.add_argument("--simulated-hardware", action="store_true",
                     help="run off a Pi (a laptop, against your own broker): gpiozero mock pins, "
                          "the synthetic camera instead of picamera2, no battery gauge; the "
                          "config, keys, broker and GPS port are used as configured. "
                          "`kill -USR1 PID` presses the SOS button (held just past the "
                          "profile's threshold)")
    sub.add_parser("check-config", help="validate the config, the board profile and every "
                   "file the config names (certificates, keys, data_dir, GPS port), then exit")
    selftest = sub.add_parser("selftest", help="check camera, GPS, button, LED, storage, clock "
                              "and broker; one line each; exit 1 if any fails")
    selftest.add_argument("--led-sense-pin", type=int, default=None,
                          help="BCM pin of the board's LED sense line, if it has one")
    upload = sub.add_parser(
        "upload", help="upload recorded segments to the control centre now, with a progress "
        "bar; exit 1 if any was refused or left for later (docs/UPLOAD-DEVICE.md)")
    upload.add_argument("--now", action="store_true", required=True,
                        help="run one upload pass in the foreground")
    upload.add_argument("--retry-refused", action="store_true",
                        help="offer segments the centre refused before once more")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.action == "upload":
        from firmware.uplink.upload_cli import upload_now

        return upload_now(args.config, retry_refused=args.retry_refused)
    from firmware.config import load_device_config

    try:
        config = load_device_config(args.config, thorough=args.action == "check-config")
    except ConfigError as exc:
        return config_error(exc)
    if args.action == "check-config":
        print(f"{args.config}: ok ({config.kind} {config.device_id}, broker "
              f"{config.broker.host}:{config.broker.port})")
        return 0
    if args.action == "run" and args.simulated_hardware:
        return cmd_run_simulated(config)
    if config.pin_factory and "GPIOZERO_PIN_FACTORY" not in os.environ:
        os.environ["GPIOZERO_PIN_FACTORY"] = config.pin_factory  # explicit: no silent fallback
    if args.action == "selftest":
        from firmware.selftest import print_results, run_selftest

        return print_results(run_selftest(config, led_sense_pin=args.led_sense_pin))
    return cmd_run(config)


def cmd_run(config: DeviceConfig) -> int:
    """The device on the Pi's hardware. A missing GPIO library is refused before anything
    starts: without it there is no SOS button. A missing camera library is not: the SOS path
    runs without the camera, and the runtime reports the fault (one log line naming the module
    and its package, a `camera_fault` event and the status's `faults`) and keeps retrying."""
    from firmware.device import DeviceRuntime
    from firmware.simulated import configured_camera, missing_hardware

    missing = missing_hardware(config)
    if missing:
        return hardware_missing(", ".join(missing))
    stop = stop_on_signals()
    try:
        runtime = DeviceRuntime(config, camera_source=configured_camera(config))
    except ConfigError as exc:  # e.g. the signing key went missing since the config was read
        return config_error(exc)
    except ImportError as exc:  # gpiozero's fallback found no pin factory (BadPinFactory)
        return hardware_missing(str(exc))
    runtime.run(stop)
    return 0


def cmd_run_simulated(config: DeviceConfig) -> int:
    """The device on simulated hardware (firmware/simulated.py); SIGUSR1 presses the button."""
    from firmware.simulated import simulated_runtime

    stop = stop_on_signals()
    try:
        device = simulated_runtime(config)
    except ConfigError as exc:
        return config_error(exc)

    def press() -> None:
        log.info("SIGUSR1: pressing the SOS button")
        device.press_sos(stop.wait)

    signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=press, name="press",
                                                               daemon=True).start())
    log.info("simulated hardware: mock GPIO pins, %s, no battery gauge; `kill -USR1 %d` "
             "presses the SOS button", "synthetic camera" if config.camera else "no camera",
             os.getpid())
    device.runtime.run(stop)
    return 0


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM. The runtime waits on its own queue, never on it in
    this thread: setting it from a handler is safe here."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def hardware_missing(what: str) -> int:
    """One line and exit status 2 (not restarted by systemd): installing a library is a
    person's job. Off a Pi the flag is the answer."""
    print(f"sos-device run: cannot drive the Pi's hardware, missing {what}; install on the "
          "Pi, or off a Pi run `sos-device run --simulated-hardware`", file=sys.stderr)
    return 2


def config_error(exc: ConfigError) -> int:
    """One line on stderr and exit status 2, which the systemd unit does not restart
    (RestartPreventExitStatus): a wrong configuration does not mend itself."""
    print(f"config error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
