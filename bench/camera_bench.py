"""`python -m bench.camera_bench`: what our video path costs in CPU.

(a) The recording path as it runs on the Pi, minus the encoding (the Pi's hardware encoder does
    that): Segmenter + TsSegmentWriter (PyAV mpegts) + a sink that SHA-256s every byte, fed a
    pre-encoded 1920x1080 30 fps ~8 Mbit/s H.264 stream. Measured with `time.process_time()`:
    CPU seconds per second of video = the share of one core it needs.
(b) For reference, the simulator's synthetic camera (render + libx264) at 640x480, unpaced.

(c) `callback_hold`: how long picamera2's `outputframe` holds the camera thread, per frame
    (p50/p99/max in microseconds), while a real SegmentRecorder writes real segments (age
    encryption, fsync every second to a temp dir, signed manifests, 2 s segments): pre-encoded
    1080p30 frames fed through the real output class (firmware/camera/picam.py) at 30 fps.
    "handoff" is the shipped path (the callback only queues, firmware/camera/handoff.py);
    "synchronous" hands each frame straight to the recorder, as before issue 13.

Rows are (name, value). Benchmarks report, they do not assert.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_center.fleet import age_x25519_keypair
from firmware.camera.frames import EncodedFrame, deliver
from firmware.camera.handoff import FrameHandoff
from firmware.camera.picam import HANDOFF_S, _frame_output, _TimestampMap
from firmware.camera.recorder import SegmentRecorder
from firmware.camera.recording import RecordingPolicy
from firmware.camera.segmenter import FrameOut, SegmentEnd, Segmenter, SegmentEvent, SegmentStart
from firmware.camera.store import SegmentStore
from firmware.camera.synthetic import encode_clip
from firmware.camera.tsmux import TsSegmentWriter

from .report import CallbackReport
from .stats import percentile

SIZE = (1920, 1080)
FPS = 30
BITRATE = 8_000_000
CLIP_S = 10
PASSES = 3  # the 10 s clip is fed this many times (pts shifted), 30 s of video timed


def encode_1080p(seconds: int = CLIP_S) -> list[EncodedFrame]:
    """~8 Mbit/s 1080p30 H.264 with a keyframe (and SPS/PPS) every second, like the Pi's.

    Low-amplitude noise keeps libx264 near the target rate (a clean test pattern would compress
    to a fraction of it, and the muxer's and hash's cost are per byte).
    """
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height = SIZE
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = Fraction(1, FPS)
    ctx.framerate = Fraction(FPS)
    ctx.bit_rate = BITRATE
    kbit = BITRATE // 1000
    ctx.options = {"preset": "ultrafast", "tune": "zerolatency",
                   "x264-params": f"keyint={FPS}:min-keyint={FPS}:scenecut=0:repeat-headers=1:"
                                  f"vbv-maxrate={kbit}:vbv-bufsize={kbit}"}
    ctx.open()
    to_noise = bytes(112 + (i % 32) for i in range(256))
    frames: list[EncodedFrame] = []
    utc0 = datetime(2026, 1, 1, tzinfo=UTC)

    def collect(packets) -> None:
        for p in packets:
            frames.append(EncodedFrame(bytes(p), p.pts / FPS, bool(p.is_keyframe),
                                       utc0 + timedelta(seconds=p.pts / FPS)))

    for n in range(seconds * FPS):
        picture = av.VideoFrame(*SIZE, "yuv420p")
        for i, plane in enumerate(picture.planes):
            size = plane.buffer_size
            plane.update(os.urandom(size).translate(to_noise) if i == 0 else bytes([128]) * size)
        picture.pts = n
        collect(ctx.encode(picture))
    collect(ctx.encode(None))
    return frames


class Sha256Sink:
    """Stands in for the encryptor: consumes every byte (hashing), keeps nothing."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.bytes += len(data)
        return len(data)


def run_pipeline(clip: list[EncodedFrame], passes: int = PASSES) -> tuple[float, int, int]:
    """Feed `clip` `passes` times through segmenter + muxer + hash; (CPU s, TS bytes, segments)."""
    segmenter = Segmenter(segment_s=10.0, preroll_s=30.0)
    writer: TsSegmentWriter | None = None
    sink = Sha256Sink()
    total_ts = segments = 0

    def handle(events: list[SegmentEvent]) -> None:
        nonlocal writer, sink, total_ts, segments
        for event in events:
            if isinstance(event, FrameOut):
                assert writer is not None
                writer.write(event.frame)
            elif isinstance(event, SegmentStart):
                sink = Sha256Sink()
                writer = TsSegmentWriter(sink, FPS, SIZE)
            elif isinstance(event, SegmentEnd):
                assert writer is not None
                writer.close()
                sink.hash.hexdigest()
                total_ts += sink.bytes
                segments += 1

    span = len(clip) / FPS
    began = time.process_time()
    handle(segmenter.start_recording())
    for p in range(passes):
        for frame in clip:
            handle(segmenter.push(EncodedFrame(frame.data, frame.pts_s + p * span, frame.keyframe,
                                               frame.utc)))
    handle(segmenter.stop_recording())
    return time.process_time() - began, total_ts, segments


def synthetic_fps(frames: int = 250) -> tuple[float, float]:
    """Synthetic camera render + libx264 at 640x480, unpaced: (frames/s wall, frames/CPU s)."""
    wall, cpu = time.perf_counter(), time.process_time()
    clip = encode_clip("bench-001", frames, size=(640, 480), fps=25, bitrate=1_000_000)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(clip) / wall, len(clip) / cpu


