"""`sos-provision`: write a device's root filesystem and enrol it in the fleet (`make flash`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from control_center.fleet import FleetError
from protocol.configfile import ConfigError
from provisioning.provision import (
    GPS_PORT,
    HOST,
    PI_PLATFORM,
    ProvisionError,
    Request,
    parse_broker,
    parse_surveyed,
    provision,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sos-provision",
        description="Turn a Pi root filesystem (or a directory) into an enrolled token or "
                    "pillar: firmware, config, keys, certificate, systemd units, udev rule, "
                    "config.txt and cmdline.txt (no serial console on the GPS UART), and a "
                    "wheelhouse so the first boot installs offline. Writes "
                    "everything a device needs under TARGET and enrols it in the fleet; safe "
                    "to run again. Runs where the fleet CA is, not on a device. See "
                    "docs/FLASHING.md.")
    parser.add_argument("--id", required=True, help="device id, e.g. tok-amb-0412")
    parser.add_argument("--profile", required=True, choices=["token", "pillar"])
    parser.add_argument("--target", required=True, type=Path,
                        help="root of the device's filesystem: the mounted SD card, or an "
                             "existing directory")
    parser.add_argument("--fleet", required=True, type=Path,
                        help="fleet directory (sos-center ca init) to enrol the device in")
    parser.add_argument("--broker", required=True, metavar="HOST:PORT",
                        help="the control centre's MQTT broker, e.g. mqtt.example:8883")
    parser.add_argument("--gps-port", default=GPS_PORT,
                        help="GPS serial port on the device (default %(default)s: the udev "
                             "rule's name for the UART on GPIO14/15, on every board); 'none' "
                             "if the device has no receiver")
    parser.add_argument("--surveyed", metavar="LAT,LON[,ALT,ACC]",
                        help="surveyed position (pillars)")
    parser.add_argument("--battery-sysfs", help="power-supply directory (tokens), e.g. "
                        "/sys/class/power_supply/battery")
    parser.add_argument("--ingest", metavar="URL",
                        help="the centre's evidence ingest (sos-center ingest), e.g. "
                             "https://ingest.example:8443: the device uploads its recordings "
                             "there when docked (token: the board's dock pin in [upload]) or, "
                             "for a pillar, whenever the centre answers")
    parser.add_argument("--platform", default=PI_PLATFORM,
                        help="platform tag of the wheels laid on the card (default %(default)s: "
                             "a 64-bit Raspberry Pi OS Bookworm: glibc 2.36, and every older "
                             f"manylinux tag); '{HOST}' for this machine's")
    parser.add_argument("--wheelhouse", type=Path, metavar="DIR",
                        help="take every wheel from DIR (for example the wheelhouse of a card "
                             "flashed before) and ask no package index: flash offline")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        host, port = parse_broker(args.broker)
        request = Request(
            device_id=args.id, profile=args.profile, target=args.target, fleet_dir=args.fleet,
            broker_host=host, broker_port=port,
            gps_port=None if args.gps_port == "none" else args.gps_port,
            surveyed=parse_surveyed(args.surveyed) if args.surveyed else None,
            battery_sysfs=args.battery_sysfs, ingest_url=args.ingest,
            platform=args.platform, wheelhouse=args.wheelhouse)
        report = provision(request)
    except (ProvisionError, FleetError, ConfigError) as exc:
        print(f"sos-provision: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report.lines))
    print(f"{args.id} is ready: boot the card; check it with `sos-device selftest` on the device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
