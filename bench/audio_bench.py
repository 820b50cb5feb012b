"""`python -m bench.audio_bench`: what sound costs the recorder, per second of audio.

ours   our path: 20 ms chunks -> AacEncoder (ADTS) -> TsSegmentWriter.write_audio, beside the
       video it is muxed with, into a sink that discards
floor  PyAV's aac encoder alone on the same samples (no ADTS, no muxing)

Both on one core, 64 kbit/s mono 48 kHz, a 440 Hz tone; the figure is CPU ms per second of
sound (and its share of one core).
"""

from __future__ import annotations

import math
import struct
import time
from datetime import UTC, datetime
from fractions import Fraction

import av

from firmware.audio.aac import AacEncoder
from firmware.audio.source import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk
from firmware.camera.synthetic import encode_clip
from firmware.camera.tsmux import TsSegmentWriter

SECONDS = 20


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _chunks(seconds: int) -> list[AudioChunk]:
    tone = b"".join(struct.pack("<h", int(9000 * math.sin(2 * math.pi * 440 * n / SAMPLE_RATE)))
                    for n in range(SAMPLE_RATE))
    utc = datetime.now(UTC)
    out = []
    for k in range(seconds * SAMPLE_RATE // CHUNK_SAMPLES):
        at = (k * CHUNK_SAMPLES) % SAMPLE_RATE
        out.append(AudioChunk(tone[2 * at:2 * (at + CHUNK_SAMPLES)], k * CHUNK_SAMPLES,
                              k * CHUNK_SAMPLES / SAMPLE_RATE, utc))
    return out


def floor_ms_per_s(chunks: list[AudioChunk]) -> float:
    ctx = av.CodecContext.create("aac", "w")
    ctx.sample_rate, ctx.layout, ctx.format, ctx.bit_rate = SAMPLE_RATE, "mono", "fltp", 64_000
    ctx.time_base = Fraction(1, SAMPLE_RATE)
    ctx.open()
    start = time.process_time()
    for chunk in chunks:
        frame = av.AudioFrame(format="s16", layout="mono", samples=CHUNK_SAMPLES)
        frame.planes[0].update(chunk.pcm)
        frame.sample_rate, frame.pts = SAMPLE_RATE, chunk.index
        frame.time_base = Fraction(1, SAMPLE_RATE)
        ctx.encode(frame)
    ctx.encode(None)
    return (time.process_time() - start) * 1000 / (len(chunks) * CHUNK_SAMPLES / SAMPLE_RATE)


def ours_ms_per_s(chunks: list[AudioChunk]) -> float:
    video = encode_clip("bench-audio", 25, size=(160, 120), fps=25, t0=0.0)
    writer = TsSegmentWriter(_Discard(), 25, (160, 120), audio=True)
    writer.write(video[0])
    encoder = AacEncoder()
    start = time.process_time()
    for chunk in chunks:
        for packet in encoder.encode(chunk):
            writer.write_audio(packet)
    for packet in encoder.flush():
        writer.write_audio(packet)
    writer.close()
    return (time.process_time() - start) * 1000 / (len(chunks) * CHUNK_SAMPLES / SAMPLE_RATE)


def run(seconds: int = SECONDS) -> list[tuple[str, float]]:
    chunks = _chunks(seconds)
    floor = min(floor_ms_per_s(chunks) for _ in range(2))
    ours = min(ours_ms_per_s(chunks) for _ in range(2))
    return [("audio floor: aac encode, ms CPU per s of sound", round(floor, 2)),
            ("audio ours: aac encode + ADTS + mpegts mux, ms CPU per s of sound", round(ours, 2))]


def main() -> None:
    rows = run()
    for name, value in rows:
        print(f"{name:70s} {value:8.2f}")
    floor, ours = rows[0][1], rows[1][1]
    print(f"sound costs {ours / 10:.2f}% of one core ({ours / floor:.2f}x the bare encoder)")


if __name__ == "__main__":
    main()
