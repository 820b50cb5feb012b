"""The device's configuration: a TOML file plus the board profile it names (firmware/profiles/)."""

from __future__ import annotations

import os
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.uplink.upload_settings import UploadSettings
from protocol.configfile import (
    ConfigError,
    annotated,
    check,
    directory_or_creatable,
    existing,
    load_schema,
    load_toml,
    no_file_in_the_way,
    pem_certificates,
    pem_private_key,
    subschema,
    with_defaults,
)
from protocol.mqtt import BrokerConfig
from protocol.signing import load_key, public_key_from_b64

# Package data, so an installed firmware (a wheel, not this source tree) has its boards.
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class ButtonConfig:
    pin: int | str
    pull_up: bool
    debounce_s: float
    trigger_hold_s: float
    cancellable: bool


@dataclass(frozen=True)
class FeedbackConfig:
    led_pin: int | str
    buzzer_pin: int | str | None
    vibration_pin: int | str | None


@dataclass(frozen=True)
class LightsConfig:
    yellow_pin: int | str  # alarm registered (EN 81-28)
    green_pin: int | str  # voice connected


@dataclass(frozen=True)
class TamperConfig:
    pin: int | str
    pull_up: bool
    open_when_high: bool  # the pin level that means the door is open
    debounce_s: float


@dataclass(frozen=True)
class GpsConfig:
    port: str | None  # None: no receiver fitted, the surveyed position is used
    baudrate: int
    live_max_age_s: float
    surveyed: dict[str, float] | None


@dataclass(frozen=True)
class CameraConfig:
    source: str  # which camera records: "picamera2" or "synthetic" (firmware/simulated.py)
    size: tuple[int, int]
    fps: int
    bitrate: int
    segment_s: float
    preroll_s: float
    sync_interval_s: float  # at most this much recorded video is lost to a power cut


@dataclass(frozen=True)
class AudioConfig:
    source: str  # "alsa" (a microphone on the Pi) or "wav" (a file played in a loop)
    capture_device: str  # ALSA PCM of the microphone
    playback_device: str  # ALSA PCM of the speaker
    wav_file: str | None  # source = wav: what the microphone plays
    record: bool  # sound in the evidence segments and the live view


@dataclass(frozen=True)
class VoiceConfig:
    mode: str  # "two_way", "listen_in" or "off" ("auto" resolved by the device's kind)
    answer_within_s: float  # two_way: the spoken message plays if nobody connected by then
    message_every_s: float  # ... and again this often until somebody does
    message_file: str | None  # None: the built-in message (firmware/voice/sounds/)
    reconnect_s: float  # a dropped call is waited for this long before it is reported failed
    duplex: str  # "full", or "half": the microphone muted while the operator's voice plays


@dataclass(frozen=True)
class DeviceConfig:
    device_id: str
    kind: str
    data_dir: Path
    position_interval_s: float
    heartbeat_s: float
    broker: BrokerConfig
    gps: GpsConfig
    button: ButtonConfig
    feedback: FeedbackConfig
    pin_factory: str | None
    battery_sysfs: str | None
    signing_key: Path
    centre_keys: list[str]
    config_file: str  # the TOML it was read from: relative paths in it are relative to it
    camera: CameraConfig | None = None
    evidence_recipients: tuple[str, ...] = ()
    upload: UploadSettings | None = None  # None: this device does not upload recordings
    live_recipients: tuple[str, ...] = ()  # who can watch the live view during an SOS
    audio: AudioConfig | None = None  # None: no microphone or speaker
    voice: VoiceConfig | None = None  # None: no voice call (no [audio], or mode = "off")
    lights: LightsConfig | None = None  # None: no status lamps (the board profile's [lights])
    tamper: TamperConfig | None = None  # None: no door switch (the board profile's [tamper])


def _resolve_profile(name: str, base: Path) -> Path:
    as_path = (base / name) if not Path(name).is_absolute() else Path(name)
    if name.endswith(".toml") and as_path.exists():
        return as_path
    candidate = PROFILES_DIR / f"{name}.toml"
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.toml")))
    raise ConfigError(
        f"key 'device.profile': no profile '{name}' (known: {known}, or a .toml path)"
    )


Check = Callable[[Path], object]  # raises ConfigError `PATH: what is wrong`


def readable_wav(path: Path) -> None:
    """A WAV the device plays (the simulated microphone, the spoken message) must open."""
    try:
        with wave.open(str(path), "rb") as wav:
            if wav.getnframes() == 0:
                raise ConfigError(f"{path}: the WAV file holds no sound")
    except (OSError, EOFError, wave.Error) as exc:
        raise ConfigError(f"{path}: not a readable WAV file ({exc})") from None



@dataclass(frozen=True)
class FileRule:
    """What a file named by the config must be: the schema's `"x-file"` beside a path key
    names its rule, so each key's description, default and check sit together."""

    at_start: Check | None  # `run` (and selftest) refuse to start unless it passes
    thorough: Check | None = None  # check-config also wants this; the running device copes

