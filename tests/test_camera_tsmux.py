"""MPEG-TS muxing of pre-encoded H.264 with PyAV, checked by Debian's ffprobe and PyAV decoding.

The end-to-end test runs the real pipeline: SyntheticCamera (thread, real time) -> Segmenter ->
TsSegmentWriter -> files. The truncation test cuts one of those files at 60 %.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import av
import pytest

from firmware.camera.frames import NAL_PPS, NAL_SPS, EncodedFrame, nal_types
from firmware.camera.segmenter import FrameOut, SegmentEnd, Segmenter, SegmentEvent, SegmentStart
from firmware.camera.synthetic import SyntheticCamera, encode_clip
from firmware.camera.tsmux import TsSegmentWriter

SIZE = (320, 240)
FPS = 20

def ffprobe(path: Path, *, clean: bool = False) -> dict:
    assert shutil.which("ffprobe"), "ffprobe missing: `make sysdeps` installs ffmpeg"
    """ffprobe's view of the first video stream, frames counted by decoding; `clean`: no error
    printed either (a truncated file legitimately reports a broken last frame)."""
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=codec_name,nb_read_frames,width,height", "-of", "json",
         str(path)], capture_output=True, text=True, timeout=30, check=True)
    streams = json.loads(result.stdout)["streams"]
    assert len(streams) == 1, result
    assert not clean or result.stderr == "", result.stderr
    return streams[0]


def decode_with_pyav(path: Path) -> int:
    """Frames PyAV decodes before the data runs out (a truncated tail may raise)."""
    decoded = 0
    with av.open(str(path)) as container:
        try:
            for _ in container.decode(video=0):
                decoded += 1
        except av.error.InvalidDataError:
            pass
    return decoded


class SegmentFiles:
    """Glue as the recorder will do it: segmenter events -> one TsSegmentWriter per segment."""

    def __init__(self, directory: Path, segmenter: Segmenter) -> None:
        self.directory = directory
        self.segmenter = segmenter
        self.lock = threading.Lock()  # camera thread pushes, test thread starts/stops
        self.ended: list[tuple[SegmentEnd, Path, int]] = []
        self.changed = threading.Condition(self.lock)
        self.frames_seen = 0
        self.started_at = 0.0
        self.camera_dropped = 0
        self._writer: TsSegmentWriter | None = None
        self._file: BinaryIO | None = None

    def on_frame(self, frame: EncodedFrame) -> None:
        with self.lock:
            self.frames_seen += 1
            self._handle(self.segmenter.push(frame))
            self.changed.notify_all()

    def start(self) -> float:
        with self.lock:
            self._handle(self.segmenter.start_recording())
            return time.monotonic()

    def stop(self) -> None:
        with self.lock:
            self._handle(self.segmenter.stop_recording())

    def wait_for(self, predicate, timeout: float = 20.0) -> None:
        with self.lock:
            assert self.changed.wait_for(predicate, timeout), "timed out"

    def path(self, seq: int) -> Path:
        return self.directory / f"seg-{seq:05d}.ts"

    def _handle(self, events: list[SegmentEvent]) -> None:
        for event in events:
            if isinstance(event, SegmentStart):
                self._file = self.path(event.seq).open("wb")
                self._writer = TsSegmentWriter(self._file, FPS, SIZE)
            elif isinstance(event, FrameOut):
                assert self._writer is not None
                self._writer.write(event.frame)
            elif isinstance(event, SegmentEnd):
                assert self._writer is not None and self._file is not None
                written = self._writer.frames_written
                self._writer.close()
                self._file.close()
                self.ended.append((event, self.path(event.seq), written))


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> SegmentFiles:
    """About 1.2 s of camera before recording starts, then two 1 s segments, live at 320x240."""
    segmenter = Segmenter(segment_s=1.0, preroll_s=1.0)
    files = SegmentFiles(tmp_path_factory.mktemp("segments"), segmenter)
    # GOP of 10 frames (0.5 s)
    camera = SyntheticCamera("tok-001", size=SIZE, fps=FPS, bitrate=400_000, gop_s=0.5)
    camera.start(files.on_frame)
    try:
        files.wait_for(lambda: files.frames_seen >= 24)  # 1.2 s seen, 0.5..1 s buffered
        files.started_at = files.start()
        files.wait_for(lambda: len(files.ended) >= 2)
    finally:
        camera.stop()
    files.stop()
    files.camera_dropped = camera.dropped_frames
    return files


def test_live_segments_decode_with_the_exact_frame_count(recording: SegmentFiles) -> None:
    assert len(recording.ended) >= 3  # two cut at keyframes + the one stop_recording closed
    for end, path, written in recording.ended:
        probe = ffprobe(path, clean=True)
        assert probe["codec_name"] == "h264"
        assert (probe["width"], probe["height"]) == SIZE
        assert int(probe["nb_read_frames"]) == end.frames == written
        assert decode_with_pyav(path) == end.frames
    first, second = recording.ended[0][0], recording.ended[1][0]
    assert second.seq == first.seq + 1
    # Cut at the first keyframe (every 10 frames, 0.5 s) once 1 s long: two GOPs, 20 frames
    # (fewer only if the camera skipped frames on a busy machine).
    assert second.frames == 20 or (recording.camera_dropped and second.frames == 10)
    # The first segment begins with the pre-event buffer: 0.5 to 1 s before recording started.
    assert first.start_pts < recording.started_at - 0.4


def test_a_segment_cut_at_60_percent_still_decodes(recording: SegmentFiles,
                                                     tmp_path: Path) -> None:
    end, path, _ = recording.ended[0]
    data = path.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[:int(len(data) * 0.6)])  # mid-packet, like a power cut
    probe = ffprobe(cut)
    assert probe["codec_name"] == "h264"
    assert 0.3 * end.frames < int(probe["nb_read_frames"]) < end.frames
    assert 0.3 * end.frames < decode_with_pyav(cut) < end.frames


class NonSeekableChunks:
    """Like the streaming encryptor: write() only, no seek/tell, 64 KiB chunks onward."""

    CHUNK = 64 * 1024

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.writes = 0
        self._pending = bytearray()

    def write(self, data: bytes) -> int:
        self.writes += 1
        self._pending += data
        while len(self._pending) >= self.CHUNK:
            self.chunks.append(bytes(self._pending[:self.CHUNK]))
            del self._pending[:self.CHUNK]
        return len(data)

    def finish(self) -> bytes:
        self.chunks.append(bytes(self._pending))
        self._pending.clear()
        return b"".join(self.chunks)

    @property
    def received(self) -> int:
        return sum(map(len, self.chunks)) + len(self._pending)


@pytest.fixture(scope="module")
def clip() -> list[EncodedFrame]:
    return encode_clip("tok-002", 75, size=SIZE, fps=FPS, bitrate=1_500_000, gop_s=1.0, t0=50.0)


def test_muxes_to_a_non_seekable_sink_as_frames_arrive(clip: list[EncodedFrame],
                                                       tmp_path: Path) -> None:
    sink = NonSeekableChunks()
    writer = TsSegmentWriter(sink, FPS, SIZE)
    received = []
    for frame in clip:
        writer.write(frame)
        received.append(sink.received)
    # Bytes flow while muxing (a power cut loses only the tail), not only at close().
    assert received[len(clip) // 2] > 0.3 * received[-1] > 0
    assert len(sink.chunks) >= 2 and all(len(c) == sink.CHUNK for c in sink.chunks)
    writer.close()
    data = sink.finish()
    assert len(data) % 188 == 0 and data[0] == 0x47 and data[188] == 0x47
    out = tmp_path / "stream.ts"
    out.write_bytes(data)
    assert int(ffprobe(out, clean=True)["nb_read_frames"]) == len(clip)


def test_keyframes_carry_parameter_sets(clip: list[EncodedFrame]) -> None:
    for frame in clip:
        kinds = nal_types(frame.data)
        assert (NAL_SPS in kinds and NAL_PPS in kinds) == frame.keyframe


def test_first_frame_must_start_a_stream(clip: list[EncodedFrame]) -> None:
    with TsSegmentWriter(NonSeekableChunks(), FPS, SIZE) as writer, \
            pytest.raises(ValueError, match="keyframe carrying SPS and PPS"):
        writer.write(clip[1])
    # A keyframe whose headers were not repeated cannot start a segment either.
    idr_only = clip[0].data[clip[0].data.index(b"\x00\x00\x01\x65"):]
    assert nal_types(idr_only)[0] == 5
    with TsSegmentWriter(NonSeekableChunks(), FPS, SIZE) as writer, \
            pytest.raises(ValueError, match="SPS and PPS"):
        writer.write(replace(clip[0], data=idr_only))


def test_write_after_close_is_an_error(clip: list[EncodedFrame]) -> None:
    writer = TsSegmentWriter(NonSeekableChunks(), FPS, SIZE)
    writer.write(clip[0])
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write(clip[1])
