"""The Pi camera adapter, off the Pi, against stub picamera2 modules (tests/stubs/picamera2) as
strict as picamera2 for our calls, playing a Pi 4 (outputframe from the encoder's thread) and a
Pi 5 (outputframe from the camera thread, its lock held)."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

from firmware.camera.frames import EncodedFrame, FrameSource, starts_stream
from firmware.camera.picam import PicameraSource
from firmware.camera.synthetic import frames_within

UTC0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


@pytest.fixture(params=["vc4", "pisp"])
def pi(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The stub picamera2 playing a Pi 4 (VC4) or a Pi 5 (PiSP, where outputframe runs in the
    camera thread with its lock held): the adapter must work on both."""
    monkeypatch.setenv("PICAMERA2_STUB_PLATFORM", request.param)
    return request.getfixturevalue("picamera2")


def test_module_imports_without_picamera2() -> None:
    """The adapter module itself never imports picamera2 (it cannot be imported off the Pi)."""
    check = "import sys, firmware.camera.picam; assert 'picamera2' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60,
                   cwd=Path(__file__).parent.parent)
    source = PicameraSource()
    assert isinstance(source, FrameSource)
    assert (source.size, source.fps, source.iperiod) == ((1920, 1080), 30, 30)


def test_start_without_picamera2_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)  # what an off-Pi import gives
    with pytest.raises(ImportError):
        PicameraSource().start(lambda frame: None)


def test_frames_flow_with_keyframes_and_sensor_timestamps_mapped(pi: ModuleType) -> None:
    frames: list[EncodedFrame] = []
    threads: set[str] = set()
    enough = threading.Event()

    def on_frame(frame: EncodedFrame) -> None:
        frames.append(frame)
        threads.add(threading.current_thread().name)
        if len(frames) >= 25:
            enough.set()

    # A frozen clock makes the mapping exact: anchor + sensor offset.
    source = PicameraSource(size=(320, 240), fps=50, bitrate=500_000, gop_s=0.2,
                            clock=lambda: 1000.0, utc_clock=lambda: UTC0)
    source.start(on_frame)
    camera = pi.Picamera2.instances[-1]
    try:
        assert enough.wait(15), f"only {len(frames)} frames"
    finally:
        source.stop()
    assert not camera.is_open and not camera.started

    # What the adapter asked picamera2 for.
    config = camera.camera_config
    assert (config["main"]["size"], config["main"]["format"]) == ((320, 240), "YUV420")
    assert config["controls"]["FrameDurationLimits"] == (20_000, 20_000)
    (encoder,) = camera.started_encoders
    assert isinstance(encoder, pi.encoders.H264Encoder)
    assert (encoder.bitrate, encoder.repeat, encoder.iperiod) == (500_000, True, 10)
    assert encoder.name == "main" and encoder.output is source.output
    assert isinstance(source.output, pi.outputs.Output)
    # outputframe (the V4L2 encoder's thread on a Pi 4, the camera thread on a Pi 5) only
    # queued; on_frame ran on the handoff's thread
    assert threads == {"camera-frame"}

    # Each frame against what the encoder handed out: (keyframe flag, timestamp in us).
    emitted = encoder.emitted
    assert len(emitted) >= len(frames)
    for frame, (keyframe, timestamp_us) in zip(frames, emitted, strict=False):
        assert frame.keyframe == keyframe
        assert frame.pts_s == pytest.approx(1000.0 + timestamp_us / 1e6, abs=1e-9)
        assert frame.utc == UTC0 + timedelta(microseconds=timestamp_us)
    assert [i for i, f in enumerate(frames) if f.keyframe][:3] == [0, 10, 20]  # iperiod 10
    assert all(starts_stream(f.data) for f in frames if f.keyframe)  # repeat=True honoured
    # 50 fps from the sensor: 20 ms apart.
    assert frames[1].pts_s - frames[0].pts_s == pytest.approx(0.02)


def test_frames_within_works_on_the_pi_source(pi: ModuleType) -> None:
    source = PicameraSource(size=(320, 240), fps=30)
    assert frames_within(source, 10.0, enough=5) >= 5
    assert not pi.Picamera2.instances[-1].is_open


def test_a_camera_that_fails_to_start_is_closed(pi: ModuleType,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, *args, **kwargs):
        raise RuntimeError("Camera frontend has timed out!")

    monkeypatch.setattr(pi.Picamera2, "start_recording", broken)
    source = PicameraSource(size=(320, 240))
    with pytest.raises(RuntimeError, match="timed out"):
        source.start(lambda frame: None)
    assert not pi.Picamera2.instances[-1].is_open
    source.stop()  # nothing started: harmless


def test_a_start_that_fails_after_the_lores_encoder_began_stops_that_encoder(
        pi: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """picamera2's close() does not stop encoders: without stopping it ourselves, the lores
    encoder's thread would run on, beside every retry."""
    def broken(self, *args, **kwargs):
        raise RuntimeError("Failed to start camera: Device or resource busy")

    monkeypatch.setattr(pi.Picamera2, "start_recording", broken)
    source = PicameraSource(size=(320, 240))
    with pytest.raises(RuntimeError, match="busy"):
        source.start(lambda frame: None, lambda frame: None)
    camera = pi.Picamera2.instances[-1]
    (lores,) = camera.started_encoders
    assert lores.name == "lores" and not lores.running
    assert camera.encoders == set() and not camera.is_open


def test_an_odd_size_that_picamera2_rounds_down_is_logged(
        pi: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    """picamera2 makes 321x241 into 320x240 silently (Picamera2.align_stream); the adapter says
    so, since the recording is then not the configured size."""
    source = PicameraSource(size=(321, 241), lores_size=(160, 120))
    source.start(lambda frame: None)
    try:
        assert pi.Picamera2.instances[-1].camera_config["main"]["size"] == (320, 240)
    finally:
        source.stop()
    assert "configured the main stream as 320x240, not the 321x241" in caplog.text
