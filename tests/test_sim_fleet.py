"""`sos-sim run --fleet DIR` on a fleet that exists: nothing is enrolled unless the user says so,
and the deployment's broker certificate is never replaced by the simulator's loopback one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from control_center.fleet import Fleet
from simulator.broker import PrivateBroker


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    """A deployment's fleet: a CA and the broker's server certificate for its real host name."""
    made = Fleet.create(tmp_path / "fleet")
    made.issue_server("broker", ["mqtt.control-centre.example"])
    return made


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def sos_sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simulator.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_an_existing_fleet_is_refused_without_the_flag_and_left_untouched(
        fleet: Fleet, tmp_path: Path) -> None:
    before = snapshot(fleet.directory)
    done = sos_sim("run", "pillar-sos", "--json", "--fleet", str(fleet.directory),
                   "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "centre.sim" in line and "commands to every device" in line
    assert "pil-ams-cs-01" in line and "--enrol-sim-identities" in line
    assert snapshot(fleet.directory) == before
    assert not (tmp_path / "out").exists()  # refused before anything started


def test_the_refusal_names_an_enrolled_device_it_would_re_key(fleet: Fleet, tmp_path) -> None:
    fleet.enrol_local("pil-ams-cs-01", "pillar", tmp_path / "pillar")
    done = sos_sim("run", "pillar-sos", "--fleet", str(fleet.directory))
    assert done.returncode == 2
    assert "pil-ams-cs-01 (already enrolled: its certificate would be revoked" in done.stderr


def test_a_new_fleet_directory_needs_no_flag(tmp_path: Path) -> None:
    from simulator.cli import build_parser, fleet_refusal

    args = build_parser().parse_args(["run", "pillar-sos", "--fleet", str(tmp_path / "new")])
    assert fleet_refusal(args, ["pil-ams-cs-01"]) is None


def test_the_flag_is_in_the_help_with_what_it_enrols() -> None:
    done = sos_sim("run", "--help")
    text = " ".join(done.stdout.split())
    assert "--enrol-sim-identities" in text and "centre.sim" in text
    assert "commands to every device" in text


def test_the_simulators_broker_keeps_its_server_certificate_out_of_the_fleet(
        fleet: Fleet, tmp_path: Path) -> None:
    deployed = snapshot(fleet.directory / "servers")
    broker = PrivateBroker(tmp_path / "sim", fleet_dir=fleet.directory)
    assert snapshot(fleet.directory / "servers") == deployed
    assert broker.server.cert_file.is_relative_to(tmp_path / "sim")
