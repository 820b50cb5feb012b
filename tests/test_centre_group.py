"""The centre's shared-subscription group: the default is the project's own centre's, and a
centre with a signing key of its own (a partner's) left in it is warned about."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from control_center.config import DEFAULT_GROUP, load_center_config

SCHEMA = Path(__file__).resolve().parents[1] / "control_center" / "config.schema.json"


def center_toml(tmp_path: Path, **center: str) -> Path:
    extra = "".join(f'{key} = "{value}"\n' for key, value in center.items())
    path = tmp_path / "center.toml"
    path.write_text(f'[center]\ndb = "c.sqlite"\nfleet_dir = "fleet"\n{extra}'
                    '[broker]\nhost = "h"\nport = 8883\nca_file = "ca.pem"\n')
    return path


def test_the_default_group_is_the_projects_own_and_the_schema_says_so() -> None:
    group = json.loads(SCHEMA.read_text())["properties"]["center"]["properties"]["group"]
    assert group["default"] == DEFAULT_GROUP != "sos-center"
    assert "partner" in group["description"] and "its own" in group["description"]


def test_a_centre_without_a_group_joins_the_default(tmp_path: Path) -> None:
    assert load_center_config(center_toml(tmp_path)).group == DEFAULT_GROUP


def test_a_partner_centre_left_in_the_projects_group_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sos.center"):
        load_center_config(center_toml(tmp_path, signing_key="partner.key"))
    (record,) = caplog.records
    assert DEFAULT_GROUP in record.getMessage() and "center.group" in record.getMessage()


def test_a_partner_centre_in_a_group_of_its_own_is_not(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sos.center"):
        config = load_center_config(center_toml(tmp_path, signing_key="partner.key",
                                                group="partner-centre"))
    assert config.group == "partner-centre" and not caplog.records
