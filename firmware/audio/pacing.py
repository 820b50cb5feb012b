"""Which 20 ms chunks of a played file are due at a given instant. Pure: times are passed in.

A microphone hands over a chunk once its last sample was captured, so chunk n (samples
n*CHUNK_SAMPLES ...) is due at `start + (n + 1) * CHUNK_S`. Computing from the start instant
(not by adding 20 ms per chunk) keeps a long run from drifting.
"""

from __future__ import annotations

import math

SAMPLE_RATE = 48_000
CHUNK_SAMPLES = 960  # 20 ms
CHUNK_S = CHUNK_SAMPLES / SAMPLE_RATE
EPSILON_S = 1e-9  # float slack, so chunk n is due exactly at start + (n + 1) * 20 ms


def chunks_due(start_s: float, now_s: float) -> int:
    """How many chunks have been captured completely between `start_s` and `now_s`."""
    if now_s < start_s:
        return 0
    return max(0, math.floor((now_s - start_s) / CHUNK_S + EPSILON_S))


def due_at(start_s: float, chunk: int) -> float:
    """When chunk `chunk` (0-based) is complete."""
    return start_s + (chunk + 1) * CHUNK_S


def chunk_time(start_s: float, index: int) -> float:
    """Device time of sample `index` of a source that started at `start_s`."""
    return start_s + index / SAMPLE_RATE


def loop_slice(pcm: bytes, index: int, samples: int) -> bytes:
    """`samples` samples (s16, 2 bytes each) of `pcm` from sample `index`, wrapping around:
    a file played in a loop."""
    total = len(pcm) // 2
    if total == 0:
        return b"\x00\x00" * samples
    out = bytearray()
    at = index % total
    while len(out) < 2 * samples:
        take = min(total - at, samples - len(out) // 2)
        out += pcm[2 * at:2 * (at + take)]
        at = 0
    return bytes(out)
