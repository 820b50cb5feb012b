"""The card installs itself at first boot with no network: the firmware's wheel and every
dependency's are on it (`make flash` lays them down), the image brings the apt packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from control_center.fleet import Fleet
from provisioning.provision import apt_packages, platform_tags
from tests.wheelhouse_fixture import host_wheelhouse  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
# What the image's apt packages give Python, stood in for by empty modules: this is no Pi.
APT_MODULES = ("lgpio", "libcamera", "picamera2")


def no_network() -> bool:
    """`unshare -rn`: a network namespace with only a loopback that is down."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rn", "true"], capture_output=True, check=False).returncode == 0


needs_netns = pytest.mark.skipif(not no_network(), reason="needs `unshare -rn` (a network "
                                 "namespace) to prove the install uses no network")


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.create(tmp_path / "fleet")


def flash(fleet: Fleet, root: Path, *args: str) -> Path:
    """`sos-provision` onto `root`; returns the card's /opt/sos-device."""
    root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "provisioning.cli", "--id", "tok-amb-0412", "--profile", "token",
         "--target", str(root), "--fleet", str(fleet.directory), "--broker", "127.0.0.1:8883",
         *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return root / "opt" / "sos-device"


def image_modules(directory: Path) -> Path:
    for name in APT_MODULES:
        (directory / name).mkdir(parents=True)
        (directory / name / "__init__.py").write_text("")
    return directory


