"""A wrong configuration, or a file it names that is missing or wrong, stops `sos-device` with
one line naming the file and the key, and a non-zero exit; never a traceback, never a key of its
own making."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from control_center.fleet import Fleet
from firmware.config import load_device_config
from protocol.configfile import ConfigError, check

CONFIG = """\
[device]
id = "tok-001"
profile = "token"
data_dir = "data"
signing_key = "signing.key"
[broker]
host = "127.0.0.1"
port = 1
ca_file = "ca.pem"
cert_file = "device.pem"
key_file = "device.key"
[gps.surveyed]
lat = 52.37888
lon = 4.90030
[trust]
centre_keys = ["{centre_key}"]
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device directory as provisioning leaves it: config, CA, certificate and both keys."""
    root = tmp_path_factory.mktemp("template")
    fleet = Fleet.create(root / "fleet")
    device = root / "device"
    pair = fleet.enrol_local("tok-001", "token", device)
    pair.cert_file.rename(device / "device.pem")
    pair.key_file.rename(device / "device.key")
    shutil.copy(fleet.ca.cert_file, device / "ca.pem")
    (device / "data").mkdir()
    (device / "device.toml").write_text(
        CONFIG.format(centre_key=fleet.centre_public_keys()[0]))
    done = sos_device(device / "device.toml")
    assert done.returncode == 0, done.stderr  # so each refusal below is the one thing broken
    return device


@pytest.fixture
def device(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template device directory, to break one thing in."""
    return Path(shutil.copytree(template, tmp_path / "device"))


def sos_device(config: Path, action: str = "check-config") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", "--config", str(config),
                           action], capture_output=True, text=True, timeout=60)


def assert_refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2 and exactly one line on stderr that contains every word."""
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def edit(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


# -- the signing key: only provisioning makes one -------------------------------------------------

def test_check_config_refuses_a_missing_signing_key_and_says_to_provision(device: Path) -> None:
    (device / "signing.key").unlink()
    done = sos_device(device / "device.toml")
    assert_refused(done, str(device / "device.toml"), "key 'device.signing_key'",
                   str(device / "signing.key"), "sos-provision", "docs/FLASHING.md")


def test_run_refuses_to_start_without_its_signing_key_and_makes_none(device: Path) -> None:
    (device / "signing.key").unlink()
    done = sos_device(device / "device.toml", "run")
    assert_refused(done, "key 'device.signing_key'", str(device / "signing.key"))
    assert not (device / "signing.key").exists()


def test_the_runtime_never_makes_a_signing_key_that_went_missing(device: Path) -> None:
    from firmware.device import DeviceRuntime

    config = load_device_config(device / "device.toml")
    (device / "signing.key").unlink()
    with pytest.raises(ConfigError, match="sos-provision"):
        DeviceRuntime(config, pin_factory=MockFactory())
    assert not (device / "signing.key").exists()


@pytest.mark.parametrize(("content", "what"), [
    (b"not a key\n", "not a PEM Ed25519 private key"),
    (None, "not an Ed25519 private key"),  # the TLS key (EC) in its place
])
def test_a_signing_key_that_is_not_an_ed25519_pem_key_is_named(device: Path, content, what) -> None:
    key = device / "signing.key"
    key.write_bytes(content if content is not None else (device / "device.key").read_bytes())
    assert_refused(sos_device(device / "device.toml"), "key 'device.signing_key'", str(key), what)


# -- the broker's certificates and key ------------------------------------------------------------

@pytest.mark.parametrize(("key", "name"), [
    ("broker.ca_file", "ca.pem"), ("broker.cert_file", "device.pem"),
    ("broker.key_file", "device.key"),
])
def test_a_missing_tls_file_is_named(device: Path, key: str, name: str) -> None:
    (device / name).unlink()
    assert_refused(sos_device(device / "device.toml"), str(device / "device.toml"),
                   f"key '{key}'", str(device / name), "no such file")


@pytest.mark.parametrize(("key", "name", "what"), [
    ("broker.ca_file", "ca.pem", "not a PEM certificate"),
    ("broker.cert_file", "device.pem", "not a PEM certificate"),
    ("broker.key_file", "device.key", "not a PEM private key"),
])
def test_a_tls_file_with_the_wrong_content_is_named(device: Path, key: str, name: str,
                                                    what: str) -> None:
    (device / name).write_text("-----BEGIN NONSENSE-----\n")
    assert_refused(sos_device(device / "device.toml"), f"key '{key}'", str(device / name), what)


def test_a_certificate_file_that_is_a_directory_is_named(device: Path) -> None:
    (device / "ca.pem").unlink()
    (device / "ca.pem").mkdir()
    assert_refused(sos_device(device / "device.toml"), "key 'broker.ca_file'", "is a directory")


# -- data_dir and the hardware --------------------------------------------------------------------

def test_a_data_dir_that_is_a_file_is_named(device: Path) -> None:
    (device / "data").rmdir()
    (device / "data").write_text("")
    assert_refused(sos_device(device / "device.toml"), "key 'device.data_dir'",
                   str(device / "data"), "not a directory")


def test_check_config_refuses_a_data_dir_that_cannot_be_made(device: Path) -> None:
    (device / "not-mounted").write_text("")
    edit(device / "device.toml", 'data_dir = "data"', 'data_dir = "not-mounted/data"')
    assert_refused(sos_device(device / "device.toml"), "key 'device.data_dir'",
                   str(device / "not-mounted" / "data"), "cannot be made")


def test_check_config_accepts_a_data_dir_that_can_be_made(device: Path) -> None:
    edit(device / "device.toml", 'data_dir = "data"', 'data_dir = "var/lib/sos"')
    done = sos_device(device / "device.toml")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.startswith(f"{device / 'device.toml'}: ok ")


def test_check_config_refuses_a_gps_port_that_does_not_exist(device: Path) -> None:
    edit(device / "device.toml", "[gps.surveyed]", '[gps]\nport = "/dev/no-such-gps"\n'
         "[gps.surveyed]")
    assert_refused(sos_device(device / "device.toml"), "key 'gps.port'", "/dev/no-such-gps")


def test_the_config_load_of_run_does_not_refuse_an_absent_gps_receiver(device: Path) -> None:
    """An SOS button without a position still raises alerts: `sos-device run` loads its config
    without check-config's thorough checks (load_device_config, not thorough), which accept a
    receiver that is not there. That the runtime then retries it is tests/test_gps_reader.py."""
    edit(device / "device.toml", "[gps.surveyed]", '[gps]\nport = "/dev/no-such-gps"\n'
         "[gps.surveyed]")
    assert load_device_config(device / "device.toml").gps.port == "/dev/no-such-gps"


# -- numbers --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("add", "key", "value"), [
    ("[button]\ntrigger_hold_s = nan\n", "button.trigger_hold_s", "nan"),
    ("[button]\ndebounce_s = inf\n", "button.debounce_s", "inf"),
    ("[camera]\npreroll_s = -inf\n", "camera.preroll_s", "-inf"),
    ('[upload]\nurl = "https://ingest.example"\ncheck_interval_s = nan\n',
     "upload.check_interval_s", "nan"),
])
def test_a_number_that_is_not_finite_is_named(device: Path, add: str, key: str,
                                              value: str) -> None:
    config = device / "device.toml"
    config.write_text(config.read_text() + add)
    assert_refused(sos_device(config), str(config), f"key '{key}'", f"{value} is not a finite")


def test_a_gps_position_that_is_not_finite_is_named(device: Path) -> None:
    edit(device / "device.toml", "lat = 52.37888", "lat = nan")
    assert_refused(sos_device(device / "device.toml"), "key 'gps.surveyed.lat'")


def test_any_config_refuses_non_finite_numbers_whatever_its_schema() -> None:
    """The centre's config goes through the same check."""
    with pytest.raises(ConfigError, match=r"center.toml: key 'a.b\[1\]': nan is not a finite"):
        check({"a": {"b": [1.0, float("nan")]}}, {"type": "object"}, "center.toml")


