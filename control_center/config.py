"""The control centre's configuration file (TOML, validated; errors name the key)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from control_center.routing import IMPLICIT_DESK, Desk, RouteTable, unknown_desk
from protocol.configfile import (
    ConfigError,
    check,
    load_schema,
    load_toml,
    pem_certificates,
    problem,
    read_regular_file,
    subschema,
    with_defaults,
)
from protocol.mqtt import BrokerConfig

log = logging.getLogger("sos.center")
SCHEMA = load_schema("control_center", "config.schema.json")  # every key, check and default

# The shared-subscription group of THIS project's centre instances (`$share/<group>/...`): the
# broker hands each alert, update and event to ONE member of a group. The members must be our
# instances, sharing one store. Another organisation's centre (a partner's) in this group would
# silently take a share of our alerts, store them in its own database and receipt them, so the
# devices stop re-sending and our operators never see them: it needs a group of its own (a
# separate group gets its own copy of every message). MQTT does not tell a subscriber who else
# is in its group, so this cannot be detected from inside; it is documented (docs/FLASHING.md).
DEFAULT_GROUP: str = subschema(SCHEMA, "center", "group")["default"]
DEFAULT_TIMEZONE: str = subschema(SCHEMA, "center", "timezone")["default"]
DEFAULT_INCIDENT_RADIUS_M: float = subschema(SCHEMA, "center", "incident_radius_m")["default"]
DEFAULT_INCIDENT_WINDOW_S: float = subschema(SCHEMA, "center", "incident_window_s")["default"]
MIN_WEBHOOK_SECRET = 32  # bytes: an HMAC-SHA256 key shorter than its output weakens it


def _items(name: str) -> dict[str, Any]:
    """The schema of one entry of the array of tables `name` ([[desks]], [[routes]], ...):
    `with_defaults` does not go into arrays, so each entry is completed with this."""
    items: dict[str, Any] = subschema(SCHEMA, name)["items"]
    return items


def implicit_routes(timezone: str = DEFAULT_TIMEZONE) -> RouteTable:
    """The route table of a config without [[routes]]: every alert to the one desk 'all', as
    before routing existed; its escalation delay is the schema's default for a desk."""
    desk = with_defaults({"id": IMPLICIT_DESK, "name": "All operators"}, _items("desks"))
    return RouteTable.implicit_table(
        Desk(id=desk["id"], name=desk["name"], operators=tuple(desk["operators"]),
             escalate_after_s=float(desk["escalate_after_s"])), timezone)


@dataclass(frozen=True)
class WebhookConfig:
    """One `[[webhooks]]` target (the sender is control_center/webhook.py). The key is read at
    load, so a missing or short key stops the centre at start, not at its first alert; it is
    kept out of repr so it never reaches a log or a traceback."""

    name: str
    url: str
    secret_file: Path
    secret: bytes = field(repr=False)
    events: tuple[str, ...]
    desks: tuple[str, ...] | None = None  # None: alerts routed to any desk
    ca_file: Path | None = None  # None: the system's CA store

    def wants(self, event: str, desks: Sequence[str]) -> bool:
        """Whether `event` ("alert", "escalated", "closed") of an alert routed to `desks` is
        sent to this target: one of its events, and one of its desks (or any desk)."""
        return event in self.events and (self.desks is None
                                         or any(d in self.desks for d in desks))


@dataclass(frozen=True)
class ConsoleConfig:
    """The web console (`[console]`); paths are resolved beside the config file."""

    listen: str
    port: int
    cert_file: Path
    key_file: Path
    exports_dir: Path
    audit_log: Path
    session_idle_h: float
    tiles_attribution: str
    tiles_url: str | None = None
    evidence_dir: Path | None = None


@dataclass(frozen=True)
class VoiceSettings:
    """Voice calls between a pillar and the console (`[voice]`). The TURN secret is read at
    load, so a missing file stops the centre at start, not at the first call; it is kept out of
    repr. Minting credentials from it: control_center/turn_credentials.py."""

    ice_urls: tuple[str, ...]
    credential_ttl_s: int
    answer_timeout_s: float
    relay_only: bool  # the browser uses the TURN relay only (iceTransportPolicy relay)
    turn_secret_file: Path | None = None  # None: no TURN URL, nothing to mint
    turn_secret: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class CenterConfig:
    db: Path
    fleet_dir: Path
    group: str
    operator: str
    broker: BrokerConfig
    live_dir: Path | None = None  # None: this instance does not receive live video
    signing_key: Path | None = None  # None: the fleet's shared command key (centre-signing.key)
    console: ConsoleConfig | None = None  # None: `serve` serves no web console
    voice: VoiceSettings | None = None  # None: the console offers no voice calls
    timezone: str = DEFAULT_TIMEZONE  # IANA name; the `hours` of routes are local to it
    routes: RouteTable = field(default_factory=implicit_routes)  # always a table
    webhooks: tuple[WebhookConfig, ...] = ()
    incident_radius_m: float = DEFAULT_INCIDENT_RADIUS_M
    incident_window_s: float = DEFAULT_INCIDENT_WINDOW_S