FILE_RULES: dict[str, FileRule] = {
    "certificates": FileRule(pem_certificates),
    "private-key": FileRule(pem_private_key),
    "signing-key": FileRule(load_key),  # never made at start: only provisioning enrols one
    # A partition not mounted yet or a read-only card is the storage self-test's to report
    # (with its fix) and may mend by itself; a data_dir that names a file does not.
    "data-dir": FileRule(no_file_in_the_way, thorough=directory_or_creatable),
    # Hardware the running device retries: an SOS button without GPS still raises alerts.
    "device-node": FileRule(None, thorough=existing),
    "wav": FileRule(readable_wav),
}


def load_device_config(path: str | Path, *, thorough: bool = False) -> DeviceConfig:
    """Load and validate; raise ConfigError naming the file and key when anything is wrong.

    The files the device opens at start must exist and be what their key says; `thorough`
    (check-config) also wants what the running device copes without: the hardware it retries,
    a data_dir it can make and write.
    """
    data, config = _parse(Path(path))
    _check_files(data, config, thorough=thorough)
    return config


def parse_device_config(path: str | Path) -> DeviceConfig:
    """The config as written, without looking at the files it names (an example config, or a
    card's config read on the workstation)."""
    return _parse(Path(path))[1]


def _parse(path: Path) -> tuple[dict[str, Any], DeviceConfig]:
    data = load_toml(path, load_schema("firmware", "config.schema.json"))
    base = path.parent
    profile_path = _resolve_profile(data["device"]["profile"], base)
    profile = load_toml(profile_path, load_schema("firmware", "profile.schema.json"))
    return data, build_config(data, profile, config_file=str(path), base=base)


def _check_files(data: dict[str, Any], config: DeviceConfig, *, thorough: bool) -> None:
    """Every file the config names (its schema's `x-file` keys) against its FILE_RULES entry,
    relative paths from the config's directory; ConfigError `FILE: key 'KEY': PATH: why`."""
    schema = load_schema("firmware", "config.schema.json")
    base = Path(config.config_file).parent
    # The default signing key (in data_dir) is checked as if it had been written out.
    default_key = os.path.abspath(config.signing_key)
    data = {**data, "device": {"signing_key": default_key, **data["device"]}}
    for key, value, kind in annotated(data, schema, "x-file"):
        rule = FILE_RULES[kind]
        checks = (rule.at_start, rule.thorough) if thorough else (rule.at_start,)
        for check_file in filter(None, checks):
            try:
                check_file(Path(os.path.normpath(base / value)))
            except ConfigError as exc:
                raise ConfigError(f"{config.config_file}: key '{key}': {exc}") from None


def build_config(data: dict[str, Any], profile: dict[str, Any], *, config_file: str,
                 base: Path) -> DeviceConfig:
    """The DeviceConfig of a parsed config over its board profile. Every default comes from the
    schemas (`with_defaults`); what a schema cannot say (one key needing another, a key that
    must parse) is checked here, naming the key."""
    schema = load_schema("firmware", "config.schema.json")
    check(data, schema, config_file)
    profile = with_defaults(profile, load_schema("firmware", "profile.schema.json"))
    if "upload" in data:  # the board's dock under the device's own [upload] keys
        data = {**data, "upload": {**profile.get("upload", {}), **data["upload"]}}
    data = with_defaults(data, schema)
    dev, brk, gps = data["device"], data["broker"], data["gps"]
    button = {**profile["button"], **data.get("button", {})}

    def rel(p: str | None) -> str | None:
        """Relative paths are relative to the config file (normalised: no `..` left)."""
        return None if p is None else os.path.normpath(base / p)

    surveyed = gps.get("surveyed")
    if "port" not in gps and surveyed is None:
        raise ConfigError(f"{config_file}: missing key 'gps.port' (or gps.surveyed for a device "
                          "without a receiver)")
    if surveyed is not None:
        surveyed = {"alt_m": None, **surveyed}
    return DeviceConfig(
        device_id=dev["id"],
        kind=profile["kind"],
        data_dir=Path(rel(dev["data_dir"]) or "."),
        position_interval_s=float(dev["position_interval_s"]),
        heartbeat_s=float(dev["heartbeat_s"]),
        broker=BrokerConfig(
            host=brk["host"],
            port=brk["port"],
            ca_file=rel(brk["ca_file"]),
            cert_file=rel(brk.get("cert_file")),
            key_file=rel(brk.get("key_file")),
            keepalive_s=brk["keepalive_s"],
            reconnect_max_s=float(brk["reconnect_max_s"]),
        ),
        gps=GpsConfig(
            port=gps.get("port"),
            baudrate=gps["baudrate"],
            live_max_age_s=float(gps["live_max_age_s"]),
            surveyed=surveyed,
        ),
        button=ButtonConfig(
            pin=button["pin"],
            pull_up=button["pull_up"],
            debounce_s=float(button["debounce_s"]),
            trigger_hold_s=float(button["trigger_hold_s"]),
            cancellable=bool(button["cancellable"]),
        ),
        feedback=FeedbackConfig(
            led_pin=profile["feedback"]["led_pin"],
            buzzer_pin=profile["feedback"].get("buzzer_pin"),
            vibration_pin=profile["feedback"].get("vibration_pin"),
        ),
        pin_factory=profile.get("pin_factory"),
        battery_sysfs=data.get("battery", {}).get("sysfs"),
        signing_key=Path(rel(dev.get("signing_key")) or Path(rel(dev["data_dir"]) or ".")
                         / "signing.key"),
        centre_keys=_centre_keys(data["trust"]["centre_keys"], config_file),
        config_file=config_file,
        camera=_camera(data, config_file),
        evidence_recipients=tuple(data.get("evidence", {}).get("recipients", ())),
        upload=_upload(data, config_file),
        live_recipients=tuple(data.get("live", {}).get("recipients", ())),
        audio=_audio(data, config_file, rel),
        voice=_voice(data, profile["kind"], config_file, rel),
        lights=_lights(profile),
        tamper=_tamper(profile),
    )


