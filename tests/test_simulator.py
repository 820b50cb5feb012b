"""`sos-sim run SCENARIO --json` end to end: broker, centre, device processes, real ptys."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from control_center.fleet import Fleet
from protocol.signing import public_key_from_b64, verify


@cache  # each scenario runs once per test session; tests read different parts of it
def run_sim(scenario: str, speed: float) -> dict:
    done = subprocess.run([sys.executable, "-m", "simulator.cli", "run", scenario, "--json",
                           "--speed", str(speed), "--no-browser"],  # tests/test_sim_console.py
                          capture_output=True, text=True, timeout=240)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def test_a_scenario_ends_with_every_alert_stored_once_and_acknowledged() -> None:
    """paramedic-sos here; pillar-sos (its surveyed position, its voice call) runs once, with
    the console open in a browser, in tests/test_sim_console.py."""
    result = run_sim("paramedic-sos", speed=4)
    assert result["ok"], result["problems"]
    (alert,) = result["alerts"]
    assert alert["feedback"][:3] == ["sending", "delivered", "acknowledged"]
    assert alert["latency_ms"] > 0 and alert["ack_latency_ms"] > 0


def test_outage_with_a_killed_device_still_delivers_exactly_once() -> None:
    result = run_sim("outage", speed=4)
    assert result["ok"], result["problems"]
    (alert,) = result["alerts"]
    assert alert["device_restarts"] == 1
    assert alert["feedback"][0] == "retrying"
    assert "acknowledged" in alert["feedback"]


# -- the shift: recording, live view during the SOS, upload at the dock -------------------------
@pytest.fixture(scope="module")
def shift(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("shift")
    done = subprocess.run([sys.executable, "-m", "simulator.cli", "run", "shift", "--json",
                           "--speed", "2", "--out", str(out), "--no-browser"],
                          capture_output=True, text=True, timeout=240)
    assert done.stdout, done.stderr
    return json.loads(done.stdout), out


def test_the_shift_ends_ok_with_its_sos_acknowledged(shift) -> None:
    result, _ = shift
    assert result["ok"], result["problems"]
    (alert,) = result["alerts"]
    assert "acknowledged" in alert["feedback"]


def test_every_segment_of_the_shift_reached_the_centre_and_left_the_device(shift) -> None:
    result, out = shift
    device = "tok-amb-0412"
    recording, upload = result["recording"], result["upload"]
    assert recording["segments"] >= 3 and recording["evidence_segments"] >= 1
    assert upload["receipts"] == upload["verified_at_centre"] == recording["segments"]
    assert not list((out / "devices" / device / "data" / "recordings").glob("*.ts.age"))
    stored = sorted((out / "evidence" / device).glob("*.ts.age"))
    assert len(stored) == recording["segments"]


def test_the_centres_copy_verifies_with_the_stock_evidence_tool(shift) -> None:
    _, out = shift
    done = subprocess.run([sys.executable, "-m", "control_center.evidence_cli", "verify",
                           "--fleet", str(out / "broker" / "fleet"),
                           str(out / "evidence" / "tok-amb-0412")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VERIFIED" in done.stdout


def test_each_receipt_the_device_kept_is_signed_by_the_centre(shift) -> None:
    _, out = shift
    fleet = Fleet(out / "broker" / "fleet")
    keys = [public_key_from_b64(k) for k in fleet.centre_public_keys()]
    lines = (out / "devices" / "tok-amb-0412" / "data" / "receipts.jsonl").read_text()
    receipts = [json.loads(line) for line in lines.splitlines() if line.strip()]
    assert receipts
    for receipt in receipts:
        verify(receipt, keys)  # raises if forged


def test_the_recorded_call_decrypts_with_stock_age_and_plays(shift) -> None:
    _, out = shift
    segment = sorted((out / "evidence" / "tok-amb-0412").glob("*.ts.age"))[0]
    identity = out / "broker" / "fleet" / "evidence-identity.txt"
    plain = out / "first.ts"
    subprocess.run(["age", "-d", "-i", str(identity), "-o", str(plain), str(segment)],
                   check=True, timeout=30)
    assert probe_frames(plain) > 0


def test_the_operator_had_a_playable_live_view_during_the_sos(shift) -> None:
    result, out = shift
    (alert,) = result["alerts"]
    live = result["live"]
    assert live["alerts"][alert["alert_id"]]["chunks"] > 0 and live["refused"] == 0
    assert live["latency_newest_ms"]["p50"] > 0
    assert probe_frames(out / "live" / alert["alert_id"] / "live.ts") > 0
    playlist = (out / "live" / alert["alert_id"] / "index.m3u8").read_text()
    assert playlist.endswith("#EXT-X-ENDLIST\n")  # the stream ended with the SOS


def probe_frames(path: Path) -> int:
    done = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                           "-show_entries", "stream=codec_name,nb_read_frames", "-of", "json",
                           str(path)], capture_output=True, text=True, timeout=60, check=True)
    (stream,) = json.loads(done.stdout)["streams"]
    assert stream["codec_name"] == "h264"
    return int(stream["nb_read_frames"])
