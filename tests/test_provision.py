"""`sos-provision` (`make flash`): a directory that becomes a working, enrolled device."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from control_center.fleet import Fleet
from firmware.config import load_device_config
from simulator.broker import free_port
from tests.wheelhouse_fixture import host_wheelhouse  # noqa: F401  (a fixture)

# This machine's wheels from the session's wheelhouse: no card here downloads anything.
OFFLINE: list[str] = []


@pytest.fixture(autouse=True)
def _offline_wheels(host_wheelhouse: Path) -> None:  # noqa: F811
    OFFLINE[:] = ["--platform", "host", "--wheelhouse", str(host_wheelhouse)]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.create(tmp_path / "fleet")


REPO = Path(__file__).resolve().parents[1]
BOOT_DATA = REPO / "tests" / "data" / "boot"


def provision(fleet: Fleet, target: Path, *extra: str, device_id: str = "tok-amb-0412",
              profile: str = "token", broker: str = "127.0.0.1:8883", mount: bool = True):
    """`sos-provision`; `mount`: make TARGET first, as mounting the card does."""
    if mount:
        target.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "provisioning.cli", "--id", device_id, "--profile",
         profile, "--target", str(target), "--fleet", str(fleet.directory), "--broker", broker,
         *OFFLINE, *extra], capture_output=True, text=True, timeout=120)


def test_provisioning_writes_a_device_that_loads_and_is_enrolled(fleet, tmp_path) -> None:
    root = tmp_path / "sd"
    done = provision(fleet, root)
    assert done.returncode == 0, done.stderr
    etc = root / "etc" / "sos-device"
    config = load_device_config(etc / "device.toml")
    assert (config.device_id, config.kind, config.gps.port) == ("tok-amb-0412", "token",
                                                                "/dev/sos-gps")
    assert config.data_dir == root / "var" / "lib" / "sos-device"
    for key in ("device.key", "signing.key"):
        assert stat.S_IMODE((etc / key).stat().st_mode) == 0o600
    fleet.reload()
    identity = fleet.active("tok-amb-0412")
    assert identity.kind == "token" and identity.signing_key
    assert (root / "opt" / "sos-device" / "src" / "firmware" / "device.py").exists()
    units = root / "etc" / "systemd" / "system"
    assert "WatchdogSec=" in (units / "sos-device.service").read_text()
    assert (units / "multi-user.target.wants" / "sos-device.service").is_symlink()
    assert "gpiochip" in (root / "etc" / "udev" / "rules.d" / "99-sos-device.rules").read_text()
    assert "enable_uart=1" in (root / "boot" / "firmware" / "config.txt").read_text()
    assert os.readlink(units / "serial-getty@ttyAMA0.service") == "/dev/null"
    cmdline = root / "boot" / "firmware" / "cmdline.txt"
    assert not cmdline.exists()  # a directory, not a card: left missing, and said so
    assert f"missing    {cmdline} (left missing" in done.stdout


def test_a_stock_card_loses_its_serial_console_and_gets_a_block_every_board_applies(
        fleet, tmp_path) -> None:
    """The boot partition of a Raspberry Pi OS Bookworm card, provisioned twice: the golden
    files of tests/test_boot_config.py, byte for byte, and the second run changes nothing."""
    root = tmp_path / "sd"
    firmware = root / "boot" / "firmware"
    firmware.mkdir(parents=True)
    for name in ("config.txt", "cmdline.txt"):
        shutil.copy(BOOT_DATA / "stock-bookworm" / name, firmware / name)
    assert provision(fleet, root).returncode == 0
    for name in ("config.txt", "cmdline.txt"):
        assert (firmware / name).read_bytes() == (BOOT_DATA / name).read_bytes()
    again = provision(fleet, root)
    assert again.returncode == 0, again.stderr
    for name in ("config.txt", "cmdline.txt"):
        assert f"unchanged  {firmware / name}" in again.stdout
    units = root / "etc" / "systemd" / "system"
    assert f"unchanged  {units / 'serial-getty@ttyAMA0.service'} -> /dev/null" in again.stdout


def test_the_udev_rule_names_the_gpio14_15_uart_sos_gps(fleet, tmp_path) -> None:
    root = tmp_path / "sd"
    assert provision(fleet, root).returncode == 0
    rules = (root / "etc" / "udev" / "rules.d" / "99-sos-device.rules").read_text()
    assert ('SUBSYSTEM=="tty", KERNEL=="ttyAMA0", GROUP="dialout", MODE="0660", '
            'SYMLINK+="sos-gps"') in rules.splitlines()


def test_a_config_txt_block_without_its_end_is_refused_before_anything_is_enrolled(
        fleet, tmp_path) -> None:
    root = tmp_path / "sd"
    config_txt = root / "boot" / "firmware" / "config.txt"
    config_txt.parent.mkdir(parents=True)
    config_txt.write_text("arm_64bit=1\n# >>> sos-device (managed by sos-device provision; "
                          "do not edit inside)\nenable_uart=1\n")
    before = snapshot(fleet.directory)
    done = provision(fleet, root)
    assert done.returncode == 2 and "has no end line" in done.stderr
    assert snapshot(fleet.directory) == before
    assert not (root / "etc").exists()


def test_running_it_again_changes_nothing_and_keeps_other_config_txt_lines(fleet,
                                                                          tmp_path) -> None:
    root = tmp_path / "sd"
    config_txt = root / "boot" / "firmware" / "config.txt"
    config_txt.parent.mkdir(parents=True)
    config_txt.write_text("arm_64bit=1\n")
    assert provision(fleet, root).returncode == 0
    keys = {k: (root / "etc" / "sos-device" / k).read_bytes() for k in ("device.key",
                                                                        "signing.key")}
    again = provision(fleet, root)
    assert again.returncode == 0, again.stderr
    assert "unchanged  " + str(root / "etc" / "sos-device" / "device.toml") in again.stdout
    assert "unchanged  " + str(root / "etc" / "sos-device" / "device.pem") in again.stdout
    wheelhouse = root / "opt" / "sos-device" / "wheelhouse"
    assert f"unchanged  {wheelhouse} (" in again.stdout  # the firmware wheel: the same bytes
    assert keys == {k: (root / "etc" / "sos-device" / k).read_bytes() for k in keys}
    text = config_txt.read_text()
    assert text.startswith("arm_64bit=1\n") and text.count("enable_uart=1") == 1
    fleet.reload()
    assert [i.status for i in fleet.identities if i.name == "tok-amb-0412"] == ["active"]


def test_a_pillar_without_a_receiver_gets_its_surveyed_position(fleet, tmp_path) -> None:
    root = tmp_path / "sd"
    done = provision(fleet, root, "--gps-port", "none", "--surveyed", "52.37888,4.9003,1.2,1",
                     device_id="pil-ams-cs-01", profile="pillar")
    assert done.returncode == 0, done.stderr
    config = load_device_config(root / "etc" / "sos-device" / "device.toml")
    assert config.gps.port is None and config.gps.surveyed["lat"] == 52.37888
    assert not config.button.cancellable


@pytest.mark.parametrize(("args", "message"), [
    (("--id", "Tok_1"), "lower-case letters"),
    (("--broker", "nohostport"), "expected HOST:PORT"),
    (("--gps-port", "none"), "needs --surveyed"),
])
def test_bad_input_is_refused_with_the_reason(fleet, tmp_path, args, message) -> None:
    extra = dict(zip(args[::2], args[1::2], strict=True))
    done = provision(fleet, tmp_path / "sd", *[a for k, v in extra.items()
                                               if k == "--gps-port" for a in (k, v)],
                     device_id=extra.get("--id", "tok-amb-0412"),
                     broker=extra.get("--broker", "127.0.0.1:8883"))
    assert done.returncode == 2 and message in done.stderr


def test_a_provisioned_device_completes_paramedic_sos_from_its_directory_alone(
        fleet, tmp_path) -> None:
    port = free_port()
    root = tmp_path / "sd"
    assert provision(fleet, root, broker=f"127.0.0.1:{port}").returncode == 0
    done = subprocess.run(
        [sys.executable, "-m", "simulator.cli", "run", "paramedic-sos", "--json", "--speed", "4",
         "--fleet", str(fleet.directory), "--port", str(port),
         "--provisioned", f"tok-amb-0412={root}", "--enrol-sim-identities", "--no-browser"],
        capture_output=True, text=True, timeout=240)
    result = json.loads(done.stdout)
    assert result["ok"], result["problems"]
    (alert,) = result["alerts"]
    assert alert["device_id"] == "tok-amb-0412"
    assert (root / "var" / "lib" / "sos-device" / "outbox.sqlite").exists()  # it ran from there


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def test_a_target_that_does_not_exist_is_refused_and_nothing_is_made_or_enrolled(
        fleet, tmp_path) -> None:
    target = tmp_path / "media" / "rootfs"
    before = snapshot(fleet.directory)
    done = provision(fleet, target, mount=False)
    assert done.returncode == 2 and f"--target {target}: no such directory" in done.stderr
    assert not (tmp_path / "media").exists()
    assert snapshot(fleet.directory) == before


def test_a_target_that_is_a_file_is_refused(fleet, tmp_path) -> None:
    target = tmp_path / "rootfs.img"
    target.write_bytes(b"")
    before = snapshot(fleet.directory)
    done = provision(fleet, target, mount=False)
    assert done.returncode == 2 and f"--target {target}: not a directory" in done.stderr
    assert snapshot(fleet.directory) == before


def test_make_flash_refuses_a_target_that_does_not_exist_naming_it(fleet, tmp_path) -> None:
    target = tmp_path / "does" / "not" / "exist"
    before = snapshot(fleet.directory)
    done = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory",
         "-o", ".venv/.installed-stamp",  # never rebuild the shared virtualenv from a test
         "flash", "ID=tok-amb-0412", "PROFILE=token", f"TARGET={target}",
         f"FLEET={fleet.directory}", "BROKER=127.0.0.1:8883"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"TARGET={target}: not an existing directory" in done.stderr
    assert not (tmp_path / "does").exists()
    assert snapshot(fleet.directory) == before


CENTRE_SIDE = ("control_center", "provisioning", "simulator", "bench", "tests")


def test_make_flash_writes_no_centre_code_onto_the_card(fleet, tmp_path) -> None:
    """What is copied onto a device: the firmware and the two formats it shares with the
    centre, and no line of the centre (its CA code, its ingest server)."""
    target = tmp_path / "rootfs"
    target.mkdir()
    done = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", "-o", ".venv/.installed-stamp",
         "flash", "ID=tok-amb-0412", "PROFILE=token", f"TARGET={target}",
         f"FLEET={fleet.directory}", "BROKER=127.0.0.1:8883", f"ARGS={' '.join(OFFLINE)}"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = [p.relative_to(target) for p in target.rglob("*") if p.is_file()]
    src = target / "opt" / "sos-device" / "src"
    assert sorted(p.name for p in src.iterdir()) == [
        "README.md", "evidence_format", "firmware", "protocol", "pyproject.toml"]
    assert sorted(p.name for p in src.parent.iterdir()) == [
        "apt-packages.txt", "install", "src", "wheelhouse"]
    assert not [p for p in written if set(p.parts) & set(CENTRE_SIDE)]
    centre_imports = [p for p in src.rglob("*.py")
                      if any(f"{side}" in line for line in p.read_text().splitlines()
                             if line.lstrip().startswith(("import ", "from "))
                             for side in CENTRE_SIDE[:2])]
    assert not centre_imports


def test_the_cards_firmware_builds_into_a_wheel_of_the_device_packages_only(fleet,
                                                                          tmp_path) -> None:
    root = tmp_path / "sd"
    assert provision(fleet, root).returncode == 0
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(tmp_path / "wheels"),
         str(root / "opt" / "sos-device" / "src")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "wheels").glob("sos_device_firmware-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names
                            if n.endswith("entry_points.txt"))
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"evidence_format", "firmware", "protocol"}
    assert "sos-device = firmware.cli:main" in entry_points
    assert "sos-center" not in entry_points
    assert "firmware/config.schema.json" in names  # package data travels with it
    assert {"firmware/profiles/token.toml", "firmware/profiles/pillar.toml"} <= set(names)


def test_provisioning_again_removes_what_an_older_version_copied(fleet, tmp_path) -> None:
    root = tmp_path / "sd"
    src = root / "opt" / "sos-device" / "src"
    for stale in ("control_center", "hw/profiles"):
        (src / stale).mkdir(parents=True)
        (src / stale / "old.py").write_text("# copied by an older sos-device provision\n")
    (src / "notes.txt").write_text("someone's notes\n")
    assert provision(fleet, root).returncode == 0
    assert not (src / "control_center").exists() and not (src / "hw").exists()
    assert (src / "notes.txt").read_text() == "someone's notes\n"  # not ours: left alone


def test_a_firmware_directory_that_is_a_symlink_is_refused_and_nothing_is_deleted(
        fleet, tmp_path) -> None:
    elsewhere = tmp_path / "checkout"
    (elsewhere / "firmware").mkdir(parents=True)
    (elsewhere / "firmware" / "mine.py").write_text("# a developer's work\n")
    root = tmp_path / "sd"
    (root / "opt" / "sos-device").mkdir(parents=True)
    (root / "opt" / "sos-device" / "src").symlink_to(elsewhere)
    before = snapshot(fleet.directory)
    done = provision(fleet, root)
    assert done.returncode == 2 and "is a symlink or overlaps" in done.stderr
    assert (elsewhere / "firmware" / "mine.py").exists()
    assert snapshot(fleet.directory) == before
