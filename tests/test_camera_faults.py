"""The SOS path never depends on the camera (issue 13): a real device runtime (mock pins, real
outbox, real paho) against a real Mosquitto and centre, with a camera that fails to start, one
that dies mid-recording, and one whose library is missing. In each an SOS press reaches the
centre (the device shows its signed receipt: delivered) and the fault is visible at the centre
(a `camera_fault` event and the status's `faults`); it clears when the camera comes back."""

from __future__ import annotations

import json
import random
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from firmware.camera.frames import FrameCallback
from firmware.camera.health import CameraLimits
from firmware.camera.picam import PicameraSource
from firmware.camera.synthetic import SyntheticCamera
from firmware.config import DeviceConfig, load_device_config
from firmware.device import DeviceRuntime
from simulator.device_config import render_device_toml
from simulator.virtual_button import play, sequence_pattern

DEVICE = "tok-camfault-01"
QUICK = CameraLimits(first_retry_s=0.2, max_retry_s=0.5, frame_timeout_s=1.0)


class Seen:
    """What the device shows (observer), waitable."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def observe(self, name: str, fields: dict[str, Any]) -> None:
        with self.changed:
            self.entries.append((name, fields))
            self.changed.notify_all()

    def has(self, name: str, **data: Any) -> bool:
        return any(n == name and all(f.get(k) == v for k, v in data.items())
                   for n, f in self.entries)

    def wait(self, name: str, timeout: float = 15.0, **data: Any) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.has(name, **data), timeout), \
                f"timed out waiting for {name} {data}: {self.entries}"


class Running:
    """A DeviceRuntime on its own thread, stopped (and checked) by `close`."""

    def __init__(self, config: DeviceConfig, camera: Any) -> None:
        self.config = config
        self.seen = Seen()
        self.pins = MockFactory()
        self.runtime = DeviceRuntime(config, pin_factory=self.pins, observer=self.seen.observe,
                                     camera_source=camera, camera_limits=QUICK)
        self.stop = threading.Event()
        self.crashed: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="device")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.runtime.run(self.stop)
        except BaseException as exc:  # the test fails on it in close()
            self.crashed.append(exc)

    def press_sos(self) -> None:
        pin = self.pins.pin(self.config.button.pin)
        play(pin, sequence_pattern(random.Random(1), [(0.0, 1.7)]),
             pull_up=self.config.button.pull_up, wait=self.stop.wait)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive() and not self.crashed, self.crashed


def token_config(broker, tmp_path: Path, source: str = "synthetic") -> DeviceConfig:
    text = render_device_toml(device_id=DEVICE, profile="token", data_dir=tmp_path / "data",
                              broker=broker, surveyed={"lat": 52.3789, "lon": 4.9003},
                              camera=True, segment_s=1.0, preroll_s=1.0,
                              heartbeat_s=600.0)
    path = tmp_path / "device.toml"
    path.write_text(text.replace('source = "synthetic"', f'source = "{source}"'))
    return load_device_config(path)


def events(center, kind: str) -> list[dict[str, Any]]:
    return [e.message for e in list(center.events)
            if e.kind == "event" and e.device_id == DEVICE and e.message["type"] == kind]


def faults(center) -> dict[str, str] | None:
    device = center.store.device(DEVICE)
    return device and device["status"].get("faults")


def sos_delivered_while_faulted(device: Running, center) -> None:
    """Press SOS while the camera is down: the centre stores it and the device shows the
    centre's receipt."""
    device.seen.wait("link", up=True)
    device.press_sos()
    alert = center.wait_for(lambda: next(iter(center.store.alerts()), None))
    assert alert.device_id == DEVICE
    device.seen.wait("feedback", state="delivered")


@pytest.fixture
def started() -> Iterator[list[Running]]:
    """Closes what a test started, even when it fails half-way."""
    running: list[Running] = []
    yield running
    for device in running:
        device.close()