def first_boot(prefix: Path, cwd: Path, *, pythonpath: Path | None,
               netns: bool = True) -> subprocess.CompletedProcess[str]:
    """What sos-device-setup.service runs (`sh /opt/sos-device/install /opt/sos-device`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    command = ["sh", str(prefix / "install"), str(prefix)]
    return subprocess.run(["unshare", "-rn", *command] if netns else command, env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@needs_netns
def test_a_card_installs_offline_and_sos_device_runs_from_the_result(
        fleet, tmp_path, host_wheelhouse) -> None:  # noqa: F811
    prefix = flash(fleet, tmp_path / "sd", "--platform", "host", "--wheelhouse",
                   str(host_wheelhouse))
    done = first_boot(prefix, tmp_path, pythonpath=image_modules(tmp_path / "image"))
    assert done.returncode == 0, done.stderr
    assert "installed sos_device_firmware-" in done.stderr
    venv = prefix / ".venv"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for args in (["--help"], ["selftest", "--help"]):
        ran = subprocess.run(["unshare", "-rn", str(venv / "bin" / "sos-device"), *args],
                             env=clean, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.startswith(f"usage: sos-device {' '.join(args[:-1])}".rstrip())
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import firmware, av; print(firmware.__file__, av.__file__)"],
                           env=clean, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert all(Path(p).is_relative_to(venv) for p in where.stdout.split()), where.stdout

    again = first_boot(prefix, tmp_path, pythonpath=tmp_path / "image")
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_a_missing_apt_package_is_named_in_one_line_and_nothing_is_installed(
        fleet, tmp_path, host_wheelhouse) -> None:  # noqa: F811
    prefix = flash(fleet, tmp_path / "sd", "--platform", "host", "--wheelhouse",
                   str(host_wheelhouse))
    image = image_modules(tmp_path / "image")
    shutil.rmtree(image / "lgpio")
    done = first_boot(prefix, tmp_path, pythonpath=image, netns=False)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("sos-device-setup: the image lacks apt packages: "
                           "python3-lgpio (import lgpio); install them on the image")
    assert not (prefix / ".venv").exists()


@needs_netns
def test_a_missing_camera_package_is_a_warning_and_the_device_is_installed(
        fleet, tmp_path, host_wheelhouse) -> None:  # noqa: F811
    """The SOS path must not wait for the camera, at first boot either."""
    prefix = flash(fleet, tmp_path / "sd", "--platform", "host", "--wheelhouse",
                   str(host_wheelhouse))
    image = image_modules(tmp_path / "image")
    shutil.rmtree(image / "picamera2")
    done = first_boot(prefix, tmp_path, pythonpath=image)
    assert done.returncode == 0, done.stderr
    (warning,) = [line for line in done.stderr.splitlines() if "warning" in line]
    assert "python3-picamera2 (import picamera2)" in warning and "without its camera" in warning
    assert (prefix / ".venv" / "bin" / "sos-device").exists()


def test_the_install_is_not_marked_done_before_its_files_are_synced() -> None:
    """The stamp is written (via a temp file and a rename) only after a sync, so a power cut
    never leaves a stamp over a half-written venv."""
    script = (REPO / "hw" / "sos-device-install").read_text().splitlines()
    sync, stamp = script.index("sync"), script.index('mv "$STAMP.tmp" "$STAMP"')
    assert sync < stamp and 'printf \'%s\\n\' "$wanted" >"$STAMP.tmp"' in script[sync + 1]


def test_the_apt_packages_are_named_in_one_place_and_the_card_carries_that_list(
        fleet, tmp_path, host_wheelhouse) -> None:  # noqa: F811
    assert apt_packages() == ["python3-venv", "python3-lgpio", "python3-libcamera",
                              "python3-picamera2"]
    prefix = flash(fleet, tmp_path / "sd", "--platform", "host", "--wheelhouse",
                   str(host_wheelhouse))
    assert ((prefix / "apt-packages.txt").read_bytes()
            == (REPO / "hw" / "pi-apt-packages.txt").read_bytes())


def test_the_first_boot_unit_needs_no_network_and_runs_the_cards_install() -> None:
    unit = (REPO / "hw" / "systemd" / "sos-device-setup.service").read_text()
    assert "network" not in "\n".join(line for line in unit.splitlines()
                                      if not line.startswith("#"))
    assert "ExecStart=/bin/sh /opt/sos-device/install /opt/sos-device" in unit.splitlines()


def test_the_device_unit_does_not_wait_for_a_network_at_boot() -> None:
    """On a closed or absent network, network-online.target can hold a unit for a minute and a
    half; the SOS button must work at once (the outbox keeps the alert meanwhile)."""
    unit = (REPO / "hw" / "systemd" / "sos-device.service").read_text().splitlines()
    assert "network-online" not in "\n".join(line for line in unit if not line.startswith("#"))
    assert "Requires=sos-device-setup.service" in unit


def test_a_glibc_platform_takes_every_older_manylinux_wheel() -> None:
    """pip takes a manylinux_X_Y --platform literally; the Pi runs any wheel up to glibc 2.36:
    cryptography's aarch64 wheels are manylinux2014, av's manylinux_2_28."""
    tags = platform_tags("manylinux_2_36_aarch64")
    assert tags[0] == "manylinux_2_36_aarch64"
    assert {"manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"} <= set(
        tags)
    assert not [t for t in tags if not t.endswith("_aarch64")]
    assert platform_tags("linux_armv7l") == ["linux_armv7l"]


@pytest.mark.slow
def test_make_flash_lays_an_aarch64_or_pure_python_wheel_of_every_dependency(
        fleet, tmp_path) -> None:
    """NETWORK, about 40 MB (av's aarch64 wheel alone is 34 MB): `make soak`, not `make test`.
    The card `make flash` writes for a Pi, unchanged: every requirement of the firmware, and
    theirs, as a wheel for CPython 3.11 on aarch64 (or for any platform)."""
    target = tmp_path / "rootfs"
    target.mkdir()
    done = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", "-o", ".venv/.installed-stamp",
         "flash", "ID=tok-amb-0412", "PROFILE=token", f"TARGET={target}",
         f"FLEET={fleet.directory}", "BROKER=127.0.0.1:8883"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    wheels = {}
    for wheel in (target / "opt" / "sos-device" / "wheelhouse").glob("*.whl"):
        name, _version, _build, tags = parse_wheel_filename(wheel.name)
        wheels[name] = tags
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {canonicalize_name(Requirement(d).name) for d in project["dependencies"]}
    assert required <= set(wheels), required - set(wheels)
    for name, tags in wheels.items():
        assert any(t.platform == "any" or t.platform.endswith("_aarch64") for t in tags), name
        assert any(t.interpreter in ("py3", "cp311") or t.abi == "abi3" for t in tags), name
    assert "sos-device-firmware" in wheels
    assert {t.platform for t in wheels["av"]} & set(platform_tags("manylinux_2_36_aarch64"))
