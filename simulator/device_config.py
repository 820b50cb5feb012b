"""The TOML config of a simulated device: the same keys as on a real one (firmware/config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simulator.broker import PrivateBroker

# The simulated dock's GPIO input (firmware/profiles has none: a real dock is wired per board, or
# detected by the station network).
DOCK_PIN = 24


def render_device_toml(*, device_id: str, profile: str, data_dir: Path, broker: PrivateBroker,
                       gps_port: str | None = None, surveyed: dict[str, Any] | None = None,
                       position_interval_s: float = 5.0, heartbeat_s: float = 30.0,
                       camera: bool = False, segment_s: float = 10.0,
                       preroll_s: float = 30.0, upload_url: str | None = None,
                       dock_pin: int = DOCK_PIN, microphone_wav: Path | None = None,
                       voice: dict[str, Any] | None = None) -> str:
    """Enrols `device_id` in the broker's fleet (keys made in its identity directory) and
    returns its config. `microphone_wav`: the device has sound, its microphone playing this
    WAV in a loop (and, on a pillar, its speaker writing data_dir/speaker.wav); `voice`: keys
    of its [voice] section (the profile's defaults without)."""
    b = broker.identity(device_id, profile)
    keys = ", ".join(f'"{k}"' for k in broker.fleet.centre_public_keys())
    lines = [
        "[device]", f'id = "{device_id}"', f'profile = "{profile}"', f'data_dir = "{data_dir}"',
        f'signing_key = "{broker.signing_key_file(device_id)}"',
        f"position_interval_s = {position_interval_s}", f"heartbeat_s = {heartbeat_s}",
        "", "[broker]", f'host = "{b.host}"', f"port = {b.port}", f'ca_file = "{b.ca_file}"',
        f'cert_file = "{b.cert_file}"', f'key_file = "{b.key_file}"', "reconnect_max_s = 1.0",
        "", "[trust]", f"centre_keys = [{keys}]",
        "", "[gps]",
    ]
    if gps_port:
        lines.append(f'port = "{gps_port}"')
    if camera:  # small frames: the simulator's camera encodes on the desktop's CPU
        recipients = ", ".join(f'"{r}"' for r in broker.fleet.evidence_recipients())
        live = ", ".join(f'"{r}"' for r in broker.fleet.live_recipients())
        section = [
            "[evidence]", f"recipients = [{recipients}]", "",
            "[camera]", 'source = "synthetic"', "width = 320", "height = 240", "fps = 15",
            "bitrate = 400000", f"segment_s = {segment_s}", f"preroll_s = {preroll_s}", ""]
        if live:
            section += ["[live]", f"recipients = [{live}]", ""]
        if upload_url:  # docked = the simulator drives this mock pin high
            section += ["[upload]", f'url = "{upload_url}"', f"dock_pin = {dock_pin}",
                        "check_interval_s = 1.0", "max_backoff_s = 5.0", ""]
        lines[lines.index("[gps]"):lines.index("[gps]")] = section
    if microphone_wav is not None:
        lines[lines.index("[gps]"):lines.index("[gps]")] = [
            "[audio]", 'source = "wav"', f'wav_file = "{microphone_wav}"', "",
            "[voice]", *(f"{k} = {_toml(v)}" for k, v in (voice or {}).items()), ""]
    if surveyed:
        lines += ["", "[gps.surveyed]"] + [f"{k} = {v}" for k, v in surveyed.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower() \
        if isinstance(value, bool) else str(value)
