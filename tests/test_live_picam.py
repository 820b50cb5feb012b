"""The Pi camera's lores stream, off the Pi, against the stub picamera2 (tests/stubs/picamera2),
which keeps picamera2's signatures and its lores checks, on a Pi 4 (one encoder thread per
stream) and a Pi 5 (both encoders in the camera thread)."""

from __future__ import annotations

import json
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_center.fleet import age_x25519_keypair
from evidence_format.age_stream import decrypt, parse_identities
from firmware.camera.frames import EncodedFrame, starts_stream
from firmware.camera.live import LiveStreamer
from firmware.camera.picam import PicameraSource
from protocol import new_id
from protocol.signing import Signer

UTC0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


@pytest.fixture(params=["vc4", "pisp"])
def pi(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The stub picamera2 playing a Pi 4 (VC4) or a Pi 5 (PiSP, where outputframe runs in the
    camera thread with its lock held): the adapter must work on both."""
    monkeypatch.setenv("PICAMERA2_STUB_PLATFORM", request.param)
    return request.getfixturevalue("picamera2")


class Frames:
    """A callback that keeps frames and the threads they came from, and signals at `enough`."""

    def __init__(self, enough: int) -> None:
        self.frames: list[EncodedFrame] = []
        self.threads: set[str] = set()
        self.enough = enough
        self.done = threading.Event()

    def __call__(self, frame: EncodedFrame) -> None:
        self.frames.append(frame)
        self.threads.add(threading.current_thread().name)
        if len(self.frames) >= self.enough:
            self.done.set()


def test_lores_runs_a_second_h264_encoder_on_the_lores_stream(pi: ModuleType) -> None:
    main, lores = Frames(25), Frames(25)
    source = PicameraSource(size=(320, 240), fps=50, bitrate=500_000, gop_s=1.0,
                            lores_size=(160, 120), lores_bitrate=100_000, lores_gop_s=0.2,
                            clock=lambda: 1000.0, utc_clock=lambda: UTC0)
    source.start(main, lores)
    camera = pi.Picamera2.instances[-1]
    try:
        assert main.done.wait(15) and lores.done.wait(15)
    finally:
        source.stop()
    assert not camera.is_open and not camera.started and camera.encoders == set()

    config = camera.camera_config
    assert config["main"]["size"] == (320, 240)
    assert (config["lores"]["size"], config["lores"]["format"]) == ((160, 120), "YUV420")
    lores_encoder, main_encoder = camera.started_encoders  # lores first, then main starts it
    assert (lores_encoder.name, main_encoder.name) == ("lores", "main")
    assert (lores_encoder.width, lores_encoder.height) == (160, 120)
    assert (lores_encoder.bitrate, lores_encoder.repeat, lores_encoder.iperiod) == (
        100_000, True, 10)
    assert main_encoder.iperiod == 50  # the main stream is unchanged
    assert lores_encoder.output is source.lores_output
    assert isinstance(source.lores_output, pi.outputs.Output)
    assert lores.threads == {"camera-lores"}  # its own handoff thread, not the encoder's

    for frame, (keyframe, timestamp_us) in zip(lores.frames, lores_encoder.emitted,
                                               strict=False):
        assert frame.keyframe == keyframe
        assert frame.pts_s == pytest.approx(1000.0 + timestamp_us / 1e6, abs=1e-9)
        assert frame.utc == UTC0 + timedelta(microseconds=timestamp_us)
    assert [i for i, f in enumerate(lores.frames) if f.keyframe][:3] == [0, 10, 20]
    assert all(starts_stream(f.data) for f in lores.frames if f.keyframe)


def test_without_on_lores_no_lores_stream_is_asked_for(pi: ModuleType) -> None:
    main = Frames(5)
    source = PicameraSource(size=(320, 240), fps=30)
    source.start(main)
    camera = pi.Picamera2.instances[-1]
    try:
        assert main.done.wait(15)
    finally:
        source.stop()
    assert camera.camera_config["lores"] is None
    (encoder,) = camera.started_encoders
    assert encoder.name == "main" and source.lores_output is None


def test_the_default_lores_keeps_the_main_aspect_and_a_larger_one_is_refused() -> None:
    assert PicameraSource().lores_size == (320, 180)  # from 1920x1080
    assert PicameraSource(size=(640, 480)).lores_size == (320, 240)
    with pytest.raises(ValueError, match="no larger than the main stream"):
        PicameraSource(size=(320, 240), lores_size=(640, 480))


def test_picamera2_refuses_a_lores_that_is_not_yuv(picamera2: ModuleType,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What picamera2 on a Pi 4 (the stub's default, VC4) does with an RGB lores; the adapter
    asks for YUV420, so this is only reachable by changing it, and the camera is closed again.
    (A Pi 5 would take it: tests/test_picamera2_stub.py.)"""
    real = picamera2.Picamera2.create_video_configuration

    def rgb_lores(self, main={}, lores=None, **kwargs):  # noqa: B006
        if lores is not None:
            lores = {**lores, "format": "RGB888"}
        return real(self, main=main, lores=lores, **kwargs)

    monkeypatch.setattr(picamera2.Picamera2, "create_video_configuration", rgb_lores)
    with pytest.raises(RuntimeError, match="lores stream must be YUV"):
        PicameraSource(size=(320, 240)).start(lambda f: None, lambda f: None)
    assert not picamera2.Picamera2.instances[-1].is_open


def test_pi_lores_frames_become_decodable_live_chunks(pi: ModuleType,
                                                      tmp_path: Path) -> None:
    identity, recipient = age_x25519_keypair()
    sent: list[tuple[bytes, dict[str, Any]]] = []
    enough = threading.Event()

    def publish(payload: bytes, header: dict[str, Any]) -> bool:
        sent.append((payload, header))
        if len(sent) >= 3:
            enough.set()
        return True

    live = LiveStreamer("tok-001", [recipient], Signer(Ed25519PrivateKey.generate()), publish,
                        chunk_s=0.2, fps=50, size=(160, 120))
    source = PicameraSource(size=(320, 240), fps=50, lores_size=(160, 120), lores_gop_s=0.2)
    live.start(new_id())
    source.start(lambda frame: None, live.on_lores)
    try:
        assert enough.wait(20), f"{len(sent)} chunks"
    finally:
        source.stop()
        live.close()
    for payload, header in sent[:3]:
        assert header["frames"] == 10 and header["duration_s"] == pytest.approx(0.2)
        ts = b"".join(decrypt(BytesIO(payload), parse_identities(identity)))
        (tmp_path / "chunk.ts").write_bytes(ts)
        probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams",
                                "v:0", "-show_entries", "stream=nb_read_frames,width",
                                "-of", "json", str(tmp_path / "chunk.ts")],
                               capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(probe.stdout)["streams"] == [{"width": 160, "nb_read_frames": "10"}]
