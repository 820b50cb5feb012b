"""Turn a blank Raspberry Pi root filesystem into an enrolled token or pillar.

`sos-provision` writes, under TARGET (the mounted SD card's root, or an existing directory
in tests; a TARGET that is not there is refused before anything is written or enrolled):

    opt/sos-device/src/                  the firmware source (installed into a venv at first boot):
                                         firmware/ (with its board profiles), protocol/,
                                         evidence_format/ and a pyproject.toml naming only those
                                         (no centre code)
    etc/sos-device/device.toml           the config (validated; paths relative to this file)
    etc/sos-device/{ca.pem,device.pem}   the fleet CA and this device's certificate
    etc/sos-device/{device.key,signing.key}  the device's keys, made here, never copied anywhere
    var/lib/sos-device/                  the data directory (outbox, state)
    etc/systemd/system/...               sos-device.service (watchdog, restart) + first-boot setup
    etc/udev/rules.d/99-sos-device.rules GPIO and UART access for the service user
    boot/firmware/config.txt             a marked block: the GPS UART on GPIO14/15 (per board),
                                         camera, watchdog (provisioning/boot.py)
    boot/firmware/cmdline.txt            no serial console (it would share the GPS UART)
    etc/systemd/system/serial-getty@...  masked: no login prompt on the GPS UART

and enrols the device in the fleet registry (its certificate and its signing key). Every step is
idempotent: running it again changes nothing that is already right and says so.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from control_center import pki
from control_center.fleet import Fleet
from evidence_format.files import atomic_write
from firmware.config import PROFILES_DIR, load_device_config
from protocol import signing
from provisioning import boot

REPO = Path(__file__).resolve().parents[1]
DEVICE_PACKAGES = ("protocol", "evidence_format", "firmware")  # what runs on a device, no more
DEVICE_DATA = ("README.md",)
# What older versions copied into src/ and this one no longer ships: removed when found there.
NO_LONGER_SHIPPED = ("control_center", "hw")
DEVICE_COMMAND = "sos-device"
GPS_PORT = "/dev/sos-gps"  # the udev rule's name for the GPIO14/15 UART on every board
DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")


class ProvisionError(ValueError):
    """An input that cannot give a working device; the text says which and why."""


@dataclass(frozen=True)
class Request:
    device_id: str
    profile: str  # "token" | "pillar"
    target: Path
    fleet_dir: Path
    broker_host: str
    broker_port: int
    gps_port: str | None = GPS_PORT
    surveyed: dict[str, float] | None = None
    battery_sysfs: str | None = None
    ingest_url: str | None = None  # https://host:port of `sos-center ingest`: uploads recordings


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def note(self, what: str, path: Path | str) -> None:
        self.lines.append(f"{what:<10} {path}")


def parse_broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProvisionError(f"--broker '{text}': expected HOST:PORT, e.g. mqtt.example:8883")
    return host, int(port)


def parse_surveyed(text: str) -> dict[str, float]:
    """`LAT,LON[,ALT_M[,ACCURACY_M]]`"""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not 2 <= len(values) <= 4 or not -90 <= values[0] <= 90 or not -180 <= values[1] <= 180:
        raise ProvisionError(f"--surveyed '{text}': expected LAT,LON[,ALT_M[,ACCURACY_M]]")
    return dict(zip(("lat", "lon", "alt_m", "accuracy_m"), values, strict=False))


def provision(request: Request) -> Report:
    _check(request)
    report = Report()
    root = request.target
    etc = root / "etc" / "sos-device"
    etc.mkdir(parents=True, exist_ok=True)
    (root / "var" / "lib" / "sos-device").mkdir(parents=True, exist_ok=True)

    fleet = Fleet(request.fleet_dir)
    tls_key = pki.load_or_make_key(etc / "device.key")
    signer = signing.Signer(signing.load_or_make_key(etc / "signing.key"))
    report.note("keys", f"{etc / 'device.key'}, {etc / 'signing.key'} (made here; never copied)")
    cert = fleet.sign_csr(pki.make_csr(tls_key, request.device_id), request.profile,
                          signer.public_key_b64)
    report.note(_write(etc / "device.pem", cert), etc / "device.pem")
    report.note(_write(etc / "ca.pem", fleet.ca.cert_file.read_bytes()), etc / "ca.pem")
    report.note(_write(etc / "device.toml", render_config(request, fleet).encode()),
                etc / "device.toml")
    load_device_config(etc / "device.toml")  # what we wrote must load: fail here, not on the Pi

    _copy_firmware(firmware_dir(root), report)
    _write_units(root, report)
    report.note(_write(root / "etc" / "udev" / "rules.d" / "99-sos-device.rules",
                       UDEV_RULES.encode()), "udev rule")
    _write_boot_config(root, report)
    report.lines.append(f"enrolled   {request.device_id} ({request.profile}) in {fleet.directory}")
    return report


def _check(request: Request) -> None:
    _check_target(request.target)
    if not DEVICE_ID.match(request.device_id):
        raise ProvisionError(f"--id '{request.device_id}': lower-case letters, digits and dashes, "
                             "3 to 63 characters")
    if not (PROFILES_DIR / f"{request.profile}.toml").exists():
        raise ProvisionError(f"--profile '{request.profile}': no such board profile "
                             f"(firmware/profiles/{request.profile}.toml)")
    if request.gps_port is None and request.surveyed is None:
        raise ProvisionError("a device without a GPS receiver needs --surveyed LAT,LON")
    config_txt = request.target / "boot" / "firmware" / "config.txt"
    try:  # a block we cannot replace safely stops us before anything is written or enrolled
        boot.render_config_txt(config_txt.read_text() if config_txt.exists() else "")
    except boot.BootConfigError as exc:
        raise ProvisionError(f"{config_txt}: {exc}") from exc
    if not (request.fleet_dir / "ca.pem").exists():
        raise ProvisionError(f"--fleet {request.fleet_dir}: no fleet CA there "
                             "(run: sos-center ca init)")


def _check_target(target: Path) -> None:
    """The card must already be mounted there: a mistyped mount point would otherwise become a
    new directory on the workstation holding an enrolled device's keys."""
    if not target.exists():
        raise ProvisionError(f"--target {target}: no such directory (mount the SD card's root "
                             "filesystem there, or make the directory first)")
    if not target.is_dir():
        raise ProvisionError(f"--target {target}: not a directory")
    src = firmware_dir(target)
    if src.is_symlink() or _inside(src.resolve(), REPO) or _inside(REPO, src.resolve()):
        raise ProvisionError(f"--target {target}: {src} is a symlink or overlaps this source "
                             f"tree ({REPO}); provisioning replaces the firmware there")