def load_center_config(path: str | Path) -> CenterConfig:
    """Load and validate; ConfigError naming the file and the key when anything is wrong."""
    path = Path(path)
    data = load_toml(path, {})  # parsed only: checked below, naming entries of arrays as [i]
    text = problem(data, SCHEMA)
    if text is not None:
        raise ConfigError(f"{path}: {_indexed(text)}")
    data = with_defaults(data, SCHEMA)
    base = path.parent

    def rel(p: str | None) -> str | None:
        return None if p is None else str(base / p)  # an absolute p wins in the join

    center, broker = data["center"], data["broker"]
    try:
        routes = route_table(data, center["timezone"])
        webhooks = _webhooks(data.get("webhooks", []), base, routes)
        voice = voice_settings(data["voice"], base) if "voice" in data else None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return CenterConfig(
        db=Path(rel(center["db"]) or ""),
        fleet_dir=Path(rel(center["fleet_dir"]) or ""),
        group=_group(center, path),
        operator=center["operator"],
        broker=BrokerConfig(broker["host"], broker["port"], ca_file=rel(broker["ca_file"]),
                            cert_file=rel(broker.get("cert_file")),
                            key_file=rel(broker.get("key_file"))),
        live_dir=Path(rel(center["live_dir"]) or "") if "live_dir" in center else None,
        signing_key=Path(rel(center["signing_key"]) or "") if "signing_key" in center else None,
        console=_console(data["console"], base) if "console" in data else None,
        voice=voice,
        timezone=center["timezone"], routes=routes, webhooks=webhooks,
        incident_radius_m=center["incident_radius_m"],
        incident_window_s=center["incident_window_s"],
    )


def _indexed(text: str) -> str:
    """A schema problem with the array indexes in its key written `routes[2].desks` (the
    checker joins them with dots, `routes.2.desks`), as the route table's own checks and a
    reader counting [[routes]] entries expect."""
    return re.sub(r"key '([^']*)'",
                  lambda m: "key '" + re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", m.group(1)) + "'",
                  text)


def route_table(data: dict[str, Any], timezone: str) -> RouteTable:
    """The configured route table, or the implicit one. Desks without routes are refused:
    every alert would go to the implicit desk 'all', and the desks would never see one."""
    if "routes" not in data:
        if "desks" in data:
            raise ConfigError("key 'desks': desks are defined but there are no [[routes]] to "
                              "send alerts to them (without [[routes]] every alert goes to one "
                              "desk, 'all'): add [[routes]], ending with a rule without "
                              "conditions")
        return implicit_routes(timezone)
    desks = [with_defaults(d, _items("desks")) for d in data.get("desks", [])]
    return RouteTable.from_config(desks, data["routes"], timezone)


def _webhooks(sections: list[dict[str, Any]], base: Path,
              routes: RouteTable) -> tuple[WebhookConfig, ...]:
    hooks: list[WebhookConfig] = []
    for index, section in enumerate(sections):
        if any(h.name == section["name"] for h in hooks):
            raise ConfigError(f"key 'webhooks[{index}].name': webhook '{section['name']}' is "
                              "defined twice (the name keys its deliveries in the store)")
        hooks.append(_webhook(index, section, base, routes))
    return tuple(hooks)


def _webhook(index: int, section: dict[str, Any], base: Path,
             routes: RouteTable) -> WebhookConfig:
    key = f"webhooks[{index}]"
    section = with_defaults(section, _items("webhooks"))
    _check_url(f"{key}.url", section["url"])
    for desk_id in section.get("desks", []):
        if desk_id not in routes.desk_ids:
            raise unknown_desk(f"{key}.desks", desk_id, routes.desk_ids)
    secret_file = base / section["secret_file"]
    ca_file = base / section["ca_file"] if "ca_file" in section else None
    if ca_file is not None:
        try:
            pem_certificates(ca_file)
        except (ConfigError, OSError) as exc:
            raise ConfigError(f"key '{key}.ca_file': {exc}") from None
    return WebhookConfig(name=section["name"], url=section["url"], secret_file=secret_file,
                         secret=_secret(f"{key}.secret_file", secret_file),
                         events=tuple(section["events"]),
                         desks=tuple(section["desks"]) if "desks" in section else None,
                         ca_file=ca_file)


