"""When to record, and which segments are evidence: pure logic, times passed in.

- A call starts recording (a `call_start` command from dispatch, or the documented button
  gesture) and its end stops it; every segment carries the call id while there is one.
- An SOS always records, whatever else is going on, until the operator closes the alert.
- Segments of an SOS's window are flagged `evidence` and `sos`: from `preroll_s` before the
  trigger (the pre-event buffer becomes the start of the recording) until the alert is closed.
- The storage mode limits what may be recorded: EVIDENCE_ONLY keeps only SOS recording, FULL
  records nothing (space.py decides the mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from firmware.camera.space import RecordMode


@dataclass(frozen=True)
class SosWindow:
    alert_id: str
    start_s: float  # the trigger instant minus the preroll
    end_s: float | None = None  # None while the alert is open


@dataclass
class RecordingPolicy:
    preroll_s: float = 30.0
    call_id: str | None = None
    mode: RecordMode = RecordMode.NORMAL
    windows: list[SosWindow] = field(default_factory=list)

    # -- inputs ----------------------------------------------------------------------------------
    def call_start(self, call_id: str) -> None:
        self.call_id = call_id

    def call_end(self) -> None:
        self.call_id = None

    def sos_start(self, alert_id: str, at_s: float) -> None:
        if not any(w.alert_id == alert_id for w in self.windows):
            self.windows.append(SosWindow(alert_id, at_s - self.preroll_s))

    def sos_end(self, alert_id: str, at_s: float) -> None:
        self.windows = [SosWindow(w.alert_id, w.start_s, at_s) if w.alert_id == alert_id
                        and w.end_s is None else w for w in self.windows]

    def set_mode(self, mode: RecordMode) -> None:
        self.mode = mode

    # -- decisions -------------------------------------------------------------------------------
    @property
    def sos_active(self) -> bool:
        return any(w.end_s is None for w in self.windows)

    def should_record(self) -> bool:
        if self.mode is RecordMode.FULL:
            return False
        if self.sos_active:
            return True
        return self.mode is RecordMode.NORMAL and self.call_id is not None

    def flags(self, start_s: float, end_s: float) -> list[str]:
        """Flags for a segment covering [start_s, end_s] (monotonic seconds)."""
        for window in self.windows:
            closes = window.end_s if window.end_s is not None else float("inf")
            if end_s >= window.start_s and start_s <= closes:
                return ["evidence", "sos"]
        return []

    def forget_windows_before(self, s: float) -> None:
        """Drop closed windows that end before `s` (every segment up to it is flagged)."""
        self.windows = [w for w in self.windows if w.end_s is None or w.end_s >= s]