def test_a_camera_that_fails_to_start_leaves_the_sos_path_working_and_is_retried(
        broker, center, tmp_path, picamera2: ModuleType, monkeypatch, started) -> None:
    """picamera2 (the stub) fails in start_recording, after the lores encoder began, as a busy
    or timed-out camera does; every attempt must stop that encoder, and the camera records
    once the fault goes away."""
    broken = threading.Event()
    broken.set()
    real_start_recording = picamera2.Picamera2.start_recording

    def start_recording(self, *args: Any, **kwargs: Any) -> None:
        if broken.is_set():
            raise RuntimeError("Failed to start camera: Device or resource busy")
        real_start_recording(self, *args, **kwargs)

    monkeypatch.setattr(picamera2.Picamera2, "start_recording", start_recording)
    config = token_config(broker, tmp_path, source="picamera2")
    device = Running(config, None)  # the runtime opens picamera2 itself, as on a Pi
    started.append(device)

    center.wait_for(lambda: events(center, "camera_fault"))
    (fault,) = events(center, "camera_fault")
    assert "Device or resource busy" in fault["reason"]
    center.wait_for(lambda: "busy" in (faults(center) or {}).get("camera", ""))
    sos_delivered_while_faulted(device, center)
    assert len(picamera2.Picamera2.instances) >= 2  # retried
    closed = [c for c in list(picamera2.Picamera2.instances) if not c.is_open]
    assert closed and all(c.started_encoders for c in closed)  # the lores encoder had begun
    assert not any(e.running for c in closed for e in c.started_encoders)  # and was stopped

    broken.clear()
    center.wait_for(lambda: events(center, "camera_restored"))
    center.wait_for(lambda: faults(center) is None)
    device.seen.wait("segment")  # the SOS is being recorded now
    assert len(events(center, "camera_fault")) == 1  # one fault, however many retries


def test_a_camera_that_dies_mid_recording_is_cut_reported_and_restarted(
        broker, center, tmp_path, started) -> None:
    config = token_config(broker, tmp_path)
    camera = DyingCamera(DEVICE, size=config.camera.size, fps=config.camera.fps,
                         bitrate=config.camera.bitrate, gop_s=0.2)
    device = Running(config, camera)
    started.append(device)
    device.seen.wait("link", up=True)
    device.press_sos()
    center.wait_for(lambda: next(iter(center.store.alerts()), None))
    device.seen.wait("segment")  # recording the SOS

    camera.die.set()  # the encoder's thread raises: frames stop
    center.wait_for(lambda: events(center, "camera_fault"))
    (fault,) = events(center, "camera_fault")
    assert "no frame" in fault["reason"]
    center.wait_for(lambda: events(center, "camera_restored"))
    assert camera.starts >= 2
    manifests = [json.loads(p.read_text())
                 for p in sorted((config.data_dir / "recordings").glob("*.json"))]
    cut = [m for m in manifests if m.get("cut")]
    assert [m["cut"] for m in cut] == [{"reason": "camera-fault", "truncated": False}]
    assert "evidence" in cut[0]["flags"]
    device.seen.wait("segment", seq=cut[0]["seq"] + 1)  # the SOS records on, in a new segment


def test_a_missing_picamera2_leaves_the_sos_path_working_and_names_the_package(
        broker, center, tmp_path, monkeypatch, started) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)  # what an import off the Pi gives
    config = token_config(broker, tmp_path, source="picamera2")
    device = Running(config, None)
    started.append(device)
    center.wait_for(lambda: events(center, "camera_fault"))
    (fault,) = events(center, "camera_fault")
    assert "picamera2" in fault["reason"] and "python3-picamera2" in fault["reason"]
    center.wait_for(lambda: "picamera2" in (faults(center) or {}).get("camera", ""))
    sos_delivered_while_faulted(device, center)
    assert isinstance(device.runtime._camera, PicameraSource)


class DyingCamera(SyntheticCamera):
    """The synthetic camera whose encoder thread raises once `die` is set (its first run only):
    the thread ends and the frames stop, as when picamera2's encoder thread raises."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.die = threading.Event()
        self.starts = 0

    def start(self, on_frame: FrameCallback, on_lores: FrameCallback | None = None) -> None:
        self.starts += 1
        super().start(on_frame, on_lores)

    def _deliver(self, packets: Any, pending: Any, on_frame: FrameCallback, *,
                 lores: bool = False) -> None:
        if self.starts == 1 and self.die.is_set():
            raise RuntimeError("encoder: VIDIOC_DQBUF: No such device")
        super()._deliver(packets, pending, on_frame, lores=lores)