def _check_url(key: str, url: str) -> None:
    """What the schema's pattern cannot say about an https URL, naming the key."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError as exc:
        raise ConfigError(f"key '{key}': {exc}") from None
    if not parts.hostname:
        raise ConfigError(f"key '{key}': has no host ({url!r})")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"key '{key}': must not carry a user or password (it would be "
                          "written in logs): the POSTs are signed with secret_file instead")


def _secret(key: str, path: Path) -> bytes:
    """The HMAC key in `path`, without one trailing newline (so `openssl rand -hex 32 > FILE`
    and the hex text the receiver is given are the same key)."""
    try:
        secret = read_regular_file(path)
    except ConfigError as exc:
        raise ConfigError(f"key '{key}': {exc}") from None
    secret = secret.removesuffix(b"\n").removesuffix(b"\r")
    if len(secret) < MIN_WEBHOOK_SECRET:
        raise ConfigError(f"key '{key}': {path}: the key is {len(secret)} bytes; it must be at "
                          f"least {MIN_WEBHOOK_SECRET} (e.g. openssl rand -hex 32 > FILE)")
    return secret


def console_config(section: dict[str, Any], base: Path) -> ConsoleConfig:
    """A `[console]` section given in code (the simulator's, a test's): checked against the
    schema and completed with its defaults, as from a file; relative paths beside `base`."""
    check(section, subschema(SCHEMA, "console"), "console")
    return _console(with_defaults(section, subschema(SCHEMA, "console")), base)


def _console(section: dict[str, Any], base: Path) -> ConsoleConfig:
    return ConsoleConfig(
        listen=section["listen"], port=section["port"],
        cert_file=base / section["cert_file"], key_file=base / section["key_file"],
        exports_dir=base / section["exports_dir"], audit_log=base / section["audit_log"],
        session_idle_h=section["session_idle_h"], tiles_url=section.get("tiles_url"),
        tiles_attribution=section["tiles_attribution"],
        evidence_dir=base / section["evidence_dir"] if "evidence_dir" in section else None,
    )


def voice_settings(section: dict[str, Any], base: Path) -> VoiceSettings:
    """A `[voice]` section (from the file, or given in code by the simulator or a test):
    checked against the schema and completed with its defaults; a relative turn_secret_file
    is beside `base`. A turn: URL without a secret, or a secret file that is missing, empty or
    not one line, is refused naming the key."""
    check(section, subschema(SCHEMA, "voice"), "voice")
    section = with_defaults(section, subschema(SCHEMA, "voice"))
    urls = tuple(section["ice_urls"])
    secret_file = base / section["turn_secret_file"] if "turn_secret_file" in section else None
    if section["relay_only"] and not any(u.startswith(("turn:", "turns:")) for u in urls):
        raise ConfigError("key 'voice.relay_only': needs a turn: or turns: URL in "
                          "voice.ice_urls (a relay to send the call through)")
    if secret_file is None and any(u.startswith(("turn:", "turns:")) for u in urls):
        raise ConfigError("key 'voice.turn_secret_file': missing: voice.ice_urls has a TURN "
                          "server, whose credentials are minted from its shared secret (coturn's "
                          "static-auth-secret)")
    return VoiceSettings(
        ice_urls=urls, credential_ttl_s=section["credential_ttl_s"],
        answer_timeout_s=float(section["answer_timeout_s"]), turn_secret_file=secret_file,
        turn_secret=None if secret_file is None else _turn_secret(secret_file),
        relay_only=bool(section["relay_only"]))


def _turn_secret(path: Path) -> bytes:
    """The shared secret in `path` without one trailing newline: the same bytes as coturn's
    `static-auth-secret=` line, which is one line of text without spaces."""
    key = "voice.turn_secret_file"
    try:
        secret = read_regular_file(path)
    except ConfigError as exc:
        raise ConfigError(f"key '{key}': {exc}") from None
    secret = secret.removesuffix(b"\n").removesuffix(b"\r")
    if not secret:
        raise ConfigError(f"key '{key}': {path}: is empty; put the TURN server's "
                          "static-auth-secret in it (e.g. openssl rand -hex 32 > FILE)")
    if not secret.isascii() or any(c <= 0x20 or c == 0x7F for c in secret):
        raise ConfigError(f"key '{key}': {path}: must be one line of printable ASCII without "
                          "spaces, as coturn's static-auth-secret= line takes it")
    return secret


def _group(center: dict[str, Any], path: Path) -> str:
    """The configured group; a warning when a centre with a signing key of its own (another
    organisation's, as the schema describes `signing_key`) would join the project's group."""
    group = center["group"]
    if "signing_key" in center and group == DEFAULT_GROUP:
        log.warning("%s: this centre signs with its own key (center.signing_key) but joins the "
                    "group '%s' of the project's own centre: the broker will split alerts "
                    "between the two; set center.group to a group of its own", path, group)
    return group
