"""Scenarios are data: TOML files in simulator/scenarios/, validated on load."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from protocol.configfile import ConfigError, check, load_toml

ACTIONS = ("press", "cancel", "kill", "start", "broker_stop", "broker_start",
           "call_start", "call_end", "dock", "undock")
DEVICE_ACTIONS = ("press", "cancel", "kill", "start", "call_start", "call_end", "dock", "undock")

_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "description", "devices", "timeline"],
    "properties": {
        "name": {"type": "string"},
        "description": {"type": "string"},
        "duration_s": {"type": "number", "exclusiveMinimum": 0},
        "operator_ack_delay_s": {"type": "number", "minimum": 0},
        "operator_close_delay_s": {"type": "number", "minimum": 0},
        "devices": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["id", "profile"],
            "properties": {
                "id": {"type": "string"},
                "profile": {"enum": ["token", "pillar"]},
                "battery": {"type": "number", "minimum": 0, "maximum": 100},
                "gps": {"type": "object", "additionalProperties": False, "required": ["route"],
                        "properties": {
                            "route": {"type": "array", "minItems": 1, "items": {
                                "type": "array", "minItems": 2, "maxItems": 2,
                                "items": {"type": "number"}}},
                            "speed_mps": {"type": "number", "minimum": 0},
                            "noise_m": {"type": "number", "minimum": 0},
                            "dropouts": {"type": "array", "items": {
                                "type": "array", "minItems": 2, "maxItems": 2}},
                            "drift_ppm": {"type": "number"}}},
                "surveyed": {"type": "object"},
                "camera": {"type": "boolean", "description":
                           "records evidence video, streams it live during an SOS and "
                           "uploads it when docked"},
                "segment_s": {"type": "number", "minimum": 1},
            }}},
        "timeline": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["at_s", "action"],
            "properties": {
                "at_s": {"type": "number", "minimum": 0},
                "action": {"enum": list(ACTIONS)},
                "device": {"type": "string"},
                "hold_s": {"type": "number", "exclusiveMinimum": 0},
                "expect_alert": {"type": "boolean"},
                "call_id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"},
            }}},
    },
}


@dataclass(frozen=True)
class DeviceSpec:
    id: str
    profile: str
    battery: float | None
    gps: dict[str, Any] | None
    surveyed: dict[str, float] | None
    camera: bool = False
    segment_s: float = 10.0


@dataclass(frozen=True)
class Step:
    at_s: float
    action: str
    device: str | None = None
    hold_s: float | None = None
    expect_alert: bool = True
    call_id: str | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    devices: list[DeviceSpec]
    timeline: list[Step]
    duration_s: float = 60.0
    operator_ack_delay_s: float = 2.0
    operator_close_delay_s: float = 8.0
    source: Path = field(default=Path("."))

    @property
    def records(self) -> bool:
        return any(d.camera for d in self.devices)

    @property
    def expected_alerts(self) -> int:
        return sum(1 for s in self.timeline if s.action == "press" and s.expect_alert)


def scenario_dir() -> Path:
    return Path(str(resources.files("simulator").joinpath("scenarios")))


def available() -> list[str]:
    return sorted(p.stem for p in scenario_dir().glob("*.toml"))


def load_scenario(name_or_path: str) -> Scenario:
    path = Path(name_or_path)
    if not path.suffix:
        path = scenario_dir() / f"{name_or_path}.toml"
        if not path.exists():
            raise ConfigError(f"no scenario '{name_or_path}' (known: {', '.join(available())})")
    data = load_toml(path, _SCHEMA)
    ids = {d["id"] for d in data["devices"]}
    for step in data["timeline"]:
        check(step, _SCHEMA["properties"]["timeline"]["items"], str(path))
        needs_device = step["action"] in DEVICE_ACTIONS
        if needs_device and step.get("device") not in ids:
            raise ConfigError(f"{path}: timeline step at {step['at_s']} s: key 'device' must "
                              f"name one of {sorted(ids)}")
    return Scenario(
        name=data["name"],
        description=" ".join(data["description"].split()),
        devices=[DeviceSpec(d["id"], d["profile"], d.get("battery"), d.get("gps"),
                            d.get("surveyed"), d.get("camera", False), d.get("segment_s", 10.0))
                 for d in data["devices"]],
        timeline=sorted((Step(**s) for s in data["timeline"]), key=lambda s: s.at_s),
        duration_s=data.get("duration_s", 60.0),
        operator_ack_delay_s=data.get("operator_ack_delay_s", 2.0),
        operator_close_delay_s=data.get("operator_close_delay_s", 8.0),
        source=path,
    )
