"""The bench's output: a readable table, or one JSON object with the same numbers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .stats import Summary


@dataclass
class Report:
    """Everything measured in one run. `floor` and `ours` decide the verdict."""

    context: dict[str, Any]
    floor: Summary
    floor_puback: Summary
    ours: Summary
    breakdown: list[Summary]
    target_ms: float
    errors: list[str] = field(default_factory=list)

    @property
    def p99_gap_ms(self) -> float:
        return self.ours.p99_ms - self.floor.p99_ms

    @property
    def target_met(self) -> bool:
        complete = not self.errors and self.ours.n > 0 and self.floor.n > 0
        return complete and not math.isnan(self.p99_gap_ms) and self.p99_gap_ms <= self.target_ms

    def verdict(self) -> str:
        line = (f"p99 difference ours vs floor: {self.p99_gap_ms:.2f} ms "
                f"(target: within {self.target_ms:g} ms)")
        if self.errors:
            return f"{line} -> INCOMPLETE RUN, no verdict"
        return f"{line} -> {'MET' if self.target_met else 'MISSED'}"

    def as_json(self) -> str:
        return json.dumps(_finite({
            "context": self.context,
            "floor": self.floor.as_dict(),
            "floor_puback": self.floor_puback.as_dict(),
            "ours": self.ours.as_dict(),
            "breakdown": [s.as_dict() for s in self.breakdown],
            "verdict": {
                "p99_gap_ms": round(self.p99_gap_ms, 3),
                "target_ms": self.target_ms,
                "met": self.target_met,
                "text": self.verdict(),
            },
            "errors": self.errors,
        }), indent=2, allow_nan=False)

    def as_table(self) -> str:
        label_w = max(len(s.label) for s in self._rows()) + 2
        head = f"{'':{label_w}}{'n':>5}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  (ms)"
        out = [self._title(), "", head]
        out += [_row(s, label_w) for s in (self.floor, self.floor_puback, self.ours)]
        if self.breakdown:
            out += ["", "where the time goes (the first three from the run above; the rest "
                    "measured alone, same filesystem):"]
            out += [_row(s, label_w) for s in self.breakdown]
        out += [""] + [f"ERROR: {e}" for e in self.errors] + [self.verdict()]
        return "\n".join(out)

    def _rows(self) -> list[Summary]:
        return [self.floor, self.floor_puback, self.ours, *self.breakdown]

    def _title(self) -> str:
        c = self.context
        return (f"SOS latency bench: one private Mosquitto over TLS at {c['broker']}, "
                f"{c['presses']} samples per line after {c['warmup']} warm-up\n"
                f"temp data on {c['filesystem']} under {c['tmpdir']}; {c['cpus']} CPU(s); "
                f"alert payload {c['payload_bytes']} B (floor payload the same size)")


def _row(s: Summary, label_w: int) -> str:
    return (f"{s.label:{label_w}}{s.n:>5}{s.p50_ms:>9.2f}{s.p95_ms:>9.2f}"
            f"{s.p99_ms:>9.2f}{s.max_ms:>9.2f}")


def _finite(value: Any) -> Any:
    """NaN (a line with no samples) becomes null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