# profile -> (width, height, fps, bitrate) of the evidence video
CAMERA_MODES = {"token": (1920, 1080, 30, 8_000_000), "pillar": (1280, 720, 25, 4_000_000)}


def render_config(request: Request, fleet: Fleet) -> str:
    """device.toml with paths relative to /etc/sos-device, so the same tree works from / on the
    Pi and from a directory in the simulator."""
    keys = ", ".join(f'"{k}"' for k in fleet.centre_public_keys())
    lines = [
        f"# Written by sos-provision for {request.device_id}. Keys: "
        "firmware/config.schema.json.",
        "[device]", f'id = "{request.device_id}"', f'profile = "{request.profile}"',
        'data_dir = "../../var/lib/sos-device"', 'signing_key = "signing.key"',
        "", "[broker]", f'host = "{request.broker_host}"', f"port = {request.broker_port}",
        'ca_file = "ca.pem"', 'cert_file = "device.pem"', 'key_file = "device.key"',
        "", "[trust]", f"centre_keys = [{keys}]",
    ]
    recipients = fleet.evidence_recipients()
    if recipients:  # a camera only where its footage can be encrypted to the centre
        width, height, fps, bitrate = CAMERA_MODES[request.profile]
        lines += ["", "[evidence]", "recipients = [" + ", ".join(f'"{r}"' for r in recipients)
                  + "]",
                  "", "[camera]", 'source = "picamera2"', f"width = {width}",
                  f"height = {height}", f"fps = {fps}", f"bitrate = {bitrate}"]
        live = fleet.live_recipients()
        if live:
            lines += ["", "[live]", "recipients = [" + ", ".join(f'"{r}"' for r in live) + "]"]
        if request.ingest_url:
            lines += ["", "[upload]", f'url = "{request.ingest_url}"']
            if request.profile == "pillar":  # always online: upload whenever the centre answers
                host = urlsplit(request.ingest_url).hostname
                lines += [f'station_host = "{host}"', "check_interval_s = 300"]
    if request.battery_sysfs:
        lines += ["", "[battery]", f'sysfs = "{request.battery_sysfs}"']
    lines += ["", "[gps]"]
    if request.gps_port:
        lines.append(f'port = "{request.gps_port}"')
    if request.surveyed:
        lines += ["", "[gps.surveyed]", *(f"{k} = {v}" for k, v in request.surveyed.items())]
    return "\n".join(lines) + "\n"


