"""Sound in the evidence segments: a known tone through the recorder, checked with ffprobe and
by decoding it back (stock age, real PyAV, no mocks)."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pytest

from control_center.fleet import age_x25519_keypair
from firmware.audio.aac import AacEncoder
from firmware.audio.source import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk
from firmware.camera.avfeed import AudioFeed
from firmware.camera.avsync import AvInterleaver
from firmware.camera.frames import AudioPacket, EncodedFrame
from firmware.camera.recorder import SegmentRecorder
from firmware.camera.recording import RecordingPolicy
from firmware.camera.segmenter import AudioOut, FrameOut, Segmenter, SegmentStart
from firmware.camera.store import SegmentStore
from firmware.camera.synthetic import encode_clip
from protocol.signing import load_or_make_key

FPS = 25
T0 = 1000.0  # device monotonic time of the first frame
UTC0 = datetime(2026, 5, 1, tzinfo=UTC)


def bursts(seconds: float) -> np.ndarray:
    """440 Hz in bursts of irregular length: an envelope that cannot line up by accident."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    on = (np.sin(2 * np.pi * 0.7 * t) + np.sin(2 * np.pi * 1.9 * t)) > 0.3
    return (np.sin(2 * np.pi * 440 * t) * 12000 * on).astype(np.int16)


def envelope(samples: np.ndarray, window: int = 960) -> np.ndarray:
    """RMS per window of 20 ms."""
    n = len(samples) // window
    blocks = samples[:n * window].astype(np.float64).reshape(n, window)
    return np.sqrt((blocks ** 2).mean(axis=1))


def best_correlation(sent: np.ndarray, got: np.ndarray, max_lag: int = 10) -> tuple[float, int]:
    """The highest correlation of the two envelopes within +-max_lag windows, and its lag."""
    best = (-1.0, 0)
    for lag in range(-max_lag, max_lag + 1):
        a = sent[max(0, lag):]
        b = got[max(0, -lag):]
        n = min(len(a), len(b))
        if n > 10:
            r = float(np.corrcoef(a[:n], b[:n])[0, 1])
            best = max(best, (r, lag))
    return best


def chunks_of(pcm: np.ndarray, start_s: float) -> list[AudioChunk]:
    return [AudioChunk(pcm[i:i + CHUNK_SAMPLES].tobytes(), i, start_s + i / SAMPLE_RATE,
                       UTC0 + timedelta(seconds=start_s - T0 + i / SAMPLE_RATE))
            for i in range(0, len(pcm) - CHUNK_SAMPLES + 1, CHUNK_SAMPLES)]


def feed_in_arrival_order(frames: list[EncodedFrame], chunks: list[AudioChunk],
                          on_frame, on_audio, video_delay_s: float = 0.01) -> None:
    """Hand frames and chunks over as a device would: a chunk once its last sample is in,
    a frame `video_delay_s` after capture (its encoder's latency)."""
    events = ([(f.pts_s + video_delay_s, 1, f) for f in frames]
              + [(c.mono_s + CHUNK_SAMPLES / SAMPLE_RATE, 0, c) for c in chunks])
    for _, kind, item in sorted(events, key=lambda e: (e[0], e[1])):
        (on_frame if kind else on_audio)(item)


def ffprobe_streams(path: Path) -> dict[str, dict]:
    done = subprocess.run(["/usr/bin/ffprobe", "-v", "error", "-show_entries",
                           "stream=codec_type,codec_name,sample_rate,channels,start_time,"
                           "duration", "-of", "json", str(path)],
                          capture_output=True, text=True, check=True)
    return {s["codec_type"]: s for s in json.loads(done.stdout)["streams"]}


def decode_audio(path: Path) -> np.ndarray:
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            out.append(frame.to_ndarray().reshape(-1))
    return (np.concatenate(out) * 32767).astype(np.int16) if out else np.zeros(0, np.int16)


@pytest.fixture(scope="module")
def clip() -> list[EncodedFrame]:
    return encode_clip("tok-snd-01", 6 * FPS, size=(160, 120), fps=FPS, gop_s=1.0, t0=T0,
                       utc0=UTC0)


@pytest.fixture
def keys(tmp_path: Path) -> dict:
    identity, recipient = age_x25519_keypair()
    identity_file = tmp_path / "centre-identity.txt"
    identity_file.write_text(identity + "\n")
    return {"identity": identity_file, "recipient": recipient,
            "signing_key": load_or_make_key(tmp_path / "device-signing.key")}


