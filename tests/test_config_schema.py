"""One source per config key: each key's check, default and description are in its JSON Schema,
the code takes defaults from there, and a key the schema does not list is refused by name."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from control_center.config import CenterConfig, load_center_config
from firmware.config import DeviceConfig, parse_device_config
from firmware.simulated import configured_camera
from firmware.uplink.upload_settings import UploadSettings
from protocol.configfile import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = {
    "device": ROOT / "firmware" / "config.schema.json",
    "profile": ROOT / "firmware" / "profile.schema.json",
    "centre": ROOT / "control_center" / "config.schema.json",
}
CONFIG_MODULES = [ROOT / "firmware" / "config.py", ROOT / "control_center" / "config.py",
                  ROOT / "firmware" / "uplink" / "upload_settings.py"]
EXAMPLES = ROOT / "hw" / "examples"
RECIPIENT = "age1qqkqa53cx3cvgp2xnceqj633n2x4rysdung7zwmsjx58302s6ddsc7v9ln"


def schema(name: str) -> dict[str, Any]:
    return json.loads(SCHEMAS[name].read_text())


def keys(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted key, its schema) for every key of `node`, nested objects included."""
    for name, sub in node.get("properties", {}).items():
        yield f"{prefix}{name}", sub
        yield from keys(sub, f"{prefix}{name}.")


def objects(node: dict[str, Any], where: str = "(top level)") -> Iterator[tuple[str, dict]]:
    """(dotted key, its schema) for every object with properties, the top level included."""
    if "properties" in node:
        yield where, node
    for name, sub in node.get("properties", {}).items():
        yield from objects(sub, name if where == "(top level)" else f"{where}.{name}")


# -- the schema is the one source ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_key_in_a_schema_has_a_description(name: str) -> None:
    undescribed = [key for key, sub in keys(schema(name)) if not sub.get("description")]
    assert undescribed == []


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_object_in_a_schema_refuses_keys_it_does_not_list(name: str) -> None:
    open_objects = [key for key, sub in objects(schema(name))
                    if sub.get("additionalProperties") is not False]
    assert open_objects == []


