"""Half-duplex: the pillar's microphone is muted while the operator's voice comes out of its
speaker, so a kiosk without echo cancellation does not send the operator their own voice back.

aiortc has no acoustic echo canceller. A pillar whose sound card has none in hardware (a USB
speakerphone has) can set `voice.duplex = "half"`: then only one side is heard at a time, as on
an intercom. The operator's voice wins: while what the speaker plays is louder than
`threshold` (and for `hangover_s` after, the room's echo dies away), the microphone sends
silence. The citizen interrupts by speaking when the operator pauses. docs/VOICE.md, "Echo
cancellation".

Pure: levels and times come in as arguments; no clock, no I/O.
"""

from __future__ import annotations

import math

DEFAULT_THRESHOLD = 0.02  # RMS of full scale (-34 dBFS): speech, not Opus comfort noise
DEFAULT_HANGOVER_S = 0.3  # a room's echo fades within this after the operator stops


def rms(pcm: bytes) -> float:
    """The RMS level of s16le PCM as a fraction of full scale (0.0 for no samples)."""
    count = len(pcm) // 2
    if count == 0:
        return 0.0
    samples = memoryview(pcm[: count * 2]).cast("h")
    return math.sqrt(sum(s * s for s in samples) / count) / 32768.0


class HalfDuplexGate:
    """Whether the microphone may be heard now, from what the speaker played."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD,
                 hangover_s: float = DEFAULT_HANGOVER_S) -> None:
        if threshold <= 0 or hangover_s < 0:
            raise ValueError("threshold must be > 0 and hangover_s >= 0")
        self.threshold = threshold
        self.hangover_s = hangover_s
        self._loud_until: float | None = None

    def played(self, level: float, now: float) -> None:
        """The speaker played sound of this RMS level at `now`."""
        if level >= self.threshold:
            self._loud_until = now + self.hangover_s

    def microphone_open(self, now: float) -> bool:
        return self._loud_until is None or now >= self._loud_until
