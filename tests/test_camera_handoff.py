"""Camera work off the camera thread (firmware/camera/handoff.py): picamera2's `outputframe`
only queues; the recorder runs on the handoff's thread, and a recorder that falls behind costs
dropped frames up to a keyframe, never a stalled camera."""

from __future__ import annotations

import json
import subprocess
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import pytest

from control_center.fleet import age_x25519_keypair
from evidence_format.age_stream import decrypt_salvage, parse_identities
from firmware.camera.frames import EncodedFrame
from firmware.camera.handoff import FrameHandoff
from firmware.camera.picam import _frame_output, _TimestampMap
from firmware.camera.recorder import SegmentRecorder
from firmware.camera.recording import RecordingPolicy
from firmware.camera.store import SegmentStore
from firmware.camera.synthetic import encode_clip
from protocol.signing import load_or_make_key

UTC0 = datetime(2026, 1, 1, tzinfo=UTC)
WAIT_S = 20.0  # a guard against a hang, never a synchronisation


def frame(n: int, keyframe: bool = False) -> EncodedFrame:
    return EncodedFrame(b"\x00\x00\x01\x41" + bytes([n % 256]), n / 30, keyframe, UTC0)


class GatedConsumer:
    """A consumer that blocks, frame by frame, until `gate` opens; `entered` says it is in."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.frames: list[EncodedFrame] = []

    def __call__(self, item: EncodedFrame) -> None:
        self.frames.append(item)
        self.entered.set()
        assert self.gate.wait(WAIT_S)


def blocked_handoff(max_frames: int) -> tuple[FrameHandoff, GatedConsumer]:
    """A handoff whose worker is inside the consumer with frame 0, blocked."""
    consumer = GatedConsumer()
    handoff = FrameHandoff(consumer, max_frames=max_frames)
    assert handoff.put(frame(0, keyframe=True))
    assert consumer.entered.wait(WAIT_S)
    return handoff, consumer


def test_frames_that_do_not_fit_are_dropped_and_counted() -> None:
    handoff, consumer = blocked_handoff(max_frames=3)
    accepted = [handoff.put(frame(n)) for n in range(1, 6)]
    assert accepted == [True, True, True, False, False]
    assert (handoff.dropped, handoff.drop_episodes, handoff.pending) == (2, 1, 3)
    consumer.gate.set()
    assert handoff.close()


def test_a_handoff_closed_while_its_consumer_is_stuck_never_hands_on_its_old_frames() -> None:
    """After a stall the camera restarts with a new handoff; the old worker, once unstuck, must
    not feed the recorder frames older than the new camera's (they are counted as dropped)."""
    handoff, consumer = blocked_handoff(max_frames=5)
    for n in range(1, 4):
        assert handoff.put(frame(n))
    assert not handoff.close(timeout_s=0.05)  # the consumer is still stuck in frame 0
    consumer.gate.set()
    handoff._thread.join(WAIT_S)
    assert [f.pts_s * 30 for f in consumer.frames] == [0]
    assert (handoff.delivered, handoff.dropped) == (1, 3)


def test_after_a_drop_the_stream_resumes_at_a_keyframe() -> None:
    handoff, consumer = blocked_handoff(max_frames=1)
    handoff.put(frame(1))
    handoff.put(frame(2))  # dropped: the queue is full
    consumer.gate.set()
    assert handoff.wait_idle(WAIT_S)
    assert not handoff.put(frame(3))  # room again, but a P-frame after a gap cannot decode
    assert handoff.put(frame(4, keyframe=True))
    assert handoff.close()
    assert [(f.pts_s * 30, f.dropped_before) for f in consumer.frames] == [
        (0, 0), (1, 0), (4, 2)]
    assert (handoff.dropped, handoff.drop_episodes) == (2, 1)


class BlockingFile:
    """A segment file whose writes wait for `gate`: a card that stalls on every write."""

    def __init__(self, file: BinaryIO, gate: threading.Event, entered: threading.Event) -> None:
        self._file, self._gate, self._entered = file, gate, entered

    def write(self, data: bytes) -> int:
        self._entered.set()
        assert self._gate.wait(WAIT_S)
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


@dataclass
class BlockedRun:
    returned_while_blocked: bool
    handoff: FrameHandoff
    cards: Path
    identity: str


