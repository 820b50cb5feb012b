"""Scenarios are data: TOML files in simulator/scenarios/, validated on load.

A scenario may route its alerts as a centre does: `[[desks]]` and `[[routes]]` in exactly the
shape of the centre's config (docs/ROUTING.md), checked by the same schema and built by the same
loader, so a route table tried in the simulator is one `center.toml` accepts; `[center] timezone`
for rules with `hours`. `[webhook]` runs a local HTTPS receiver that the centre's signed webhooks
go to (simulator/webhook_receiver.py). A press step with `operator = "ignore"` is an alert the
automatic operator leaves untaken for `operator_ignore_s`, so it escalates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from control_center import config as centre_config
from control_center.config import SCHEMA as CENTRE_SCHEMA
from control_center.routing import RouteTable, unknown_desk
from protocol.configfile import ConfigError, check, load_toml, subschema

ACTIONS = ("press", "cancel", "kill", "start", "broker_stop", "broker_start",
           "call_start", "call_end", "dock", "undock")
DEVICE_ACTIONS = ("press", "cancel", "kill", "start", "call_start", "call_end", "dock", "undock")

_WEBHOOK_KEYS: dict[str, Any] = subschema(CENTRE_SCHEMA, "webhooks")["items"]["properties"]
DEFAULT_IGNORE_S = 30.0

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
        "operator_ignore_s": {"type": "number", "exclusiveMinimum": 0, "description":
                              "scenario seconds an alert pressed with operator = 'ignore' stays "
                              "untaken; then the automatic operator acknowledges and closes it "
                              "as any other, so the run can end"},
        "center": {"type": "object", "additionalProperties": False, "properties": {
            "timezone": subschema(CENTRE_SCHEMA, "center", "timezone")}},
        # The centre's own schemas: a table that loads here loads in center.toml.
        "desks": subschema(CENTRE_SCHEMA, "desks"),
        "routes": subschema(CENTRE_SCHEMA, "routes"),
        "webhook": {"type": "object", "additionalProperties": False,
                    "description": "run a local HTTPS receiver and send the centre's signed "
                                   "webhooks to it",
                    "properties": {
                        "events": _WEBHOOK_KEYS["events"],
                        "desks": _WEBHOOK_KEYS["desks"]}},
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
                "operator": {"enum": ["ignore"], "description":
                             "press only: the automatic operator leaves this alert untaken for "
                             "the scenario's operator_ignore_s, so it escalates"},
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
    operator: str | None = None  # "ignore": the automatic operator leaves the alert untaken


@dataclass(frozen=True)
class WebhookSpec:
    """`[webhook]`: the run starts a receiver and the centre sends it these `events` of alerts
    routed to `desks` (None: every alert), as a `[[webhooks]]` entry would."""

    events: tuple[str, ...]
    desks: tuple[str, ...] | None = None


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
    # Routing as a centre's config has it (None: no [[routes]], no routing, as before it).
    routes: RouteTable | None = None
    webhook: WebhookSpec | None = None
    operator_ignore_s: float = DEFAULT_IGNORE_S

    @property
    def records(self) -> bool:
        return any(d.camera for d in self.devices)

    @property
    def routed(self) -> bool:
        """Whether the run's centre routes and escalates alerts (and notifies a webhook):
        a scenario with [[routes]] or a [webhook]. Without either the centre runs as before
        routing, so the scenarios written before it run unchanged."""
        return self.routes is not None or self.webhook is not None

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
        if "operator" in step and (step["action"] != "press"
                                   or not step.get("expect_alert", True)):
            raise ConfigError(f"{path}: timeline step at {step['at_s']} s: key 'operator' is "
                              "for a press that raises an alert (action = 'press', "
                              "expect_alert not false)")
    routes = _routes(data, path)
    if routes is None and "webhook" not in data and any(
            "operator" in step for step in data["timeline"]):
        raise ConfigError(f"{path}: key 'operator': an ignored alert escalates only in a "
                          "scenario that routes alerts: add [[desks]] and [[routes]]")
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
        routes=routes,
        webhook=_webhook(data, routes, path),
        operator_ignore_s=data.get("operator_ignore_s", DEFAULT_IGNORE_S),
    )


def _routes(data: dict[str, Any], path: Path) -> RouteTable | None:
    """The scenario's route table, built by the centre's own loader (the same defaults and
    refusals as center.toml: desks without routes, a last rule with conditions, a cycle)."""
    if "routes" not in data and "desks" not in data:
        return None
    timezone = data.get("center", {}).get("timezone", centre_config.DEFAULT_TIMEZONE)
    try:
        return centre_config.route_table(data, timezone)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _webhook(data: dict[str, Any], routes: RouteTable | None, path: Path) -> WebhookSpec | None:
    """`[webhook]`, its desks checked against the route table (the implicit desk 'all'
    without [[routes]]), as the centre's loader checks a `[[webhooks]]` entry."""
    if "webhook" not in data:
        return None
    section = data["webhook"]
    desks = section.get("desks")
    known = routes.desk_ids if routes is not None else centre_config.implicit_routes().desk_ids
    for desk_id in desks or ():
        if desk_id not in known:
            raise ConfigError(f"{path}: {unknown_desk('webhook.desks', desk_id, known)}")
    return WebhookSpec(events=tuple(section.get("events", _WEBHOOK_KEYS["events"]["default"])),
                       desks=tuple(desks) if desks is not None else None)