HOLD_TARGET_US = 1000.0  # the target: outputframe's p99 under 1 ms


@dataclass
class HoldResult:
    """One run of `callback_hold`: the callback's hold times and what the recorder made."""

    mode: str
    hold_us: list[float]
    dropped: int
    segments: int


class _Output:
    """Stands in for `picamera2.outputs.Output`: only `recording` is read by our subclass."""

    recording = True


class _Direct:
    """The old path: the callback hands each frame straight to the recorder."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.dropped = 0

    def put(self, frame: EncodedFrame) -> bool:
        deliver(self.consumer, frame, "on_frame")
        return True


def callback_hold(tmp: Path, clip: list[EncodedFrame], *, mode: str = "handoff",
                  passes: int = 3) -> HoldResult:
    """Feed `clip` `passes` times at FPS through the real output class into a real recorder
    writing to `tmp`; time every `outputframe` call (perf_counter_ns)."""
    _identity, recipient = age_x25519_keypair()
    store = SegmentStore(tmp)
    committed: list[int] = []
    recorder = SegmentRecorder(store, device_id="bench-cam-001", recipients=[recipient],
                               signing_key=Ed25519PrivateKey.generate(), fps=FPS, size=SIZE,
                               policy=RecordingPolicy(preroll_s=0.0), segment_s=2.0,
                               on_commit=committed.append)
    recorder.change(lambda p: p.call_start("bench-call"))
    sink: Any = (FrameHandoff(recorder.on_frame, max_frames=round(FPS * HANDOFF_S))
                 if mode == "handoff" else _Direct(recorder.on_frame))
    output = _frame_output(_Output, sink, _TimestampMap(time.monotonic,
                                                        lambda: datetime.now(UTC)))
    hold_us: list[float] = []
    began = time.perf_counter()
    n = 0
    for _ in range(passes):
        for frame in clip:
            delay = began + n / FPS - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # paced like the sensor
            t0 = time.perf_counter_ns()
            output.outputframe(frame.data, frame.keyframe, round(n * 1e6 / FPS))
            hold_us.append((time.perf_counter_ns() - t0) / 1000)
            n += 1
    if isinstance(sink, FrameHandoff):
        sink.close(timeout_s=30.0)
    recorder.close()
    store.close()
    return HoldResult(mode, hold_us, sink.dropped, len(committed))


def run() -> list[tuple[str, float]]:
    clip = encode_1080p()
    video_s = PASSES * len(clip) / FPS
    es_bytes = PASSES * sum(len(f.data) for f in clip)
    cpu, ts_bytes, segments = run_pipeline(clip)
    began = time.process_time()
    digest = hashlib.sha256()
    for _ in range(PASSES):
        for frame in clip:
            digest.update(frame.data)
    sha_only = time.process_time() - began
    fps_wall, fps_cpu = synthetic_fps()
    return [
        ("1080p30 stream bitrate, Mbit/s", es_bytes * 8 / video_s / 1e6),
        ("video timed, s", video_s),
        ("segments written", float(segments)),
        ("segmenter+tsmux+sha256 CPU s per video s", cpu / video_s),
        ("  = CPU share of one core, %", 100 * cpu / video_s),
        ("  of which sha256 alone, % of one core", 100 * sha_only / video_s),
        ("  TS overhead over raw H.264, %", 100 * (ts_bytes / es_bytes - 1)),
        ("synthetic camera 640x480 render+encode, fps (wall)", fps_wall),
        ("synthetic camera 640x480 render+encode, fps per CPU s", fps_cpu),
    ]


if __name__ == "__main__":
    print(f"camera bench on {os.cpu_count()} CPUs (pre-encoding {CLIP_S} s of 1080p30 first)")
    for name, value in run():
        print(f"{name:<56} {value:12.4f}")


def run_callback(tmp: Path, seconds: int = 4, passes: int = 3,
                 progress: Callable[[str], None] = lambda text: None,
                 context: dict[str, Any] | None = None) -> CallbackReport:
    """The "camera callback" section (bench/report.py CallbackReport): the synchronous path
    first, for comparison, then the shipped handoff path, each in its own directory."""
    report = CallbackReport(target_us=HOLD_TARGET_US, context={
        **(context or {}), "video": f"{SIZE[0]}x{SIZE[1]} ~{BITRATE // 1_000_000} Mbit/s H.264",
        "fps": FPS, "segment_s": 2.0})
    progress(f"camera callback: pre-encoding {seconds} s of 1080p30, then "
             f"2 x {seconds * passes} s paced at {FPS} fps")
    try:
        clip = encode_1080p(seconds)
        labels = {"synchronous": "before: synchronous (old path)",
                  "handoff": "after: queue to recorder thread"}
        for mode, label in labels.items():
            result = callback_hold(tmp / mode, clip, mode=mode, passes=passes)
            ordered = sorted(result.hold_us)
            report.rows.append({"mode": mode, "label": label, "frames": len(ordered),
                                "p50_us": percentile(ordered, 50),
                                "p99_us": percentile(ordered, 99), "max_us": ordered[-1],
                                "dropped": result.dropped, "segments": result.segments})
    except Exception as exc:  # PyAV/libx264/disk failures vary: report them and go on
        report.errors.append(f"camera callback: {type(exc).__name__}: {exc}")
    return report
