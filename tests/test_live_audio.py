"""Sound in the live view: chunks with an AAC track, through the centre's receiver, played
from its HLS playlist by ffprobe."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from control_center.live import LiveReceiver
from firmware.camera.avfeed import AudioFeed
from firmware.camera.frames import EncodedFrame
from firmware.camera.live import LiveStreamer
from firmware.camera.synthetic import encode_clip
from protocol import new_id
from protocol.signing import Signer
from tests.test_camera_audio import (
    best_correlation,
    bursts,
    chunks_of,
    decode_audio,
    envelope,
    feed_in_arrival_order,
)
from tests.test_live_centre import DEVICE, DEVICE_KEY, FPS, UTC0, keys_for, live_key  # noqa: F401

T0 = 100.0


@pytest.fixture(scope="module")
def lores() -> list[EncodedFrame]:
    return encode_clip(DEVICE, 4 * FPS, size=(160, 120), fps=FPS, bitrate=200_000, gop_s=0.5,
                       t0=T0, utc0=UTC0)


def stream_with_sound(live_key, clip, pcm) -> tuple[str, list[tuple[bytes, dict[str, Any]]]]:  # noqa: F811
    sent: list[tuple[bytes, dict[str, Any]]] = []
    live = LiveStreamer(DEVICE, [live_key[1]], Signer(DEVICE_KEY),
                        lambda p, h: sent.append((p, h)) is None, 0.5, clock=lambda: 0.0,
                        fps=FPS, size=(160, 120), max_pending=64, threaded=False,
                        audio=AudioFeed())
    alert_id = new_id()
    live.start(alert_id)
    feed_in_arrival_order(clip, chunks_of(pcm, T0), live.on_lores, live.on_audio)
    live.stop()
    live.pump()
    return alert_id, sent


def probe(path: Path) -> dict[str, dict]:
    run = subprocess.run(["/usr/bin/ffprobe", "-v", "error", "-show_entries",
                          "stream=codec_type,codec_name,sample_rate,duration", "-of", "json",
                          str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return {s["codec_type"]: s for s in json.loads(run.stdout)["streams"]}


def test_the_live_view_carries_sound_to_the_centres_hls(live_key, lores, tmp_path) -> None:  # noqa: F811
    sent_pcm = bursts(4.0)
    alert_id, sent = stream_with_sound(live_key, lores, sent_pcm)
    assert len(sent) >= 6 and sent[-1][1]["final"]
    receiver = LiveReceiver(live_key[0], tmp_path / "live", keys_for,
                            clock=lambda: UTC0.timestamp() + 2.0)
    for payload, header in sent:
        assert receiver.handle(DEVICE, payload, header).accepted
    stream_dir = tmp_path / "live" / alert_id
    chunk_files = sorted(stream_dir.glob("chunk-*.ts"))
    assert len(chunk_files) == len(sent)
    for chunk in chunk_files:  # each starts with PAT, PMT and an IDR, and plays on its own
        first_pid = int.from_bytes(chunk.read_bytes()[1:3], "big") & 0x1FFF
        assert first_pid in (0x0000, 0x0011), chunk.name  # PAT (the first chunk: SDT, PAT)
        assert "video" in probe(chunk)
    playlist = probe(stream_dir / "index.m3u8")
    assert playlist["audio"]["codec_name"] == "aac" and playlist["audio"]["sample_rate"] == "48000"
    whole = probe(stream_dir / "live.ts")
    assert abs(float(whole["audio"]["duration"]) - float(whole["video"]["duration"])) < 0.1
    got = decode_audio(stream_dir / "live.ts")
    r, lag = best_correlation(envelope(sent_pcm), envelope(got))
    assert r > 0.9 and abs(lag) <= 2, (r, lag)