def _lights(profile: dict[str, Any]) -> LightsConfig | None:
    lights = profile.get("lights")
    if lights is None:
        return None
    return LightsConfig(yellow_pin=lights["yellow_pin"], green_pin=lights["green_pin"])


def _tamper(profile: dict[str, Any]) -> TamperConfig | None:
    tamper = profile.get("tamper")
    if tamper is None:
        return None
    return TamperConfig(pin=tamper["pin"], pull_up=bool(tamper["pull_up"]),
                        open_when_high=tamper["open_when"] == "high",
                        debounce_s=float(tamper["debounce_s"]))


def _upload(data: dict[str, Any], config_file: str) -> UploadSettings | None:
    """The `[upload]` section (the board profile's keys under it), or None without one."""
    if "upload" not in data:
        return None
    try:
        return UploadSettings.from_dict(data["upload"])
    except ConfigError as exc:
        raise ConfigError(f"{config_file}: {exc}") from None


def _centre_keys(keys: list[str], config_file: str) -> list[str]:
    for index, key in enumerate(keys):
        try:
            public_key_from_b64(key)
        except ValueError as exc:
            raise ConfigError(f"{config_file}: key 'trust.centre_keys[{index}]': {exc}") from None
    return keys


def _audio(data: dict[str, Any], config_file: str,
           rel: Callable[[str | None], str | None]) -> AudioConfig | None:
    audio = data.get("audio")
    if audio is None:
        return None
    if audio["source"] == "wav" and "wav_file" not in audio:
        raise ConfigError(f"{config_file}: missing key 'audio.wav_file' (audio.source = \"wav\" "
                          "plays a WAV file as the microphone)")
    return AudioConfig(source=audio["source"], capture_device=audio["capture_device"],
                       playback_device=audio["playback_device"],
                       wav_file=rel(audio.get("wav_file")), record=bool(audio["record"]))


def _voice(data: dict[str, Any], kind: str, config_file: str,
           rel: Callable[[str | None], str | None]) -> VoiceConfig | None:
    voice = with_defaults(data.get("voice", {}),
                          subschema(load_schema("firmware", "config.schema.json"), "voice"))
    mode = voice["mode"]
    if mode == "auto":
        mode = "two_way" if kind == "pillar" else "listen_in"
    if mode == "off":
        return None
    if "audio" not in data:
        if "voice" in data:
            raise ConfigError(f"{config_file}: key 'voice.mode': a voice call needs the device's "
                              "microphone: add an [audio] section, or set voice.mode = \"off\"")
        return None  # a device without sound has no voice call, and says so in no key
    return VoiceConfig(mode=mode, answer_within_s=float(voice["answer_within_s"]),
                       message_every_s=float(voice["message_every_s"]),
                       message_file=rel(voice.get("message_file")),
                       reconnect_s=float(voice["reconnect_s"]), duplex=voice["duplex"])


def _camera(data: dict[str, Any], config_file: str) -> CameraConfig | None:
    camera = data.get("camera")
    if camera is None:
        return None
    if not data.get("evidence", {}).get("recipients"):
        raise ConfigError(f"{config_file}: missing key 'evidence.recipients' (recordings must be "
                          "encrypted to the control centre; `sos-provision` writes it)")
    return CameraConfig(
        source=camera["source"],
        size=(camera["width"], camera["height"]),
        fps=camera["fps"], bitrate=camera["bitrate"],
        segment_s=float(camera["segment_s"]),
        preroll_s=float(camera["preroll_s"]),
        sync_interval_s=float(camera["sync_interval_s"]))
