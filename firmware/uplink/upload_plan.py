"""What the shift-end upload does in which order, how long it waits, and how far it got: pure.

- `order`: evidence and SOS segments first (oldest first among them), then the rest oldest
  first. The most important recordings reach the centre first if the dock time runs out.
- `Backoff`: exponential with jitter, capped, and never sooner than the server's Retry-After.
- `Progress` and `render_bar`: segments and bytes done out of the total, as a text bar.
- `parse_retry_after`: the header's two forms (seconds, or an HTTP date against a given now).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime


@dataclass(frozen=True)
class Candidate:
    """One segment waiting for upload."""

    seq: int
    size: int  # bytes of the .ts.age file, what is PATCHed
    evidence: bool = False
    sos: bool = False

    @property
    def priority(self) -> int:
        """0 for evidence/SOS, 1 for the rest."""
        return 0 if self.evidence or self.sos else 1


def order(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Evidence and SOS segments first, then the rest; oldest (lowest seq) first in each."""
    return sorted(candidates, key=lambda c: (c.priority, c.seq))


# -- backoff ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backoff:
    """Delay before attempt `attempt + 1` after `attempt` consecutive failures (0-based).

    `base_s * factor**attempt`, capped at `max_s`, then "equal jitter": a random share of up to
    `jitter` of it is taken off (a fleet docked at once does not come back in step). A
    Retry-After from the server is a floor: we never come back sooner than it asks, even if it
    asks for more than `max_s`.
    """

    base_s: float = 1.0
    factor: float = 2.0
    max_s: float = 300.0
    jitter: float = 0.5  # 0: no jitter; 0.5: between half and all of the exponential delay

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.factor < 1 or self.max_s < self.base_s or \
                not 0 <= self.jitter <= 1:
            raise ValueError("backoff needs base_s > 0, factor >= 1, max_s >= base_s and "
                             "0 <= jitter <= 1")

    def delay(self, attempt: int, rand: float, retry_after_s: float | None = None) -> float:
        """`rand` in [0, 1) (injected, so tests are exact)."""
        exp = self.max_s if attempt >= 64 else min(self.max_s,
                                                   self.base_s * self.factor ** max(0, attempt))
        jittered = exp * (1.0 - self.jitter * rand)
        if retry_after_s is not None and retry_after_s > jittered:
            return retry_after_s
        return jittered


DELTA_SECONDS = re.compile(r"[0-9]{1,9}")
MAX_RETRY_AFTER_S = 86_400.0  # a server asking for more is wrong; come back within a day


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds, or an HTTP date (needs `now`,
    an aware datetime). None when absent or unreadable; never negative."""
    if value is None:
        return None
    value = value.strip()
    if DELTA_SECONDS.fullmatch(value):  # RFC 9110: 1*DIGIT (ASCII only: "²" is not a digit)
        return min(float(value), MAX_RETRY_AFTER_S)
    if now is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, (when - now).total_seconds()))


# -- progress --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    segments_total: int
    bytes_total: int
    segments_done: int = 0
    bytes_done: int = 0  # bytes the server holds of the segments in this pass
    current_seq: int | None = None

    @classmethod
    def start(cls, candidates: Iterable[Candidate]) -> Progress:
        items = list(candidates)
        return cls(segments_total=len(items), bytes_total=sum(c.size for c in items))

    def at(self, seq: int, base: int, offset: int) -> Progress:
        """Segment `seq` is at `offset` bytes; `base` is bytes_done before it started."""
        return replace(self, current_seq=seq, bytes_done=base + offset)

    def finished(self, seq: int, base: int, size: int) -> Progress:
        """Segment `seq` is done (uploaded, refused or skipped): its bytes count as handled."""
        return replace(self, current_seq=seq, segments_done=self.segments_done + 1,
                       bytes_done=base + size)

    @property
    def fraction(self) -> float:
        if self.bytes_total:
            return min(1.0, self.bytes_done / self.bytes_total)
        return 1.0 if self.segments_done >= self.segments_total else 0.0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def render_bar(progress: Progress, width: int = 30) -> str:
    """`[##########..........]  33%  2/6 segments  8.0/24.0 MB  (segment 000123)`"""
    filled = round(progress.fraction * width)
    bar = "#" * filled + "." * (width - filled)
    text = (f"[{bar}] {progress.fraction * 100:3.0f}%  {progress.segments_done}/"
            f"{progress.segments_total} segments  {_mb(progress.bytes_done)}/"
            f"{_mb(progress.bytes_total)} MB")
    if progress.current_seq is not None:
        text += f"  (segment {progress.current_seq:06d})"
    return text
