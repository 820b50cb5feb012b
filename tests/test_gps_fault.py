"""A GPS that gives nothing is a fault the centre sees (the status's `faults.gps`), while the
SOS path works on: a real device runtime (mock pins, real outbox, real paho) against a real
Mosquitto and centre, with a receiver port that does not exist, then appears."""

from __future__ import annotations

import os
import pty
import threading
import tty
from pathlib import Path
from typing import Any

from gpiozero.pins.mock import MockFactory

from firmware.config import load_device_config
from firmware.device import DeviceRuntime
from simulator.device_config import render_device_toml
from simulator.gps_receiver import nmea_sentence

DEVICE = "tok-gpsfault-01"


def gps_fault(center) -> str | None:
    device = center.store.device(DEVICE)
    return device and (device["status"].get("faults") or {}).get("gps")


def test_a_missing_receiver_port_is_reported_and_clears_when_it_delivers(
        broker, center, tmp_path: Path) -> None:
    port = tmp_path / "sos-gps"  # like the udev name, a symlink to the UART once it is there
    text = render_device_toml(device_id=DEVICE, profile="token", data_dir=tmp_path / "data",
                              broker=broker, gps_port=str(port), heartbeat_s=600.0)
    path = tmp_path / "device.toml"
    path.write_text(text)
    runtime = DeviceRuntime(load_device_config(path), pin_factory=MockFactory())
    stop = threading.Event()
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            runtime.run(stop)
        except BaseException as exc:
            crashed.append(exc)

    thread = threading.Thread(target=run, name="device")
    thread.start()
    master, slave = pty.openpty()
    tty.setraw(slave)
    try:
        reason: Any = center.wait_for(lambda: gps_fault(center))
        assert reason.startswith(f"GPS port {port} unavailable")
        port.symlink_to(os.ttyname(slave))
        assert runtime.gps is not None and runtime.gps.connected.wait(15)
        os.write(master, ("\r\n" + nmea_sentence(
            "GPRMC,144501.00,A,5222.19864,N,00453.40235,E,0.0,,231126,,,A") + "\r\n").encode())
        center.wait_for(lambda: center.store.device(DEVICE)["status"].get("faults") is None)
    finally:
        stop.set()
        thread.join(timeout=30)
        os.close(master)
        os.close(slave)
    assert not thread.is_alive() and not crashed, crashed
