"""The simulator's camera: real libx264 through PyAV, paced in real time on its own thread."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from itertools import pairwise

import pytest

from firmware.camera.frames import EncodedFrame, FrameSource, starts_stream
from firmware.camera.synthetic import SyntheticCamera, TestPattern, encode_clip, frames_within


class Collector:
    def __init__(self, until: int) -> None:
        self.frames: list[EncodedFrame] = []
        self.threads: set[str] = set()
        self.until = until
        self.done = threading.Event()

    def __call__(self, frame: EncodedFrame) -> None:
        self.frames.append(frame)
        self.threads.add(threading.current_thread().name)
        if len(self.frames) >= self.until:
            self.done.set()


def test_delivers_frames_at_the_configured_rate_with_a_keyframe_every_gop() -> None:
    fps, gop_s = 25, 0.4  # GOP of 10 frames
    camera = SyntheticCamera("tok-001", size=(320, 240), fps=fps, gop_s=gop_s)
    assert isinstance(camera, FrameSource)
    assert (camera.fps, camera.size) == (fps, (320, 240))
    got = Collector(until=50)
    started = time.monotonic()
    camera.start(got)
    try:
        assert got.done.wait(15), f"only {len(got.frames)} frames in 15 s"
        elapsed = time.monotonic() - started
    finally:
        camera.stop()
    frames = got.frames[:50]
    # 50 frames at 25 fps take 1.96 s; generous bounds for a shared 2-core machine.
    assert 1.5 < elapsed < 6.0
    assert got.threads == {"synthetic-camera"}
    # pts come from the schedule t0 + n/fps: no drift, exactly one frame interval apart
    # (or a multiple, where a late thread skipped frames like a sensor).
    steps = [b.pts_s - a.pts_s for a, b in pairwise(frames)]
    assert all(s == pytest.approx(round(s * fps) / fps, abs=1e-6) and s > 0 for s in steps)
    if camera.dropped_frames == 0:
        assert frames[-1].pts_s - frames[0].pts_s == pytest.approx(49 / fps)
    keyframes = [i for i, f in enumerate(frames) if f.keyframe]
    assert keyframes == list(range(0, 50, 10))
    assert all(starts_stream(frames[i].data) for i in keyframes)
    assert all(f.utc.tzinfo is not None for f in frames)
    assert frames[-1].utc > frames[0].utc


def test_stop_is_prompt_and_nothing_arrives_after_it() -> None:
    camera = SyntheticCamera("tok-001", size=(320, 240), fps=5)  # 200 ms between frames
    got = Collector(until=1)
    camera.start(got)
    assert got.done.wait(10)
    began = time.monotonic()
    camera.stop()
    assert time.monotonic() - began < 1.0  # Event.wait, not sleep: stop interrupts the wait
    count = len(got.frames)
    camera.stop()  # idempotent
    assert len(got.frames) == count


def test_a_failing_consumer_does_not_kill_the_camera() -> None:
    seen = Collector(until=3)

    def flaky(frame: EncodedFrame) -> None:
        seen(frame)
        raise RuntimeError("consumer bug")

    camera = SyntheticCamera("tok-001", size=(320, 240), fps=25)
    camera.start(flaky)
    try:
        assert seen.done.wait(10)
    finally:
        camera.stop()


def test_frames_within_counts_for_the_self_test() -> None:
    camera = SyntheticCamera("tok-001", size=(320, 240), fps=25)
    began = time.monotonic()
    assert frames_within(camera, 10.0, enough=5) >= 5
    assert time.monotonic() - began < 5.0  # returns once enough frames came
    assert frames_within(camera, 0.3) >= 1  # restartable; counts for the whole window


def test_burned_in_text_changes_the_picture() -> None:
    pattern = TestPattern("tok-001", (320, 240))
    when = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    a = bytes(pattern.render(0, when).planes[0])
    b = bytes(pattern.render(0, when.replace(second=7)).planes[0])
    other = bytes(TestPattern("pil-002", (320, 240)).render(0, when).planes[0])
    stride = len(a) // 240
    text_rows = slice(0, 40 * stride)  # two lines of 7 px text at the top
    assert a[text_rows] != b[text_rows] and a[text_rows] != other[text_rows]
    assert a[60 * stride:] == b[60 * stride:]  # the rest depends only on the frame number


def test_encode_clip_is_canned_video() -> None:
    clip = encode_clip("tok-001", 30, size=(320, 240), fps=10, gop_s=1.0, t0=5.0)
    assert len(clip) == 30
    assert [i for i, f in enumerate(clip) if f.keyframe] == [0, 10, 20]
    assert clip[3].pts_s == pytest.approx(5.3)


@pytest.mark.parametrize("size", [(321, 240), (32, 32)])
def test_rejects_sizes_the_encoder_cannot_take(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="size must be even"):
        SyntheticCamera("tok-001", size=size)
