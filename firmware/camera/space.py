"""What to delete when the card fills up, and what may still be recorded: pure logic.

Rules, in order (the issue's, plus one decision of ours, marked):
1. Below `low_water` free bytes, delete the oldest segments that the centre has confirmed
   (uploaded, with a receipt) until `high_water` is free again.
2. Never delete an evidence segment that is not uploaded.
3. Ours: while an SOS is recording and nothing uploaded is left to delete, delete the oldest
   NOT-uploaded ordinary (non-evidence) segments: SOS evidence is worth more than routine
   footage. Logged loudly and reported in the storage alert.
4. When nothing more may be deleted and space is below `reserve`: stop ordinary recording, keep
   recording SOS evidence for as long as space lasts, and raise a storage alert.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RecordMode(StrEnum):
    NORMAL = "normal"  # record everything
    EVIDENCE_ONLY = "evidence_only"  # ordinary recording stopped; SOS evidence still recorded
    FULL = "full"  # nothing can be written


@dataclass(frozen=True)
class StoredSegment:
    seq: int
    size: int  # bytes on the card (segment + manifest + signature)
    evidence: bool
    uploaded: bool


@dataclass(frozen=True)
class SpaceLimits:
    low_water: int = 512 * 2**20  # start freeing below this
    high_water: int = 1024 * 2**20  # free until this much is free again
    reserve: int = 64 * 2**20  # below this, ordinary recording stops
    min_write: int = 8 * 2**20  # below this nothing can be written (about 8 s of 8 Mbit/s)

    def __post_init__(self) -> None:
        if not self.min_write <= self.reserve <= self.low_water <= self.high_water:
            raise ValueError("space limits must satisfy min_write <= reserve <= low_water <= "
                             "high_water")


@dataclass(frozen=True)
class SpacePlan:
    delete: list[int]  # seqs, oldest first
    deleted_unuploaded_ordinary: list[int]  # the subset taken under rule 3
    mode: RecordMode
    alert: str | None  # why the operator must hear about it, or None


def plan(segments: list[StoredSegment], free: int, *, sos_active: bool,
         limits: SpaceLimits = SpaceLimits()) -> SpacePlan:
    """Decide deletions and the recording mode for `free` bytes with `segments` on the card."""
    delete: list[int] = []
    rule3: list[int] = []
    if free < limits.low_water:
        oldest_first = sorted(segments, key=lambda s: s.seq)
        for segment in oldest_first:
            if free >= limits.high_water:
                break
            if segment.uploaded:
                delete.append(segment.seq)
                free += segment.size
        if free < limits.reserve and sos_active:
            for segment in oldest_first:
                if free >= limits.reserve:
                    break
                if not segment.uploaded and not segment.evidence:
                    delete.append(segment.seq)
                    rule3.append(segment.seq)
                    free += segment.size
    if free < limits.min_write:
        mode = RecordMode.FULL
    elif free < limits.reserve:
        mode = RecordMode.EVIDENCE_ONLY
    else:
        mode = RecordMode.NORMAL
    alert = None
    if mode is not RecordMode.NORMAL:
        effect = ("nothing can be recorded" if mode is RecordMode.FULL
                  else "ordinary recording stopped, SOS evidence still recorded")
        alert = (f"storage {'full' if mode is RecordMode.FULL else 'low'}: {free // 2**20} MiB "
                 f"free after deleting every uploaded segment; {effect}; dock the device to "
                 "upload")
    if rule3:
        alert = (alert or "storage low") + (f"; {len(rule3)} ordinary segment(s) not yet "
                                            "uploaded were deleted to keep recording SOS evidence")
    return SpacePlan(sorted(delete), rule3, mode, alert)
