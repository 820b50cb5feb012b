"""The control centre's configuration file (TOML, validated; errors name the key)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.configfile import check, load_schema, load_toml, subschema, with_defaults
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
class CenterConfig:
    db: Path
    fleet_dir: Path
    group: str
    operator: str
    broker: BrokerConfig
    live_dir: Path | None = None  # None: this instance does not receive live video
    signing_key: Path | None = None  # None: the fleet's shared command key (centre-signing.key)
    console: ConsoleConfig | None = None  # None: `serve` serves no web console


def load_center_config(path: str | Path) -> CenterConfig:
    """Load and validate; ConfigError naming the file and the key when anything is wrong."""
    path = Path(path)
    data = with_defaults(load_toml(path, SCHEMA), SCHEMA)
    base = path.parent

    def rel(p: str | None) -> str | None:
        return None if p is None else str(base / p)  # an absolute p wins in the join

    center, broker = data["center"], data["broker"]
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
    )


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


def _group(center: dict[str, Any], path: Path) -> str:
    """The configured group; a warning when a centre with a signing key of its own (another
    organisation's, as the schema describes `signing_key`) would join the project's group."""
    group = center["group"]
    if "signing_key" in center and group == DEFAULT_GROUP:
        log.warning("%s: this centre signs with its own key (center.signing_key) but joins the "
                    "group '%s' of the project's own centre: the broker will split alerts "
                    "between the two; set center.group to a group of its own", path, group)
    return group