# -- keys ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("add", "key"), [
    ('[upload]\nurl = "https://ingest.example"\nchunk_bytes = "16M"\n', "upload.chunk_bytes"),
    ('[upload]\nurl = "https://ingest.example"\ndock_pin = true\n', "upload.dock_pin"),
    ('[upload]\nurl = "ingest.example"\n', "upload.url"),
])
def test_check_config_names_an_upload_key_whose_value_cannot_work(device: Path, add: str,
                                                                  key: str) -> None:
    config = device / "device.toml"
    config.write_text(config.read_text() + add)
    assert_refused(sos_device(config), str(config), f"key '{key}': ")


@pytest.mark.parametrize(("add", "key"), [
    ('[upload]\nurl = "https://ingest.example"\nchunk_size = 4096\n', "upload.chunk_size"),
    ("[battery]\nsysfs = \"/sys\"\nvoltage = 3\n", "battery.voltage"),
])
def test_check_config_names_a_key_nothing_reads(device: Path, add: str, key: str) -> None:
    config = device / "device.toml"
    config.write_text(config.read_text() + add)
    assert_refused(sos_device(config), str(config), f"unknown key '{key}'")


# -- the config file itself -----------------------------------------------------------------------

@pytest.mark.parametrize(("content", "what"), [
    (b"\xff\xfe\x00\x01binary", "not a text file"),
    ('[device]\nid = "caf\u00e9"\n'.encode("latin-1"), "not UTF-8"),
])
def test_a_config_that_is_not_text_is_one_line(tmp_path: Path, content: bytes,
                                               what: str) -> None:
    config = tmp_path / "device.toml"
    config.write_bytes(content)
    assert_refused(sos_device(config), str(config), what)


def test_a_config_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    assert_refused(sos_device(tmp_path), str(tmp_path), "is a directory")
