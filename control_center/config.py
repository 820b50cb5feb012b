"""The control centre's configuration file (TOML, validated; errors name the key)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protocol.configfile import load_schema, load_toml
from protocol.mqtt import BrokerConfig


@dataclass(frozen=True)
class CenterConfig:
    db: Path
    fleet_dir: Path
    client_id: str
    group: str
    operator: str
    broker: BrokerConfig
    live_dir: Path | None = None  # None: this instance does not receive live video


def load_center_config(path: str | Path) -> CenterConfig:
    path = Path(path)
    data = load_toml(path, load_schema("control_center", "config.schema.json"))
    base = path.parent

    def rel(p: str | None) -> str | None:
        return None if p is None else str(base / p)  # an absolute p wins in the join

    center, broker = data["center"], data["broker"]
    return CenterConfig(
        db=Path(rel(center["db"]) or ""),
        fleet_dir=Path(rel(center["fleet_dir"]) or ""),
        client_id=center.get("client_id", "sos-center-1"),
        group=center.get("group", "sos-center"),
        operator=center.get("operator", "operator"),
        broker=BrokerConfig(broker["host"], broker["port"], ca_file=rel(broker["ca_file"]),
                            cert_file=rel(broker.get("cert_file")),
                            key_file=rel(broker.get("key_file"))),
        live_dir=Path(rel(center["live_dir"]) or "") if "live_dir" in center else None,
    )
