"""What an upload pass left on the card becomes the device's `faults.upload` (docs/PROTOCOL.md,
Status): in words, for the fleet view, and only when something is wrong."""

from __future__ import annotations

from firmware.uplink.uploader import UploadSummary


def test_a_pass_that_uploaded_everything_is_no_fault() -> None:
    assert UploadSummary(uploaded=[1, 2]).problem() is None


def test_segments_left_for_later_are_a_fault_with_the_commonest_reason() -> None:
    summary = UploadSummary(deferred={3: "not authorised: 403 Forbidden",
                                      4: "not authorised: 403 Forbidden",
                                      5: "no receipt: connection lost"})
    assert summary.problem() == "3 segment(s) not uploaded: not authorised: 403 Forbidden"


def test_a_pass_stopped_by_undocking_is_no_fault() -> None:
    assert UploadSummary(deferred={3: "stopped", 4: "stopped"}).problem() is None


def test_a_pass_that_found_another_uploader_at_work_is_no_fault() -> None:
    assert UploadSummary(busy=True).problem() is None


def test_the_reason_fits_the_status_field() -> None:
    summary = UploadSummary(deferred={1: "no receipt: " + "x" * 400})
    problem = summary.problem()
    assert problem is not None and len(problem) == 200
