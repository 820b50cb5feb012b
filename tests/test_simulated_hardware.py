"""`sos-device run --simulated-hardware`: the real device process on a laptop, against a real
broker and centre; and, without the flag, one clear line when the Pi's libraries are missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.device_config import render_device_toml

DEVICE = "pil-lap-01"
SURVEYED = {"lat": 52.3789, "lon": 4.9003}
HEARTBEAT_S = 600  # far beyond every wait below: a status seen in time was not a heartbeat


def device_config(broker, tmp_path: Path, *, camera_source: str | None = None) -> Path:
    """A pillar's config for the broker fixture's fleet; `camera_source` adds a [camera]."""
    text = render_device_toml(device_id=DEVICE, profile="pillar", data_dir=tmp_path / "data",
                              broker=broker, surveyed=SURVEYED, heartbeat_s=HEARTBEAT_S,
                              camera=camera_source is not None)
    if camera_source is not None:
        text = text.replace('source = "synthetic"', f'source = "{camera_source}"')
    path = tmp_path / "device.toml"
    path.write_text(text)
    return path


def sos_device(config: Path, *args: str, env: dict[str, str] | None = None,
               **popen: Any) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if k != "GPIOZERO_PIN_FACTORY"}
    return subprocess.Popen([sys.executable, "-m", "firmware.cli", "--config", str(config),
                             "run", *args], env={**environ, **(env or {})}, text=True, **popen)


@pytest.fixture
def laptop_device(broker, center, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """`sos-device run --simulated-hardware` as a real process, stopped with SIGTERM."""
    log = (tmp_path / "device.log").open("w")
    process = sos_device(device_config(broker, tmp_path), "--simulated-hardware",
                         stdout=log, stderr=subprocess.STDOUT)
    yield process
    process.terminate()
    try:
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        log.close()


def statuses(center) -> list[dict[str, Any]]:
    return [e.message for e in center.events if e.kind == "status" and e.device_id == DEVICE]


def stored_alert(center) -> str | None:
    return next((e.message["alert_id"] for e in center.events
                 if e.kind == "alert" and e.device_id == DEVICE), None)


def test_with_simulated_hardware_it_connects_and_the_centre_sees_it_online(
        laptop_device, center) -> None:
    center.wait_for(lambda: any(s["state"] == "online" for s in statuses(center)))
    assert laptop_device.poll() is None


def test_sigusr1_presses_the_button_and_the_centre_stores_the_sos(laptop_device, center) -> None:
    center.wait_for(lambda: statuses(center))  # connected: the press is not lost to the start
    laptop_device.send_signal(signal.SIGUSR1)
    alert_id = center.wait_for(lambda: stored_alert(center))
    assert center.store.alert(alert_id).device_id == DEVICE


def test_a_stage_change_is_reported_at_once_not_at_the_next_heartbeat(
        laptop_device, center) -> None:
    center.wait_for(lambda: statuses(center))
    laptop_device.send_signal(signal.SIGUSR1)
    alert_id = center.wait_for(lambda: stored_alert(center))

    def stage_reported(stage: str | None, alert: str | None) -> bool:
        return any(s.get("active_alert_stage") == stage and s.get("active_alert_id") == alert
                   for s in statuses(center))

    center.wait_for(lambda: stage_reported("delivered", alert_id))
    center.service.send_command(alert_id, "ack", "op-test")
    center.wait_for(lambda: stage_reported("acknowledged", alert_id))
    before_close = len(statuses(center))
    center.service.send_command(alert_id, "close", "op-test")
    center.wait_for(lambda: len(statuses(center)) > before_close
                    and stage_reported("closed", alert_id))  # while "closed" shows
    center.wait_for(lambda: stage_reported(None, None), timeout=30)  # then idle


@pytest.fixture
def no_pi_libraries(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH with `lgpio` and `picamera2` that fail to import, as off a Pi, whatever this
    machine has installed."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for module in ("lgpio", "picamera2"):
        (blocked / f"{module}.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{module}'\")\n")
    return {"PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}


def run_without_flag(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    process = sos_device(config, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_without_the_flag_and_without_lgpio_it_exits_2_with_one_line(
        broker, tmp_path, no_pi_libraries) -> None:
    done = run_without_flag(device_config(broker, tmp_path), no_pi_libraries)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "lgpio" in line and "--simulated-hardware" in line
    assert "picamera2" not in line  # this pillar has no camera


def test_the_one_line_names_only_lgpio_even_when_the_config_records_with_picamera2(
        broker, tmp_path, no_pi_libraries) -> None:
    """Only what the SOS path needs refuses the start: a missing camera library does not."""
    done = run_without_flag(device_config(broker, tmp_path, camera_source="picamera2"),
                            no_pi_libraries)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "lgpio" in line and "--simulated-hardware" in line
    assert "picamera2" not in line


def test_without_picamera2_the_device_runs_and_reports_the_camera_fault(
        broker, center, tmp_path, no_pi_libraries) -> None:
    """`sos-device run` on GPIO that works (gpiozero's mock pins stand in for lgpio) and no
    picamera2: it comes up, one log line names the module and the apt package, and the centre
    sees the fault in the device's status."""
    log = tmp_path / "device.log"
    with log.open("w") as out:
        process = sos_device(device_config(broker, tmp_path, camera_source="picamera2"),
                             env={**no_pi_libraries, "GPIOZERO_PIN_FACTORY": "mock"},
                             stdout=out, stderr=subprocess.STDOUT)
        try:
            def camera_fault() -> str:
                device = center.store.device(DEVICE)
                return device and device["status"].get("faults", {}).get("camera")

            reason = center.wait_for(camera_fault)
            assert "picamera2" in reason and "python3-picamera2" in reason
            # the event comes through the outbox (QoS 1), the status straight (QoS 0): either
            # may arrive first
            center.wait_for(lambda: any(e.kind == "event" and e.message["type"] == "camera_fault"
                                        for e in list(center.events)))
            assert process.poll() is None
        finally:
            process.terminate()
            assert process.wait(timeout=30) == 0
    lines = [x for x in log.read_text().splitlines() if "python3-picamera2" in x]
    assert len(lines) == 1 and "camera fault" in lines[0], lines


def test_run_help_documents_the_flag() -> None:
    done = subprocess.run([sys.executable, "-m", "firmware.cli", "run", "--help"],
                          capture_output=True, text=True, timeout=30)
    assert "--simulated-hardware" in done.stdout and "SIGUSR1" not in done.stdout
    assert "kill -USR1" in " ".join(done.stdout.split())
