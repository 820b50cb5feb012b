"""`sos-sim run SCENARIO --json` end to end: broker, centre, device processes, real ptys."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache

import pytest


@cache  # each scenario runs once per test session; tests read different parts of it
def run_sim(scenario: str, speed: float) -> dict:
    done = subprocess.run([sys.executable, "-m", "simulator.cli", "run", scenario, "--json",
                           "--speed", str(speed)], capture_output=True, text=True, timeout=240)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("scenario", ["paramedic-sos", "pillar-sos"])
def test_a_scenario_ends_with_every_alert_stored_once_and_acknowledged(scenario: str) -> None:
    result = run_sim(scenario, speed=4)
    assert result["ok"], result["problems"]
    (alert,) = result["alerts"]
    assert alert["feedback"][:3] == ["sending", "delivered", "acknowledged"]
    assert alert["latency_ms"] > 0 and alert["ack_latency_ms"] > 0


def test_the_pillar_alert_carries_its_surveyed_position() -> None:
    (alert,) = run_sim("pillar-sos", speed=4)["alerts"]
    assert (alert["device_kind"], alert["position_source"]) == ("pillar", "surveyed")


def test_outage_with_a_killed_device_still_delivers_exactly_once() -> None:
    result = run_sim("outage", speed=4)
    assert result["ok"], result["problems"]
    (alert,) = result["alerts"]
    assert alert["device_restarts"] == 1
    assert alert["feedback"][0] == "retrying"
    assert "acknowledged" in alert["feedback"]