def record(tmp_path: Path, keys: dict, clip: list[EncodedFrame], pcm: np.ndarray | None, *,
           start_at_s: float = 0.0, segment_s: float = 2.0) -> tuple[Path, list[dict]]:
    """The clip (and `pcm`, from the clip's first instant) through a SegmentRecorder that
    starts recording `start_at_s` into the clip (the rest is the pre-event buffer)."""
    card = tmp_path / "card"
    policy = RecordingPolicy(preroll_s=30.0)
    recorder = SegmentRecorder(
        SegmentStore(card), device_id="tok-snd-01", recipients=[keys["recipient"]],
        signing_key=keys["signing_key"], fps=FPS, size=(160, 120), policy=policy,
        segment_s=segment_s, audio=AudioFeed() if pcm is not None else None)
    started = False

    def on_frame(frame: EncodedFrame) -> None:
        nonlocal started
        if not started and frame.pts_s >= T0 + start_at_s:
            started = True
            recorder.change(lambda p: p.call_start("call-snd"))
        recorder.on_frame(frame)

    chunks = chunks_of(pcm, T0) if pcm is not None else []
    feed_in_arrival_order(clip, chunks, on_frame, recorder.on_audio)
    recorder.close()
    manifests = [json.loads(p.read_text()) for p in sorted(card.glob("*.json"))]
    return card, manifests


def decrypt(card: Path, keys: dict, manifest: dict, out: Path) -> Path:
    subprocess.run(["age", "-d", "-i", str(keys["identity"]), "-o", str(out),
                    str(card / manifest["file"])], check=True)
    return out


def test_a_recorded_tone_plays_back_in_step_with_the_picture(tmp_path, keys, clip) -> None:
    sent = bursts(6.0)
    card, manifests = record(tmp_path, keys, clip, sent, start_at_s=3.0)
    assert len(manifests) >= 3  # the pre-event buffer became the first segments
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(decrypt(card, keys, m, tmp_path / f"{m['seq']}.ts").read_bytes()
                                for m in manifests))
    for m in manifests:
        streams = ffprobe_streams(tmp_path / f"{m['seq']}.ts")
        assert streams["audio"]["codec_name"] == "aac"
        assert streams["audio"]["sample_rate"] == "48000" and streams["audio"]["channels"] == 1
        video_s = float(streams["video"]["duration"])
        assert abs(float(streams["audio"]["duration"]) - video_s) < 0.1, streams
        assert abs(float(streams["audio"]["start_time"])
                   - float(streams["video"]["start_time"])) < 0.05, streams
    got = decode_audio(joined)
    first_pts = manifests[0]["start_mono"] - T0  # the recording starts at the buffer's keyframe
    sent_part = sent[int(first_pts * SAMPLE_RATE):]
    r, lag = best_correlation(envelope(sent_part), envelope(got))
    assert r > 0.9, (r, lag)
    assert abs(lag) <= 2, lag  # within 40 ms of where it was sent


def test_without_sound_the_recording_is_video_only_as_before(tmp_path, keys, clip) -> None:
    card, manifests = record(tmp_path, keys, clip[:3 * FPS], None)
    assert manifests
    streams = ffprobe_streams(decrypt(card, keys, manifests[0], tmp_path / "a.ts"))
    assert set(streams) == {"video"}


def test_a_dead_microphone_gives_video_only_segments(tmp_path, keys, clip) -> None:
    card, manifests = record(tmp_path, keys, clip[:3 * FPS], np.zeros(0, np.int16))
    assert manifests and sum(m["frames"] for m in manifests) == 3 * FPS
    streams = ffprobe_streams(decrypt(card, keys, manifests[0], tmp_path / "a.ts"))
    assert set(streams) == {"video"}


def test_a_gap_in_the_sound_still_plays(tmp_path, keys, clip) -> None:
    sent = bursts(4.0)
    sent[SAMPLE_RATE:int(1.5 * SAMPLE_RATE)] = 0
    chunks = [c for c in chunks_of(sent, T0) if not (1.0 <= c.mono_s - T0 < 2.5)]  # 1.5 s lost
    card = tmp_path / "card"
    recorder = SegmentRecorder(
        SegmentStore(card), device_id="tok-snd-01", recipients=[keys["recipient"]],
        signing_key=keys["signing_key"], fps=FPS, size=(160, 120),
        policy=RecordingPolicy(preroll_s=0.0, call_id="call-gap"), segment_s=10.0,
        audio=AudioFeed())
    recorder.update()
    feed_in_arrival_order(clip[:4 * FPS], chunks, recorder.on_frame, recorder.on_audio)
    recorder.close()
    (manifest,) = [json.loads(p.read_text()) for p in card.glob("*.json")]
    ts = decrypt(card, keys, manifest, tmp_path / "gap.ts")
    assert manifest["frames"] == 4 * FPS
    got = decode_audio(ts)
    assert len(got) >= 2.3 * SAMPLE_RATE  # before and after the gap
    assert ffprobe_streams(ts)["audio"]["codec_name"] == "aac"