@pytest.fixture
def blocked_run(picamera2: ModuleType, tmp_path: Path) -> BlockedRun:
    """80 frames (keyframe every 10) through the real output class into a real recorder whose
    card blocks: frame 0 blocks the recorder, frames 1-59 are fed meanwhile (8 fit, the rest
    are dropped), the card is released, then frames 60-79 (60 is a keyframe) are fed one by
    one as the recorder takes them."""
    identity, recipient = age_x25519_keypair()
    cards = tmp_path / "card"
    store = SegmentStore(cards)
    gate, entered = threading.Event(), threading.Event()
    open_segment = store.open_segment
    store.open_segment = lambda seq: BlockingFile(open_segment(seq), gate, entered)  # type: ignore
    policy = RecordingPolicy(preroll_s=0.0)
    recorder = SegmentRecorder(store, device_id="tok-hand-01", recipients=[recipient],
                               signing_key=load_or_make_key(tmp_path / "k.key"), fps=20,
                               size=(160, 120), policy=policy, segment_s=30.0)
    recorder.change(lambda p: p.call_start("call-1"))
    clip = encode_clip("tok-hand-01", 80, size=(160, 120), fps=20, gop_s=0.5)
    assert [f.keyframe for f in clip].count(True) == 8 and clip[60].keyframe
    handoff = FrameHandoff(recorder.on_frame, max_frames=8)
    output = _frame_output(picamera2.outputs.Output, handoff,
                           _TimestampMap(lambda: 0.0, lambda: UTC0))
    output.start()

    def feed(frames: list[EncodedFrame], first: int, paced: bool = False) -> None:
        for n, item in enumerate(frames, first):
            output.outputframe(item.data, item.keyframe, round(n / 20 * 1e6))
            if paced:  # a recorder that keeps up: nothing more is dropped
                assert handoff.wait_idle(WAIT_S)

    feed(clip[:1], 0)
    assert entered.wait(WAIT_S)  # the recorder is inside a write, blocked
    fed = threading.Thread(target=feed, args=(clip[1:60], 1))
    fed.start()
    fed.join(WAIT_S)
    returned = not fed.is_alive() and not gate.is_set()
    gate.set()
    assert handoff.wait_idle(WAIT_S)
    feed(clip[60:], 60, paced=True)
    assert handoff.close()
    recorder.close()
    store.close()
    return BlockedRun(returned, handoff, cards, identity)


def test_outputframe_returns_while_the_recorder_is_blocked(blocked_run: BlockedRun) -> None:
    assert blocked_run.returned_while_blocked


def test_a_blocked_recorder_costs_counted_drops(blocked_run: BlockedRun) -> None:
    handoff = blocked_run.handoff
    assert (handoff.received, handoff.delivered) == (80, 1 + 8 + 20)
    assert (handoff.dropped, handoff.drop_episodes) == (51, 1)


def test_the_segment_before_the_gap_says_so_and_both_decode(blocked_run: BlockedRun) -> None:
    manifests = [json.loads(p.read_text()) for p in sorted(blocked_run.cards.glob("*.json"))]
    assert [(m["frames"], m["cut"]) for m in manifests] == [
        (9, {"reason": "frames-dropped", "truncated": False}), (20, None)]
    (identity,) = parse_identities(blocked_run.identity)
    for manifest in manifests:
        with (blocked_run.cards / manifest["file"]).open("rb") as source:
            plaintext, salvage = decrypt_salvage(source, identity)
        assert salvage.complete
        ts = blocked_run.cards / f"{manifest['seq']}.ts"
        ts.write_bytes(plaintext)
        assert ffprobe_frames(ts) == manifest["frames"]


def ffprobe_frames(path: Path) -> int:
    done = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                           "-show_entries", "stream=codec_name,nb_read_frames", "-of", "json",
                           str(path)], capture_output=True, text=True, check=True)
    (stream,) = json.loads(done.stdout)["streams"]
    assert stream["codec_name"] == "h264"
    return int(stream["nb_read_frames"])


def test_the_stub_refuses_a_format_picamera2_does_not_know(picamera2: ModuleType) -> None:
    camera = picamera2.Picamera2()
    config = camera.create_video_configuration(main={"size": (640, 480), "format": "YUV"})
    with pytest.raises(RuntimeError, match="Bad format YUV in stream main"):
        camera.configure(config)


def test_the_stub_takes_the_yuv420_main_stream(picamera2: ModuleType) -> None:
    camera = picamera2.Picamera2()
    camera.configure(camera.create_video_configuration(
        main={"size": (640, 480), "format": "YUV420"}))
    assert camera.camera_config["main"]["stride"] == 640  # the Y plane: a byte a pixel
