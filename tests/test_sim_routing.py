"""`sos-sim run two-districts --json` end to end: the centre routes each alert to its district's
desks, an alert nobody takes climbs its desks' chain to the supervisors, and the run's webhook
receiver gets every notification once, each signature checked.

The scenario runs once (at speed 2: escalate_after_s are scenario seconds, so the steps come
twice as fast) and the tests read different parts of its --json; the run itself waits on its
own events (the alerts closed, the webhooks delivered), never on a fixed sleep."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from protocol.configfile import ConfigError
from simulator.scenario import load_scenario

SCENARIO = "two-districts"
PILLAR = "pil-ala-001"
TOKEN = "tok-amb-ala-07"


@cache
def run_two_districts() -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "simulator.cli", "run", SCENARIO, "--json",
                           "--speed", "2", "--no-browser"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def alert_of(result: dict[str, Any], device_id: str) -> dict[str, Any]:
    (alert,) = [a for a in result["alerts"] if a["device_id"] == device_id]
    return alert


def test_the_scenario_is_listed() -> None:
    done = subprocess.run([sys.executable, "-m", "simulator.cli", "list"],
                          capture_output=True, text=True, timeout=30, check=True)
    assert any(line.startswith(f"{SCENARIO}: ") for line in done.stdout.splitlines())


def test_the_run_is_ok() -> None:
    result = run_two_districts()
    assert result["ok"], result["problems"]
    assert len(result["alerts"]) == result["expected_alerts"] == 2


def test_the_token_sos_goes_to_both_police_and_ambulance() -> None:
    token = alert_of(run_two_districts(), TOKEN)
    assert token["route_rule"] == "Almaty tokens"
    assert token["desks"] == ["police-almaty", "ambulance-almaty"]
    assert token["escalations"] == []  # answered at once: it never climbed
    assert "acknowledged" in token["feedback"]


def test_the_untaken_pillar_sos_climbs_to_national_then_the_supervisors() -> None:
    pillar = alert_of(run_two_districts(), PILLAR)
    assert (pillar["route_rule"], pillar["desks"]) == ("Almaty pillars", ["police-almaty"])
    steps = pillar["escalations"]
    assert [(s["step"], s["to_desk"]) for s in steps] == [(1, "police-national"), (2, None)]
    assert steps[0]["at"] < steps[1]["at"]  # both ISO UTC with milliseconds: ordered as text
    assert "acknowledged" in pillar["feedback"]  # the operator took it at last


def test_the_webhook_got_one_alert_per_alert_and_the_escalations() -> None:
    webhook = run_two_districts()["webhook"]
    received = webhook["received"]
    assert received["alert"] == 2
    assert received.get("escalated", 0) >= 1
    assert received.get("closed") == 2
    assert webhook["bad_signatures"] == 0 and webhook["duplicates"] == 0


# -- the scenario file's routing keys --------------------------------------------------------------
BASE = """
name = "t"
description = "d"
[[devices]]
id = "pil-1"
profile = "pillar"
[[timeline]]
at_s = 1
action = "press"
device = "pil-1"
hold_s = 0.3
"""


def write(tmp_path: Path, extra: str, base: str = BASE) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(base + extra)
    return path


def test_a_scenario_without_routing_keys_runs_as_before(tmp_path: Path) -> None:
    scenario = load_scenario(str(write(tmp_path, "")))
    assert scenario.routes is None and scenario.webhook is None and not scenario.routed


def test_routes_are_refused_as_the_centre_refuses_them(tmp_path: Path) -> None:
    extra = """
[[desks]]
id = "police"
name = "Police"
[[routes]]
name = "pillars"
device_kind = ["pillar"]
desks = ["police"]
"""
    with pytest.raises(ConfigError, match=r"the last rule \('pillars'\) has conditions"):
        load_scenario(str(write(tmp_path, extra)))


def test_a_webhook_desk_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no desk 'police'"):
        load_scenario(str(write(tmp_path, '[webhook]\ndesks = ["police"]\n')))


def test_ignore_is_only_for_a_press_that_raises_an_alert(tmp_path: Path) -> None:
    base = BASE.replace('hold_s = 0.3', 'hold_s = 0.05\nexpect_alert = false\noperator = "ignore"')
    with pytest.raises(ConfigError, match="key 'operator'"):
        load_scenario(str(write(tmp_path, "", base)))


def test_ignore_needs_a_scenario_that_routes(tmp_path: Path) -> None:
    base = BASE.replace('hold_s = 0.3', 'hold_s = 0.3\noperator = "ignore"')
    with pytest.raises(ConfigError, match="escalates only in a scenario that routes"):
        load_scenario(str(write(tmp_path, "", base)))
