"""The segmenter is pure: synthetic frames with made-up pts, no camera, no clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from firmware.camera.frames import EncodedFrame
from firmware.camera.segmenter import FrameOut, SegmentEnd, Segmenter, SegmentStart

UTC0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
FPS = 25
GOP = 25  # a keyframe every second


def frame(i: int, *, gop: int = GOP, t0: float = 100.0, size: int = 1000) -> EncodedFrame:
    return EncodedFrame(bytes(size), t0 + i / FPS, i % gop == 0, UTC0)


def feed(seg: Segmenter, first: int, count: int, **kw) -> list:
    events: list = []
    for i in range(first, first + count):
        events.extend(seg.push(frame(i, **kw)))
    return events


def segments(events: list) -> list[SegmentEnd]:
    return [e for e in events if isinstance(e, SegmentEnd)]


def test_nothing_comes_out_while_buffering() -> None:
    seg = Segmenter(segment_s=10, preroll_s=5)
    assert feed(seg, 0, 300) == []
    assert not seg.recording


def test_preroll_keeps_the_last_seconds_starting_at_a_keyframe() -> None:
    seg = Segmenter(segment_s=10, preroll_s=2.0)
    feed(seg, 0, 250)  # 0 .. 9.96 s after t0
    events = seg.start_recording()
    start = events[0]
    assert isinstance(start, SegmentStart) and start.first_frame.keyframe
    # The newest frame is 9.96 s; the keyframe at 8.0 s is within 2 s of it, 7.0 s is not.
    assert start.first_frame.pts_s == pytest.approx(100.0 + 8.0)
    outs = [e for e in events[1:] if isinstance(e, FrameOut)]
    assert len(outs) == 50 and outs[0].frame is start.first_frame
    assert [o.frame.pts_s for o in outs] == sorted(o.frame.pts_s for o in outs)
    assert outs[-1].frame.pts_s == pytest.approx(100.0 + 249 / FPS)


def test_preroll_never_exceeds_the_configured_span_and_memory_is_bounded() -> None:
    preroll = 3.0
    seg = Segmenter(segment_s=10, preroll_s=preroll)
    bound_frames = int(preroll * FPS) + 1
    most_frames = most_bytes = 0
    for i in range(10 * 60 * FPS):  # ten minutes of video
        seg.push(frame(i, size=2000))
        most_frames = max(most_frames, seg.buffered_frames)
        most_bytes = max(most_bytes, seg.buffered_bytes)
        assert seg.buffered_s <= preroll + 1e-6
    assert most_frames <= bound_frames
    assert most_bytes <= bound_frames * 2000
    assert seg.buffered_s >= preroll - 1.0  # never less than preroll minus one GOP


def test_segments_are_cut_at_keyframes_once_long_enough() -> None:
    seg = Segmenter(segment_s=2.5, preroll_s=0)
    events = seg.start_recording() + feed(seg, 0, 25 * 10)  # 10 s, keyframes every 1 s
    ends = segments(events)
    # 2.5 s is reached between keyframes, so each cut waits for the keyframe at 3 s.
    assert [e.frames for e in ends] == [75, 75, 75]
    assert [e.seq for e in ends] == [0, 1, 2]
    for end in ends:
        assert end.end_pts - end.start_pts == pytest.approx(74 / FPS)
    starts = [e for e in events if isinstance(e, SegmentStart)]
    assert all(s.first_frame.keyframe for s in starts)
    assert [s.first_frame.pts_s - 100.0 for s in starts] == pytest.approx([0, 3, 6, 9])
    # Every frame came out exactly once, tagged with its segment.
    outs = [e for e in events if isinstance(e, FrameOut)]
    assert len(outs) == 250
    assert [o.frame.pts_s for o in outs] == sorted(o.frame.pts_s for o in outs)


def test_exact_segment_length_cuts_at_that_keyframe() -> None:
    seg = Segmenter(segment_s=1.0, preroll_s=0)
    events = seg.start_recording() + feed(seg, 0, 100)
    assert [e.frames for e in segments(events)] == [25, 25, 25]


def test_a_long_gop_makes_a_longer_segment_rather_than_a_cut_without_keyframe() -> None:
    seg = Segmenter(segment_s=1.0, preroll_s=0)
    events = seg.start_recording() + feed(seg, 0, 200, gop=100)
    assert [e.frames for e in segments(events)] == [100]


def test_start_stop_start_numbers_segments_across_recordings() -> None:
    seg = Segmenter(segment_s=10, preroll_s=1.0, first_seq=7)
    feed(seg, 0, 60)
    first = seg.start_recording() + feed(seg, 60, 40)
    stop = seg.stop_recording()
    assert len(stop) == 1 and isinstance(stop[0], SegmentEnd) and stop[0].seq == 7
    # Preroll: keyframe at 2.0 s (frame 50) to frame 59, then 40 live frames.
    assert stop[0].frames == 10 + 40
    assert stop[0].end_pts == pytest.approx(100.0 + 99 / FPS)
    assert sum(isinstance(e, FrameOut) for e in first) == 50
    assert not seg.recording
    # Back to buffering, from empty: nothing already recorded is buffered again.
    assert seg.buffered_frames == 0
    assert feed(seg, 100, 25) == []
    assert seg.buffered_frames == 25  # frames 100..124, from the keyframe at 4.0 s
    again = seg.start_recording()
    assert isinstance(again[0], SegmentStart) and again[0].seq == 8
    assert segments(seg.stop_recording())[0].frames == 25


def test_preroll_zero_starts_at_the_next_keyframe() -> None:
    seg = Segmenter(segment_s=10, preroll_s=0)
    feed(seg, 0, 30)
    assert seg.buffered_frames == 0
    events = seg.start_recording()
    assert events == []
    assert feed(seg, 30, 19) == []  # no keyframe yet: dropped, nothing to decode them from
    assert seg.dropped_frames == 19
    events = feed(seg, 49, 2)
    assert isinstance(events[0], SegmentStart) and events[0].first_frame.pts_s == \
        pytest.approx(100.0 + 50 / FPS)


def test_stop_without_a_segment_and_double_start_are_harmless() -> None:
    seg = Segmenter()
    assert seg.stop_recording() == []
    assert seg.start_recording() == []
    assert seg.start_recording() == []
    assert seg.stop_recording() == []
    assert seg.current_seq is None


def test_buffer_without_a_keyframe_stays_empty() -> None:
    seg = Segmenter(preroll_s=5)
    for i in range(1, 20):
        seg.push(frame(i))
    assert seg.buffered_frames == 0


@pytest.mark.parametrize("preroll", [121, -1, float("nan"), float("inf")])
def test_invalid_preroll_is_rejected_clearly(preroll: float) -> None:
    with pytest.raises(ValueError, match=r"preroll_s must be between 0 and 120 seconds"):
        Segmenter(preroll_s=preroll)


@pytest.mark.parametrize("segment", [0, -5, float("nan")])
def test_invalid_segment_length_is_rejected(segment: float) -> None:
    with pytest.raises(ValueError, match="segment_s must be a positive number"):
        Segmenter(segment_s=segment)


def test_limits_are_accepted() -> None:
    assert Segmenter(preroll_s=0).preroll_s == 0
    assert Segmenter(preroll_s=120).preroll_s == 120