def test_a_segment_cut_anywhere_still_decodes_sound_and_picture(tmp_path, keys, clip) -> None:
    card, manifests = record(tmp_path, keys, clip[:4 * FPS], bursts(4.0), segment_s=10.0)
    plain = decrypt(card, keys, manifests[0], tmp_path / "whole.ts").read_bytes()
    for fraction in (0.37, 0.61, 0.9):
        cut = tmp_path / f"cut-{fraction}.ts"
        cut.write_bytes(plain[:int(len(plain) * fraction) + 77])  # mid TS packet
        with av.open(str(cut)) as container:
            frames = sum(1 for _ in container.decode(video=0))
        audio = decode_audio(cut)
        assert frames >= 0.8 * fraction * 4 * FPS, (fraction, frames)
        assert len(audio) >= 0.8 * fraction * 4 * SAMPLE_RATE, (fraction, len(audio))


# -- the pure parts ----------------------------------------------------------------------------

def packet(at: float) -> AudioPacket:
    return AudioPacket(b"\xff", at, 1024 / SAMPLE_RATE)


def frame(at: float, key: bool = False) -> EncodedFrame:
    return EncodedFrame(b"", at, key, UTC0)


def test_the_interleaver_puts_late_sound_before_the_frame_it_precedes() -> None:
    sync = AvInterleaver(max_wait_s=0.3)
    assert sync.video(frame(0.0, True)) == []  # waits for sound of its instant
    out = sync.audio(packet(-0.01)) + sync.audio(packet(0.01))
    assert [round(i.pts_s, 2) for i in out] == [-0.01, 0.0]
    out = sync.video(frame(0.04)) + sync.audio(packet(0.03)) + sync.audio(packet(0.05))
    assert [round(i.pts_s, 2) for i in out] == [0.01, 0.03, 0.04]


def test_the_interleaver_lets_video_go_when_the_microphone_is_silent() -> None:
    sync = AvInterleaver(max_wait_s=0.3)
    released = []
    for n in range(20):
        released += sync.video(frame(n * 0.04))
    assert len(released) == 20 - 8  # each frame waits 0.3 s of newer video, then goes


def test_the_pre_event_buffer_keeps_the_sound_of_the_picture_it_keeps() -> None:
    seg = Segmenter(segment_s=10.0, preroll_s=1.0)
    for n in range(100):  # 4 s, a keyframe every 0.5 s
        seg.push(frame(n * 0.04, n % 12 == 0))
        seg.push_audio(packet(n * 0.04 + 0.01))
    events = seg.start_recording()
    assert isinstance(events[0], SegmentStart)
    frames = [e.frame.pts_s for e in events if isinstance(e, FrameOut)]
    sounds = [e.packet.pts_s for e in events if isinstance(e, AudioOut)]
    assert min(sounds) > frames[0] and len(sounds) == len(frames)


def test_aac_frames_are_timed_on_the_device_clock_and_survive_a_short_gap() -> None:
    encoder = AacEncoder()
    pcm = bursts(1.0)
    chunks = chunks_of(pcm, 50.0)
    out = [p for c in chunks[:20] + chunks[25:] for p in encoder.encode(c)] + encoder.flush()
    assert encoder.restarts == 0 and encoder.filled_samples == 5 * CHUNK_SAMPLES
    assert out[0].pts_s == pytest.approx(50.0 - 1024 / SAMPLE_RATE)  # encoder priming
    steps = {round(b.pts_s - a.pts_s, 6) for a, b in pairwise(out)}
    assert steps == {round(1024 / SAMPLE_RATE, 6)}
    assert all(p.data[:2] == b"\xff\xf1" for p in out)  # ADTS


def test_sos_evidence_export_plays_picture_and_sound(tmp_path, keys, clip) -> None:
    from control_center.evidence_cli import main
    from evidence_format import minisign

    card, _ = record(tmp_path, keys, clip[:5 * FPS], bursts(5.0), start_at_s=0.0)
    pub = tmp_path / "device.pub"
    pub.write_text(minisign.public_key_file(keys["signing_key"].public_key()))
    assert main(["export", str(card), "--identity", str(keys["identity"]), "--call", "call-snd",
                 "-o", str(tmp_path / "out"), "--pubkey", str(pub)]) == 0
    streams = ffprobe_streams(tmp_path / "out" / "call-snd.ts")
    assert streams["audio"]["codec_name"] == "aac" and streams["video"]["codec_name"] == "h264"
    assert abs(float(streams["audio"]["duration"]) - float(streams["video"]["duration"])) < 0.1