def _write(path: Path, content: bytes, mode: int | None = None) -> str:
    """Write only if different (durably: the card may be pulled right after); say what
    happened."""
    if path.exists() and path.read_bytes() == content:
        return "unchanged"
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, content, mode=mode)
    return "updated" if existed else "created"


def _copy_firmware(destination: Path, report: Report) -> None:
    """The device's packages and data, and a pyproject.toml that installs only them. What an
    older version copied and this one no longer ships (centre code) is removed; nothing else
    there is touched."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    destination.mkdir(parents=True, exist_ok=True)
    for stale in NO_LONGER_SHIPPED:
        if (destination / stale).is_dir() and not (destination / stale).is_symlink():
            shutil.rmtree(destination / stale)
    for part in (*DEVICE_PACKAGES, *DEVICE_DATA):
        source, copy = REPO / part, destination / part
        if source.is_dir():
            if copy.is_dir() and not copy.is_symlink():
                shutil.rmtree(copy)  # a module removed upstream goes from the card too
            shutil.copytree(source, copy, ignore=ignore)
        else:
            shutil.copy2(source, copy)
    _write(destination / "pyproject.toml", device_pyproject().encode())
    report.note("copied", f"firmware to {destination} ({', '.join(DEVICE_PACKAGES)})")


def firmware_dir(root: Path) -> Path:
    return root / "opt" / "sos-device" / "src"


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def device_pyproject() -> str:
    """The project's pyproject.toml cut down to the device: its dependencies and version (one
    source: the repository's pyproject.toml), its packages and its one command."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    script = project["scripts"][DEVICE_COMMAND]
    packages = ", ".join(f'"{name}*"' for name in DEVICE_PACKAGES)
    return "\n".join([
        "# Written by sos-provision from the project's pyproject.toml: the device's part only.",
        "[build-system]", 'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"', "",
        "[project]", 'name = "sos-device-firmware"', f'version = "{project["version"]}"',
        f'requires-python = "{project["requires-python"]}"',
        "dependencies = [", *(f'    "{d}",' for d in project["dependencies"]), "]", "",
        "[project.scripts]", f'{DEVICE_COMMAND} = "{script}"', "",
        "[tool.setuptools.packages.find]", f"include = [{packages}]", "",
        "[tool.setuptools.package-data]", '"*" = ["*.json", "*.toml"]', "",
    ])


def _write_units(root: Path, report: Report) -> None:
    units = root / "etc" / "systemd" / "system"
    for name in ("sos-device.service", "sos-device-setup.service"):
        content = (REPO / "hw" / "systemd" / name).read_bytes()
        report.note(_write(units / name, content), units / name)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for name in ("sos-device.service", "sos-device-setup.service"):
        link = wants / name
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{name}")
    watchdog = root / "etc" / "systemd" / "system.conf.d" / "sos-watchdog.conf"
    report.note(_write(watchdog, b"[Manager]\nRuntimeWatchdogSec=15\n"), watchdog)


def _write_boot_config(root: Path, report: Report) -> None:
    """config.txt's block, cmdline.txt without a serial console, the serial gettys masked: the
    GPS UART carries the receiver's bytes alone, at its speed (provisioning/boot.py)."""
    firmware = root / "boot" / "firmware"
    config_txt = firmware / "config.txt"
    text = config_txt.read_text() if config_txt.exists() else ""
    report.note(_write(config_txt, boot.render_config_txt(text).encode()), config_txt)
    cmdline = firmware / "cmdline.txt"
    if cmdline.exists():
        report.note(_write(cmdline, boot.render_cmdline_txt(cmdline.read_text()).encode()),
                    cmdline)
    else:  # not a real card (a directory for the simulator): nothing to mend, nothing made
        report.note("missing", f"{cmdline} (left missing: no kernel console to remove)")
    try:
        masked = boot.mask_units(root / "etc" / "systemd" / "system")
    except boot.BootConfigError as exc:  # a directory in the way: say so, no traceback
        raise ProvisionError(str(exc)) from exc
    for what, link in masked:
        report.note(what, f"{link} -> /dev/null")


UDEV_RULES = """\
# Written by sos-provision: the service user reaches the GPIO chip and the GPS UART.
SUBSYSTEM=="gpio", KERNEL=="gpiochip*", GROUP="gpio", MODE="0660"
# The UART on GPIO14/15 is ttyAMA0 on every board once config.txt's block applies (Pi 3, 4,
# Zero 2 W: dtoverlay=disable-bt; Pi 5: dtparam=uart0=on); /dev/sos-gps names it on all of them.
SUBSYSTEM=="tty", KERNEL=="ttyAMA0", GROUP="dialout", MODE="0660", SYMLINK+="sos-gps"
"""
