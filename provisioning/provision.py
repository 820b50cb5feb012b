"""Turn a blank Raspberry Pi root filesystem into an enrolled token or pillar.

`sos-provision` writes, under TARGET (the mounted SD card's root, or an existing directory
in tests; a TARGET that is not there is refused before anything is written or enrolled):

    opt/sos-device/src/                  the firmware source: firmware/ (with its board
                                         profiles), protocol/, evidence_format/ and a
                                         pyproject.toml naming only those (no centre code)
    opt/sos-device/wheelhouse/           the firmware as a wheel and a wheel of every dependency
                                         for the Pi (--platform), nothing else
    opt/sos-device/install               the first-boot install (hw/sos-device-install): a venv
                                         with --system-site-packages, pip --no-index from there
    opt/sos-device/apt-packages.txt      what the image must carry (hw/pi-apt-packages.txt)
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

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
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
# The Pi's Python and platform: Raspberry Pi OS Bookworm 64-bit has CPython 3.11 on glibc 2.36,
# so a wheel for any manylinux tag up to 2_36 runs there. pip takes a manylinux_X_Y --platform
# literally, so platform_tags() names every older tag too: the aarch64 wheels of cryptography,
# cffi and rpds-py (jsonschema's) are manylinux2014 (= 2_17), av's are manylinux_2_28.
MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")
DEVICE_PYTHON = "3.11"
PI_PLATFORM = "manylinux_2_36_aarch64"
HOST = "host"  # --platform host: this machine's platform (tests, an aarch64 workstation)
APT_PACKAGES = REPO / "hw" / "pi-apt-packages.txt"
FIRST_BOOT_INSTALL = REPO / "hw" / "sos-device-install"
# Wheels carry the time of their files; a fixed one makes the firmware wheel the same bytes on
# every run, so provisioning again reports it unchanged (1980-01-01, the earliest a zip holds).
WHEEL_EPOCH = "315532800"


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
    platform: str = PI_PLATFORM  # the wheels' platform tag, or HOST
    wheelhouse: Path | None = None  # wheels prepared before (offline): no index is asked


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
    _lay_down_install(root / "opt" / "sos-device", request, report)
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
    if request.wheelhouse is not None and not request.wheelhouse.is_dir():
        raise ProvisionError(f"--wheelhouse {request.wheelhouse}: not a directory")
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


def host_platform() -> str:
    """This machine's manylinux tag (its glibc and machine), e.g. manylinux_2_36_x86_64."""
    libc, version = platform.libc_ver()
    if libc != "glibc":
        raise ProvisionError("--platform host: this machine has no glibc; name a platform tag")
    major, minor = version.split(".")[:2]
    return f"manylinux_{major}_{minor}_{platform.machine()}"


def platform_tags(tag: str) -> list[str]:
    """`manylinux_2_36_aarch64` -> that tag and every older manylinux tag of the same machine
    (the legacy manylinux2014/2010/1 names included), newest first; any other tag as it is."""
    match = MANYLINUX.match(tag)
    if not match:
        return [tag]
    major, minor, machine = int(match[1]), int(match[2]), match[3]
    tags = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 4, -1)]
    return [*tags, *(f"manylinux{legacy}_{machine}" for legacy in ("2014", "2010", "1"))]


def _lay_down_install(prefix: Path, request: Request, report: Report) -> None:
    """Everything the first boot installs from, so it needs no network: the firmware's wheel,
    its dependencies' wheels for the Pi, the install script and the apt list it checks."""
    target_platform = host_platform() if request.platform == HOST else request.platform
    with tempfile.TemporaryDirectory(prefix="sos-provision-") as scratch:
        wheels = build_wheelhouse(prefix / "src", Path(scratch),
                                  target_platform, request.wheelhouse)
        changes = _sync_wheelhouse(wheels, prefix / "wheelhouse")
    report.note(changes, f"{prefix / 'wheelhouse'} ({len(wheels)} wheels for "
                         f"{target_platform}, CPython {DEVICE_PYTHON})")
    report.note(_write(prefix / "install", FIRST_BOOT_INSTALL.read_bytes(), mode=0o755),
                prefix / "install")
    report.note(_write(prefix / "apt-packages.txt", APT_PACKAGES.read_bytes()),
                f"{prefix / 'apt-packages.txt'} (the image must carry: "
                f"{', '.join(apt_packages())})")


def apt_packages() -> list[str]:
    """The apt packages named in hw/pi-apt-packages.txt, the one list (columns: package,
    module, need, why)."""
    return [line.split()[0] for line in APT_PACKAGES.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def build_wheelhouse(source: Path, scratch: Path, target_platform: str,
                     prepared: Path | None = None) -> list[Path]:
    """The firmware's wheel (built here, offline) and, by pip download for the Pi's Python and
    platform, binary wheels of all it needs: from the index, or from `prepared` alone."""
    build, out = scratch / "build", scratch / "wheels"
    shutil.copytree(source, build / "src")  # setuptools leaves build/ and egg-info beside it
    env = {**os.environ, "SOURCE_DATE_EPOCH": WHEEL_EPOCH}
    _pip(["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(build),
          str(build / "src")], env, "building the firmware's wheel")
    (firmware_wheel,) = build.glob("sos_device_firmware-*.whl")
    index = ["--no-index", "--find-links", str(prepared)] if prepared else []
    platforms = [a for tag in platform_tags(target_platform) for a in ("--platform", tag)]
    _pip(["download", "--dest", str(out), "--only-binary", ":all:", *platforms,
          "--python-version", DEVICE_PYTHON, "--implementation", "cp",
          *index, str(firmware_wheel)], env,
         f"collecting the wheels for {target_platform}"
         + (f" from {prepared}" if prepared else ""))
    return sorted(out.glob("*.whl"))


def _pip(args: list[str], env: dict[str, str], doing: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q",
                           *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
        raise ProvisionError(f"{doing} failed: " + ("; ".join(errors) or done.stderr.strip()))


def _sync_wheelhouse(wheels: list[Path], wheelhouse: Path) -> str:
    """The card's wheelhouse becomes exactly `wheels`: pip --no-index there can only pick what
    this run chose; a wheel left from an older run is removed."""
    results = [_write(wheelhouse / wheel.name, wheel.read_bytes()) for wheel in wheels]
    keep = {wheel.name for wheel in wheels}
    stale = [old for old in wheelhouse.glob("*.whl") if old.name not in keep]
    for old in stale:
        old.unlink()
    if not stale and all(r == "unchanged" for r in results):
        return "unchanged"
    return "created" if not stale and all(r == "created" for r in results) else "updated"


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