def _literal_defaults(path: Path) -> Iterator[str]:
    """`x.get("key", <literal>)` calls and dataclass fields with a literal default (None, the
    mark of an absent optional key, aside): each writes a default the schema already has."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get" and len(node.args) == 2
                and all(isinstance(arg, ast.Constant) for arg in node.args)
                and node.args[1].value is not None):
            yield f"{path.name}:{node.lineno}: {ast.unparse(node)}"
        if isinstance(node, ast.ClassDef):
            for field in node.body:
                if (isinstance(field, ast.AnnAssign) and isinstance(field.value, ast.Constant)
                        and field.value.value is not None):
                    yield f"{path.name}:{field.lineno}: {ast.unparse(field)}"


def test_no_config_module_writes_a_default_the_schema_has() -> None:
    assert [hit for path in CONFIG_MODULES for hit in _literal_defaults(path)] == []


def test_a_key_a_profile_and_a_device_config_share_has_one_check() -> None:
    """The device config overrides the board's button timings and dock; both must accept the
    same values (the profile's alone may have a default)."""
    device, profile = dict(keys(schema("device"))), dict(keys(schema("profile")))

    def check_of(sub: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in sub.items() if k not in ("description", "default")}

    shared = sorted(set(device) & set(profile) - {"button", "upload"})
    assert shared == ["button.debounce_s", "button.trigger_hold_s", "upload.dock_active_high",
                      "upload.dock_pin"]
    assert [check_of(device[k]) for k in shared] == [check_of(profile[k]) for k in shared]


# -- the defaults the code sees are the schema's -------------------------------------------------

BARE_PROFILE = """\
kind = "token"
[button]
pin = 17
trigger_hold_s = 1.5
cancellable = true
[feedback]
led_pin = 27
[tamper]
pin = 26
"""

BARE_DEVICE = f"""\
[device]
id = "tok-001"
profile = "bare.toml"
data_dir = "data"
[broker]
host = "broker.example"
port = 8883
ca_file = "ca.pem"
[gps]
port = "/dev/serial0"
[gps.surveyed]
lat = 52.37888
lon = 4.90030
[trust]
centre_keys = ["11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="]
[camera]
[evidence]
recipients = ["{RECIPIENT}"]
[audio]
[voice]
[upload]
url = "https://ingest.example:8443"
"""

# Where each default of a schema shows in what the code builds.
DEVICE_DEFAULTS: dict[str, Callable[[DeviceConfig], Any]] = {
    "device.position_interval_s": lambda c: c.position_interval_s,
    "device.heartbeat_s": lambda c: c.heartbeat_s,
    "broker.keepalive_s": lambda c: c.broker.keepalive_s,
    "broker.reconnect_max_s": lambda c: c.broker.reconnect_max_s,
    "gps.baudrate": lambda c: c.gps.baudrate,
    "gps.live_max_age_s": lambda c: c.gps.live_max_age_s,
    "gps.surveyed.accuracy_m": lambda c: c.gps.surveyed["accuracy_m"],
    "camera.source": lambda c: c.camera.source,
    "camera.width": lambda c: c.camera.size[0],
    "camera.height": lambda c: c.camera.size[1],
    "camera.fps": lambda c: c.camera.fps,
    "camera.bitrate": lambda c: c.camera.bitrate,
    "camera.segment_s": lambda c: c.camera.segment_s,
    "camera.preroll_s": lambda c: c.camera.preroll_s,
    "camera.sync_interval_s": lambda c: c.camera.sync_interval_s,
    "upload.chunk_bytes": lambda c: c.upload.chunk_bytes,
    "upload.dock_active_high": lambda c: c.upload.dock_active_high,
    "upload.check_interval_s": lambda c: c.upload.check_interval_s,
    "upload.max_backoff_s": lambda c: c.upload.max_backoff_s,
    "audio.source": lambda c: c.audio.source,
    "audio.capture_device": lambda c: c.audio.capture_device,
    "audio.playback_device": lambda c: c.audio.playback_device,
    "audio.record": lambda c: c.audio.record,
    "voice.mode": lambda c: "auto" if c.voice.mode == "listen_in" else c.voice.mode,  # a token
    "voice.answer_within_s": lambda c: c.voice.answer_within_s,
    "voice.message_every_s": lambda c: c.voice.message_every_s,
    "voice.reconnect_s": lambda c: c.voice.reconnect_s,
    "voice.duplex": lambda c: c.voice.duplex,
}
PROFILE_DEFAULTS: dict[str, Callable[[DeviceConfig], Any]] = {
    "button.pull_up": lambda c: c.button.pull_up,
    "button.debounce_s": lambda c: c.button.debounce_s,
    "tamper.pull_up": lambda c: c.tamper.pull_up,
    "tamper.open_when": lambda c: "high" if c.tamper.open_when_high else "low",
    "tamper.debounce_s": lambda c: c.tamper.debounce_s,
}
CENTRE_DEFAULTS: dict[str, Callable[[CenterConfig], Any]] = {
    "center.group": lambda c: c.group,
    "center.operator": lambda c: c.operator,
    "center.timezone": lambda c: c.timezone,  # the defaults inside [[desks]] and [[webhooks]]:
                                              # tests/test_config_routes.py
    "center.incident_radius_m": lambda c: c.incident_radius_m,
    "center.incident_window_s": lambda c: c.incident_window_s,
    "console.listen": lambda c: c.console.listen,
    "console.port": lambda c: c.console.port,
    "console.exports_dir": lambda c: c.console.exports_dir.name,  # beside the config file
    "console.audit_log": lambda c: c.console.audit_log.name,
    "console.session_idle_h": lambda c: c.console.session_idle_h,
    "console.tiles_attribution": lambda c: c.console.tiles_attribution,
    "voice.ice_urls": lambda c: list(c.voice.ice_urls),
    "voice.credential_ttl_s": lambda c: c.voice.credential_ttl_s,
    "voice.answer_timeout_s": lambda c: c.voice.answer_timeout_s,
    "voice.relay_only": lambda c: c.voice.relay_only,
}


def defaults(name: str) -> dict[str, Any]:
    return {key: sub["default"] for key, sub in keys(schema(name)) if "default" in sub}


@pytest.fixture
def bare_device(tmp_path: Path) -> DeviceConfig:
    """A device config and a board profile that set only what they must."""
    (tmp_path / "bare.toml").write_text(BARE_PROFILE)
    (tmp_path / "device.toml").write_text(BARE_DEVICE)
    return parse_device_config(tmp_path / "device.toml")


@pytest.mark.parametrize(("name", "seen"), [("device", DEVICE_DEFAULTS),
                                            ("profile", PROFILE_DEFAULTS)])
def test_a_device_config_that_leaves_a_key_out_gets_the_schemas_default(
        bare_device: DeviceConfig, name: str, seen: dict[str, Callable[[DeviceConfig], Any]],
) -> None:
    expected = defaults(name)
    assert sorted(seen) == sorted(expected)  # a new default needs a line above
    assert {key: get(bare_device) for key, get in seen.items()} == expected


def test_a_centre_config_that_leaves_a_key_out_gets_the_schemas_default(tmp_path: Path) -> None:
    path = tmp_path / "center.toml"
    path.write_text('[center]\ndb = "c.sqlite"\nfleet_dir = "fleet"\n'
                    '[broker]\nhost = "h"\nport = 8883\nca_file = "ca.pem"\n'
                    '[console]\ncert_file = "console.pem"\nkey_file = "console.key"\n'
                    '[voice]\n')
    expected = defaults("centre")
    assert sorted(CENTRE_DEFAULTS) == sorted(expected)
    config = load_center_config(path)
    assert {key: get(config) for key, get in CENTRE_DEFAULTS.items()} == expected


# -- [upload] and the board's dock -------------------------------------------------------------

def _with_dock(tmp_path: Path, upload: str) -> DeviceConfig:
    (tmp_path / "bare.toml").write_text(BARE_PROFILE + "[upload]\ndock_pin = 5\n"
                                        "dock_active_high = false\n")
    (tmp_path / "device.toml").write_text(BARE_DEVICE + upload)
    return parse_device_config(tmp_path / "device.toml")


def test_the_board_profiles_dock_applies_when_the_device_config_leaves_it_out(
        tmp_path: Path) -> None:
    upload = _with_dock(tmp_path, "").upload
    assert upload is not None
    assert (upload.dock_pin, upload.dock_active_high) == (5, False)


def test_the_device_configs_upload_keys_win_over_the_board_profiles(tmp_path: Path) -> None:
    upload = _with_dock(tmp_path, "dock_pin = 6\ndock_active_high = true\n").upload
    assert upload is not None
    assert (upload.dock_pin, upload.dock_active_high) == (6, True)


@pytest.mark.parametrize(("key", "value"), [
    ("url", "1"), ("chunk_bytes", '"16M"'), ("dock_pin", "true"),
    ("dock_active_high", '"yes"'), ("station_host", "5"), ("station_port", '"8443"'),
    ("check_interval_s", '"30 s"'), ("max_backoff_s", "[300]"),
])
def test_an_upload_key_of_the_wrong_type_is_refused_naming_it(tmp_path: Path, key: str,
                                                              value: str) -> None:
    station = 'station_host = "station"\n' if key == "station_port" else ""
    (tmp_path / "bare.toml").write_text(BARE_PROFILE)
    (tmp_path / "device.toml").write_text(
        re.sub(r"^url = .*$", "", BARE_DEVICE, flags=re.MULTILINE)
        + f"url = {value}\n" if key == "url" else BARE_DEVICE + f"{station}{key} = {value}\n")
    with pytest.raises(ConfigError, match=re.escape(f"key 'upload.{key}': ")):
        parse_device_config(tmp_path / "device.toml")


@pytest.mark.parametrize(("url", "why"), [("https://ingest.example:99999", "Port out of range"),
                                          ("https://[::1", "Invalid IPv6 URL")])
def test_an_upload_url_the_schema_lets_through_is_refused_naming_the_key(url: str,
                                                                          why: str) -> None:
    """Checks the schema cannot express, still naming the key (and never a traceback)."""
    with pytest.raises(ConfigError, match=re.escape(f"key 'upload.url': {why}")):
        UploadSettings.from_dict({"url": url})


def test_an_upload_url_that_is_not_https_says_what_it_must_be() -> None:
    with pytest.raises(ConfigError, match=re.escape(
            "key 'upload.url': must be an https:// URL with a host")):
        UploadSettings.from_dict({"url": "http://ingest.example"})


# -- unknown and retired keys ---------------------------------------------------------------------

def _sections(example: str) -> list[str]:
    return re.findall(r"^\[([a-z.]+)\]", (EXAMPLES / example).read_text(), re.MULTILINE)


@pytest.mark.parametrize(("example", "section"), [
    *(("device-token.toml", s) for s in _sections("device-token.toml")),
    ("device-pillar.toml", "gps.surveyed"),
])
def test_an_unknown_key_in_any_device_section_is_refused_naming_it(
        tmp_path: Path, example: str, section: str) -> None:
    text = (EXAMPLES / example).read_text().replace(f"[{section}]", f"[{section}]\nbogus = 1", 1)
    (tmp_path / "device.toml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"unknown key '{section}.bogus'")):
        parse_device_config(tmp_path / "device.toml")


def test_an_unknown_section_of_a_device_config_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "device.toml").write_text((EXAMPLES / "device-token.toml").read_text()
                                          + "[bogus]\nx = 1\n")
    with pytest.raises(ConfigError, match=re.escape("unknown key 'bogus'")):
        parse_device_config(tmp_path / "device.toml")


@pytest.mark.parametrize("section", ["button", "feedback", "upload", "tamper"])
def test_an_unknown_key_in_any_profile_section_is_refused_naming_it(tmp_path: Path,
                                                                    section: str) -> None:
    profile = BARE_PROFILE + "[upload]\n"
    (tmp_path / "bare.toml").write_text(profile.replace(f"[{section}]", f"[{section}]\nbogus = 1"))
    (tmp_path / "device.toml").write_text(BARE_DEVICE)
    with pytest.raises(ConfigError, match=re.escape(f"bare.toml: unknown key '{section}.bogus'")):
        parse_device_config(tmp_path / "device.toml")


@pytest.mark.parametrize("section", ["center", "broker"])
def test_an_unknown_key_in_any_centre_section_is_refused_naming_it(tmp_path: Path,
                                                                   section: str) -> None:
    text = (EXAMPLES / "center.toml").read_text().replace(f"[{section}]", f"[{section}]\nbogus = 1")
    (tmp_path / "center.toml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"unknown key '{section}.bogus'")):
        load_center_config(tmp_path / "center.toml")


def test_a_centre_client_id_is_refused_saying_it_is_no_longer_used(tmp_path: Path) -> None:
    """The broker makes the certificate's name the client id; a config that still sets one
    would mislead its reader."""
    text = (EXAMPLES / "center.toml").read_text().replace(
        "[center]", '[center]\nclient_id = "sos-center-1"')
    (tmp_path / "center.toml").write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_center_config(tmp_path / "center.toml")
    assert str(refused.value) == (
        f"{tmp_path / 'center.toml'}: key 'center.client_id' is no longer used (the broker "
        "uses the certificate's name as the client id); remove the line")


# -- camera.source --------------------------------------------------------------------------------

def _camera(tmp_path: Path, source: str) -> DeviceConfig:
    (tmp_path / "bare.toml").write_text(BARE_PROFILE)
    (tmp_path / "device.toml").write_text(
        BARE_DEVICE.replace("[camera]", f'[camera]\nsource = "{source}"\nwidth = 320\n'
                            "height = 240"))
    return parse_device_config(tmp_path / "device.toml")


def test_camera_source_synthetic_runs_the_synthetic_camera_on_real_hardware(
        tmp_path: Path) -> None:
    """A bench device without a sensor records a test pattern."""
    camera = configured_camera(_camera(tmp_path, "synthetic"))
    assert type(camera).__name__ == "SyntheticCamera"


def test_camera_source_picamera2_leaves_the_camera_to_the_runtimes_picamera2(
        tmp_path: Path) -> None:
    """What every provisioned card says: it loads, and the runtime opens the Pi's camera."""
    assert configured_camera(_camera(tmp_path, "picamera2")) is None


def test_an_unknown_camera_source_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("key 'camera.source'")):
        _camera(tmp_path, "webcam")


def test_an_odd_video_size_is_refused_naming_the_key(tmp_path: Path) -> None:
    """picamera2 would round 321 down to 320 without a word; the recording must be the size
    the config and the segments' metadata say."""
    (tmp_path / "bare.toml").write_text(BARE_PROFILE)
    (tmp_path / "device.toml").write_text(
        BARE_DEVICE.replace("[camera]", '[camera]\nwidth = 321\nheight = 240'))
    with pytest.raises(ConfigError, match=re.escape("key 'camera.width': must be an even")):
        parse_device_config(tmp_path / "device.toml")
