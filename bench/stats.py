"""Latency summaries: nearest-rank percentiles over samples in seconds, reported in ms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Summary:
    """One line of the report. Times are milliseconds."""

    key: str
    label: str
    n: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        """Rounded to the microsecond: finer digits are noise."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted samples: always a value that was measured.

    With 200 samples p99 is the 198th value, i.e. two samples lie above it.
    """
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summarise(key: str, label: str, samples_s: Sequence[float]) -> Summary:
    ordered = sorted(s * 1000.0 for s in samples_s)
    return Summary(
        key=key,
        label=label,
        n=len(ordered),
        p50_ms=percentile(ordered, 50),
        p95_ms=percentile(ordered, 95),
        p99_ms=percentile(ordered, 99),
        max_ms=ordered[-1] if ordered else math.nan,
    )
