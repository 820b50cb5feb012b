"""The segment store on a real (small) filesystem, and the pure space planner."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from evidence_format.files import atomic_write
from firmware.camera.space import RecordMode, SpaceLimits, StoredSegment, plan
from firmware.camera.store import SegmentStore

MiB = 2**20
LIMITS = SpaceLimits(low_water=50 * MiB, high_water=100 * MiB, reserve=20 * MiB,
                     min_write=5 * MiB)


def seg(seq: int, *, evidence: bool = False, uploaded: bool = False,
        size: int = 10 * MiB) -> StoredSegment:
    return StoredSegment(seq, size, evidence, uploaded)


# -- the planner ---------------------------------------------------------------------------------
def test_with_room_enough_nothing_is_deleted() -> None:
    result = plan([seg(1, uploaded=True)], free=200 * MiB, sos_active=False, limits=LIMITS)
    assert (result.delete, result.mode, result.alert) == ([], RecordMode.NORMAL, None)


def test_low_space_deletes_the_oldest_uploaded_segments_until_high_water() -> None:
    segments = [seg(i, uploaded=True) for i in range(1, 10)]
    result = plan(segments, free=40 * MiB, sos_active=False, limits=LIMITS)
    assert result.delete == [1, 2, 3, 4, 5, 6]  # 40 + 6 x 10 = 100 MiB
    assert result.mode is RecordMode.NORMAL


def test_unuploaded_evidence_is_never_deleted() -> None:
    segments = [seg(i, evidence=True) for i in range(1, 10)]
    result = plan(segments, free=10 * MiB, sos_active=True, limits=LIMITS)
    assert result.delete == []
    assert result.mode is RecordMode.EVIDENCE_ONLY and "storage low" in result.alert


def test_when_nothing_can_be_freed_ordinary_recording_stops_and_an_alert_is_raised() -> None:
    segments = [seg(1), seg(2, evidence=True)]
    result = plan(segments, free=10 * MiB, sos_active=False, limits=LIMITS)
    assert result.delete == [] and result.mode is RecordMode.EVIDENCE_ONLY
    assert "ordinary recording stopped" in result.alert


def test_during_an_sos_unuploaded_ordinary_footage_makes_room_for_evidence() -> None:
    segments = [seg(1), seg(2, evidence=True), seg(3)]
    result = plan(segments, free=6 * MiB, sos_active=True, limits=LIMITS)
    assert result.delete == [1, 3] and result.deleted_unuploaded_ordinary == [1, 3]
    assert result.mode is RecordMode.NORMAL and "were deleted" in result.alert


def test_below_the_minimum_write_nothing_can_be_recorded() -> None:
    result = plan([seg(1, evidence=True)], free=1 * MiB, sos_active=True, limits=LIMITS)
    assert result.mode is RecordMode.FULL and "storage full" in result.alert


def test_inconsistent_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="min_write <= reserve"):
        SpaceLimits(low_water=10, high_water=5)


# -- the store -----------------------------------------------------------------------------------
def commit(store: SegmentStore, seq: int, payload: bytes, *, evidence: bool = False) -> None:
    f = store.open_segment(seq)
    f.write(payload)
    manifest = b'{"seq": %d}\n' % seq
    store.commit(seq, f, manifest=manifest, signature=b"sig", evidence=evidence,
                 manifest_sha256=hashlib.sha256(manifest).hexdigest(), call_id="call-1")


def test_a_committed_segment_is_indexed_with_its_files(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path)
    commit(store, 7, b"x" * 1000, evidence=True)
    (segment,) = store.segments()
    assert (segment.seq, segment.evidence, segment.uploaded) == (7, True, False)
    assert segment.size == 1000 + len(b'{"seq": 7}\n') + 3
    assert store.last()[0] == 7


def test_recovery_finds_the_interrupted_segment_and_reindexes_a_lost_row(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path)
    commit(store, 1, b"a")
    commit(store, 2, b"b")
    store._db.execute("DELETE FROM segments WHERE seq = 2")  # the crash hit before the index row
    cut = store.open_segment(3)
    cut.write(b"partial")
    cut.close()  # ... and then the power went
    store.close()

    reopened = SegmentStore(tmp_path)
    (interrupted,) = reopened.recover()
    assert interrupted.seq == 3 and interrupted.part_file.read_bytes() == b"partial"
    assert [s.seq for s in reopened.segments()] == [1, 2]


def test_only_uploaded_segments_are_marked_deletable(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path)
    commit(store, 1, b"a")
    store.mark_uploaded(1)
    store.delete(1)
    assert store.segments() == [] and not list(tmp_path.glob("000001*"))


def test_the_chain_continues_after_every_segment_was_uploaded_and_deleted(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path)
    commit(store, 1, b"a")
    commit(store, 2, b"b")
    for seq in (1, 2):
        store.mark_uploaded(seq)
        store.delete(seq)
    store.close()
    reopened = SegmentStore(tmp_path)  # a reboot with an empty card
    assert reopened.segments() == []
    assert reopened.last() == (2, hashlib.sha256(b'{"seq": 2}\n').hexdigest())


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A real 1 MiB filesystem, so 'disk full' is the kernel's ENOSPC, not a mock."""
    mount = tmp_path / "card"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the disk-full test (needs root): "
                    f"{done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_card_fails_the_write_cleanly_and_keeps_the_old_file(tiny_fs: Path) -> None:
    target = tiny_fs / "000001.json"
    atomic_write(target, b"old")
    with pytest.raises(OSError) as failure:
        atomic_write(target, os.urandom(2 * MiB))
    assert failure.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"
    assert not list(tiny_fs.glob("*.tmp"))
