"""The "GPS decoder" part of `python -m bench`: our NMEA decoder beside bare `pynmea2.parse`.

  ours      `NmeaDecoder.feed` (the device's configuration) on each receiver log of the project's
            corpus (tests/data/nmea/logs), fed in the chunk sizes the reader gets from a UART
            (1..64 bytes, fixed seed): framing, checksum, fields, plausibility, epochs and Fixes
  pynmea2   `pynmea2.parse(line, check=True)` on the same lines, already cut and decoded to
            str (a ParseError is caught and counted, as any parser of a real port must)

Lines/s are the corpus's non-empty lines divided by the wall time of one pass. The two lines run
interleaved, `repeats` times each, and the best pass of each counts. The target is ours at
least 0.8 of pynmea2's lines/s: pynmea2 alone does less (no framing, no plausibility, no
epochs), so this bounds what the decoder adds on top of parsing. Benchmarks report; nothing here
asserts a time.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynmea2

from firmware.gps.nmea import NmeaDecoder

from .report import GpsReport

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "nmea" / "logs"
TARGET_RATIO = 0.8
CHUNK_MAX = 64  # the reader reads what the UART has waiting: 1..64 bytes at 9600 baud
_EOL = re.compile(rb"[\r\n]+")


def load_corpus(directory: Path = CORPUS) -> list[bytes]:
    """The bytes of every receiver log, in name order."""
    return [p.read_bytes() for p in sorted(directory.glob("*.log"))]


def lines_of(data: bytes) -> list[str]:
    """The non-empty lines, as text for pynmea2 (latin-1: binary noise stays one char a byte)."""
    return [line.decode("latin-1") for line in _EOL.split(data) if line.strip()]


def chunks_of(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` cut as a reader gets it from a UART: 1..CHUNK_MAX bytes a read."""
    out: list[bytes] = []
    i = 0
    while i < len(data):
        n = rng.randint(1, CHUNK_MAX)
        out.append(data[i : i + n])
        i += n
    return out


def time_ours(logs: list[list[bytes]]) -> tuple[float, int]:
    """(seconds, fixes) for one pass: a fresh decoder per log, as after a reboot."""
    fixes = 0
    started = time.perf_counter()
    for chunks in logs:
        feed = NmeaDecoder().feed
        for chunk in chunks:
            fixes += len(feed(chunk, 1.0))
    return time.perf_counter() - started, fixes


def time_pynmea2(lines: list[str]) -> float:
    """Seconds for one pass of `pynmea2.parse(check=True)` over every line."""
    parse = pynmea2.parse
    started = time.perf_counter()
    for line in lines:
        try:
            parse(line, check=True)
        except ValueError:  # pynmea2's ParseError, ChecksumError, SentenceTypeError
            continue
    return time.perf_counter() - started


def run_gps(repeats: int = 5, *, directory: Path = CORPUS,
            progress: Callable[[str], None] = lambda _text: None,
            context: dict[str, Any] | None = None) -> GpsReport:
    """Best of `repeats` interleaved passes of each line; errors are reported, not raised."""
    logs = load_corpus(directory)
    lines = [line for data in logs for line in lines_of(data)]
    rng = random.Random(1)
    chunked = [chunks_of(data, rng) for data in logs]
    report = GpsReport(logs=len(logs), lines=len(lines), size_bytes=sum(map(len, logs)),
                       reads=sum(map(len, chunked)), repeats=repeats, target_ratio=TARGET_RATIO,
                       context=dict(context or {}))
    if not lines:
        report.errors.append(f"no NMEA logs under {directory}")
        return report
    progress(f"gps: {repeats} x ({len(lines)} lines through our decoder and through pynmea2)")
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(repeats):
        seconds, report.fixes = time_ours(chunked)
        ours.append(seconds)
        theirs.append(time_pynmea2(lines))
    report.ours_lines_s = len(lines) / min(ours)
    report.pynmea2_lines_s = len(lines) / min(theirs)
    return report
