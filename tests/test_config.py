"""A wrong configuration fails at start-up with the key's name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from control_center.fleet import Fleet
from firmware.config import load_device_config, parse_device_config
from protocol.configfile import ConfigError
from protocol.signing import load_or_make_key

GOOD = """
[device]
id = "tok-001"
profile = "token"
data_dir = "data"
[broker]
host = "broker.example"
port = 8883
ca_file = "ca.pem"
[gps]
port = "/dev/serial0"
[trust]
centre_keys = ["11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="]
"""


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return Fleet.create(tmp_path_factory.mktemp("fleet") / "fleet").ca.cert_file.read_bytes()


@pytest.fixture(autouse=True)
def files_of_good(tmp_path: Path, ca_pem: bytes) -> None:
    """The files GOOD names, as provisioning leaves them: the CA and the signing key."""
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    load_or_make_key(tmp_path / "data" / "signing.key")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "device.toml"
    path.write_text(text)
    return path


def test_a_good_config_loads_with_the_profile_timings(tmp_path: Path) -> None:
    config = load_device_config(write(tmp_path, GOOD))
    assert (config.kind, config.button.trigger_hold_s, config.button.cancellable) == \
        ("token", 1.5, True)
    assert config.data_dir == tmp_path / "data"


@pytest.mark.parametrize(("remove", "key"), [
    ('host = "broker.example"\n', "broker.host"),
    ('id = "tok-001"\n', "device.id"),
    ('port = "/dev/serial0"\n', "gps.port"),
])
def test_a_missing_key_is_named(tmp_path: Path, remove: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"missing key '{key}'")):
        load_device_config(write(tmp_path, GOOD.replace(remove, "")))


def test_an_unknown_key_is_named_as_a_likely_typo(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("unknown key 'broker.hots'")):
        load_device_config(write(tmp_path, GOOD.replace("host =", "hots =")))


def test_a_centre_key_that_is_not_a_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("key 'trust.centre_keys[0]'")):
        load_device_config(write(tmp_path, GOOD.replace("11qYAYKx", "!!")))


def test_a_wrong_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("key 'broker.port'")):
        load_device_config(write(tmp_path, GOOD.replace("8883", '"8883"')))


def test_an_unknown_profile_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known: pillar, token"):
        load_device_config(write(tmp_path, GOOD.replace('"token"', '"toaster"')))


def test_sos_device_refuses_to_start_with_a_bad_config_and_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("port = 8883\n", ""))
    done = subprocess.run([sys.executable, "-m", "firmware.cli", "--config", str(path), "run"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "missing key 'broker.port'" in done.stderr


@pytest.mark.parametrize("name", ["device-token.toml", "device-pillar.toml"])
def test_the_example_device_configs_load(name: str) -> None:
    parse_device_config(Path(__file__).resolve().parents[1] / "hw" / "examples" / name)


def test_the_example_center_config_loads() -> None:
    from control_center.config import load_center_config

    load_center_config(Path(__file__).resolve().parents[1] / "hw" / "examples" / "center.toml")
