"""The upload's decisions, as the pure machines make them: exact events in, exact actions out.

No socket, file or thread: each test feeds `SegmentUpload` (the byte connection) or
`ReceiptFetch` (the settler) the answers a server would give and checks what it asks for next.
Segments are 250 bytes in chunks of 100, so every offset is easy to follow.
"""

from __future__ import annotations

import logging

import pytest

import firmware.uplink.upload_machine as machine
from firmware.uplink.upload_machine import (
    ANY,
    FAILURES,
    MAX_STORING_WAITS,
    RECEIPT_WAIT_S,
    SENDER,
    SETTLER,
    Accept,
    Attempt,
    Begin,
    CountResent,
    Create,
    Created,
    Defer,
    EndPass,
    Failed,
    Fetch,
    Forget,
    Handoff,
    Head,
    Log,
    MarkSent,
    OffsetKnown,
    Patch,
    Patched,
    Prepared,
    Receipt,
    ReceiptFetch,
    Refuse,
    Report,
    Resend,
    SaveLocation,
    SegmentUpload,
    Skip,
    StillStoring,
    Stopped,
    TakePrepared,
    UnexpectedEvent,
    Wait,
    drive,
    render,
    wants_creator,
)
from firmware.uplink.upload_plan import Backoff

SEQ, SIZE, CHUNK, LOC = 7, 250, 100, "/files/abc"
RECEIPT = {"receipt_id": "r-1"}
BACKOFF = Backoff(base_s=1.0, factor=2.0, max_s=30.0, jitter=0.5)


def upload(max_attempts: int = 6) -> SegmentUpload:
    m = SegmentUpload(SEQ, SIZE, chunk_bytes=CHUNK, max_attempts=max_attempts,
                      backoff=BACKOFF, rand=lambda: 0.0)
    assert m.start() == [Begin()]
    return m


def sending(offset: int = 100, **kw: int) -> SegmentUpload:
    """A machine whose POST carried the first chunk and whose server holds `offset` bytes."""
    m = upload(**kw)
    assert m.handle(Attempt(None, 0)) == [Create(CHUNK)]
    m.handle(Created(LOC, offset))
    return m


def failed(kind: str, reason: str = "why", status: int | None = None,
           after_s: float | None = None) -> Failed:
    return Failed(kind, reason, status, after_s)


def without_logs(actions: list) -> list:
    return [a for a in actions if not isinstance(a, Log)]


# -- the tables are the docstring ------------------------------------------------------------
@pytest.mark.parametrize("table", [SENDER, SETTLER], ids=["sender", "settler"])
def test_the_module_docstring_shows_the_dispatch_table_itself(table) -> None:
    assert render(table) in machine.__doc__


def test_every_failure_of_a_request_has_a_rule_on_the_byte_connection() -> None:
    assert {kind for phase, kind in SENDER if phase == ANY} >= FAILURES


def test_an_event_the_table_does_not_expect_is_a_bug_not_a_guess() -> None:
    with pytest.raises(UnexpectedEvent, match="patched while start"):
        upload().handle(Patched(100))


def test_an_unknown_failure_kind_cannot_be_made() -> None:
    with pytest.raises(ValueError, match="unknown failure"):
        Failed("teapot", "418")


# -- starting an attempt ---------------------------------------------------------------------
@pytest.mark.parametrize(("attempt", "request_"), [
    (Attempt(None, 0), Create(CHUNK)),  # creation-with-upload: the first chunk in the POST
    (Attempt(None, 40), Create(0)),  # an earlier POST may have sent bytes: ask, send none
    (Attempt(LOC, 0), Head(LOC)),  # a saved upload: where is the server?
    (Attempt(LOC, 0, prepared=True), TakePrepared()),  # the creator's POST comes first
    (Attempt(None, 0, prepared=True), TakePrepared()),
], ids=["new", "maybe-sent", "saved", "prepared-and-saved", "prepared"])
def test_an_attempt_starts_from_what_the_device_holds(attempt, request_) -> None:
    assert upload().handle(attempt) == [request_]


def test_a_segment_smaller_than_a_chunk_goes_whole_in_the_post() -> None:
    m = SegmentUpload(SEQ, 60, chunk_bytes=CHUNK, max_attempts=6, backoff=BACKOFF,
                      rand=lambda: 0.0)
    assert m.handle(Attempt(None, 0)) == [Create(60)]


@pytest.mark.parametrize(("location", "sent_to", "wanted"), [
    (None, 0, True), (LOC, 0, False), (None, 4096, False)])
def test_the_creator_posts_ahead_only_a_segment_with_no_upload_and_no_byte_sent(
        location, sent_to, wanted) -> None:
    assert wants_creator(location, sent_to) is wanted


# -- the bytes -------------------------------------------------------------------------------
def test_after_the_post_the_rest_goes_in_chunks_and_only_the_last_asks_respond_async() -> None:
    m = upload()
    assert m.handle(Attempt(None, 0)) == [Create(CHUNK)]
    assert m.handle(Created(LOC, 100)) == [SaveLocation(LOC), Report(100),
                                           Patch(LOC, 100, 100, respond_async=False)]
    assert m.handle(Patched(200)) == [Report(200), Patch(LOC, 200, 50, respond_async=True)]
    assert m.handle(Patched(250)) == [Report(250), Handoff(LOC, None)]


def test_a_receipt_on_the_last_patch_goes_to_the_settler_with_it() -> None:
    m = sending(200)
    assert m.handle(Patched(250, RECEIPT)) == [Report(250), Handoff(LOC, RECEIPT)]


def test_a_post_that_finds_every_byte_there_hands_the_segment_over_at_once() -> None:
    m = upload()
    m.handle(Attempt(None, 0))
    assert m.handle(Created(LOC, SIZE)) == [SaveLocation(LOC), Report(SIZE), Handoff(LOC)]


def test_a_post_body_the_server_dropped_counts_as_resent_and_goes_again() -> None:
    m = upload()
    m.handle(Attempt(None, 0))
    assert m.handle(Created(LOC, 0)) == [SaveLocation(LOC), CountResent(100), MarkSent(0),
                                         Report(0), Patch(LOC, 0, 100, respond_async=False)]


def test_the_creators_upload_with_a_receipt_goes_straight_to_the_settler() -> None:
    m = upload()
    m.handle(Attempt(None, 0, prepared=True))
    assert m.handle(Prepared(LOC, SIZE, RECEIPT)) == [Handoff(LOC, RECEIPT)]


def test_the_creators_upload_is_patched_from_its_offset() -> None:
    m = upload()
    m.handle(Attempt(None, 0, prepared=True))
    assert m.handle(Prepared(LOC, None)) == [Report(0), Patch(LOC, 0, 100, respond_async=False)]


def test_a_saved_upload_resumes_from_the_offset_head_gives() -> None:
    m = upload()
    m.handle(Attempt(LOC, 0))
    assert m.handle(OffsetKnown(150, SIZE)) == [Report(150),
                                                Patch(LOC, 150, 100, respond_async=True)]


def test_a_complete_upload_found_by_head_goes_to_the_settler_for_its_receipt() -> None:
    m = upload()
    m.handle(Attempt(LOC, SIZE))
    assert m.handle(OffsetKnown(SIZE, SIZE)) == [Report(SIZE), Handoff(LOC)]


# -- failures on the byte connection ---------------------------------------------------------
def test_a_409_asks_head_at_once_and_resumes_from_the_servers_offset() -> None:
    m = sending(100)
    assert m.handle(failed("offset_mismatch", status=409)) == [Begin()]  # no wait
    assert m.handle(Attempt(LOC, sent_to=200)) == [Head(LOC)]
    assert m.handle(OffsetKnown(150, SIZE)) == [CountResent(50), MarkSent(150), Report(150),
                                                Patch(LOC, 150, 100, respond_async=True)]


def test_a_cut_backs_off_doubling_and_resumes_from_head() -> None:
    m = upload()
    m.handle(Attempt(LOC, 0))
    assert without_logs(m.handle(failed("connection_lost"))) == [Wait(1.0), Begin()]
    m.handle(Attempt(LOC, 0))
    assert without_logs(m.handle(failed("connection_lost"))) == [Wait(2.0), Begin()]


def test_the_backoff_says_why_and_how_long_in_one_warning() -> None:
    m = upload()
    m.handle(Attempt(LOC, 0))
    assert m.handle(failed("retry_later", "busy", 503))[0] == Log(
        logging.WARNING, "upload of segment 000007: busy; trying again in 1.0 s")


def test_retry_after_is_a_floor_even_above_the_cap() -> None:
    m = upload()
    m.handle(Attempt(None, 0))
    assert without_logs(m.handle(failed("retry_later", after_s=400.0))) == [Wait(400.0),
                                                                           Begin()]


def test_progress_in_an_attempt_resets_the_count_of_failures() -> None:
    m = upload(max_attempts=2)
    m.handle(Attempt(LOC, 0))
    m.handle(failed("connection_lost"))  # 1
    m.handle(Attempt(LOC, 0))
    m.handle(OffsetKnown(100, SIZE))
    m.handle(Patched(200))  # the server's offset moved
    assert without_logs(m.handle(failed("connection_lost"))) == [Wait(1.0), Begin()]


def test_max_attempts_failures_in_a_row_end_the_pass() -> None:
    m = upload(max_attempts=2)
    m.handle(Attempt(None, 0))
    m.handle(failed("connection_lost", "refused"))
    m.handle(Attempt(None, 40))
    assert without_logs(m.handle(failed("connection_lost", "refused"))) == [
        EndPass("ConnectionLost: refused")]


def test_upload_gone_on_head_posts_again_without_counting_a_failure() -> None:
    m = upload(max_attempts=1)
    m.handle(Attempt(LOC, 120))
    assert m.handle(failed("upload_gone", status=404)) == [Forget(), Create(CHUNK)]  # mark gone


def test_upload_gone_on_a_patch_forgets_and_starts_again_at_once() -> None:
    m = sending(100)
    assert m.handle(failed("upload_gone", status=410)) == [Forget(), Begin()]


def test_an_upload_the_server_keeps_forgetting_ends_the_pass() -> None:
    m = sending(100, max_attempts=2)
    m.handle(failed("upload_gone"))
    m.handle(Attempt(None, 0))
    m.handle(Created(LOC, 100))
    assert m.handle(failed("upload_gone")) == [
        Forget(), EndPass("the server keeps forgetting the upload")]


def test_a_refusal_marks_the_segment_refused_and_the_pass_goes_on() -> None:
    m = sending(100)
    assert m.handle(failed("refused", "altered", 422)) == [Refuse("altered (HTTP 422)")]
    assert m.phase == "done"


def test_a_centre_without_creation_with_upload_gets_a_post_without_body_then_patches() -> None:
    m = upload()
    m.handle(Attempt(None, 0))
    assert without_logs(m.handle(failed("refused", "no body", 400))) == [MarkSent(0),
                                                                        Create(0)]
    assert m.handle(Created(LOC, 0)) == [SaveLocation(LOC), Report(0),
                                         Patch(LOC, 0, 100, respond_async=False)]


def test_a_400_to_a_post_without_body_is_a_refusal() -> None:
    m = upload()
    m.handle(Attempt(None, 40))
    assert m.handle(failed("refused", "bad metadata", 400)) == [
        Refuse("bad metadata (HTTP 400)")]


def test_unauthorized_stops_the_whole_pass_and_blames_no_segment() -> None:
    m = sending(100)
    actions = m.handle(failed("unauthorized", "certificate revoked", 403))
    assert without_logs(actions) == [EndPass("not authorised: certificate revoked")]
    assert actions[0].level == logging.ERROR


@pytest.mark.parametrize(("kind", "outcome"), [
    ("source_changed", [Forget(), Defer("segment file changed: why")]),
    ("file_gone", [Forget(), Skip()]),
    ("card_error", [Defer("cannot read the segment: why")]),
])
def test_trouble_with_the_local_file_leaves_the_segment_and_the_pass_goes_on(kind,
                                                                            outcome) -> None:
    assert without_logs(sending(100).handle(failed(kind))) == outcome


def test_a_stop_between_requests_ends_the_pass() -> None:
    assert sending(100).handle(Stopped()) == [EndPass("stopped")]


def test_head_giving_another_length_forgets_the_upload_and_tries_again() -> None:
    m = upload()
    m.handle(Attempt(LOC, 0))
    assert without_logs(m.handle(OffsetKnown(0, 999))) == [Forget(), Wait(1.0), Begin()]


def test_a_server_holding_more_than_the_segment_is_forgotten() -> None:
    m = upload()
    m.handle(Attempt(LOC, 0))
    actions = m.handle(OffsetKnown(300, None))
    assert without_logs(actions) == [Forget(), Wait(1.0), Begin()]
    assert "holds 300 bytes of a 250-byte segment" in actions[1].message


def test_a_patch_that_moves_nothing_is_not_tus() -> None:
    m = sending(100)
    actions = m.handle(Patched(100))
    assert without_logs(actions) == [Wait(1.0), Begin()]
    assert "PATCH at 100 made no progress" in actions[0].message


# -- the settler -----------------------------------------------------------------------------
def settler(max_attempts: int = 6) -> ReceiptFetch:
    return ReceiptFetch(SEQ, max_attempts=max_attempts, backoff=BACKOFF, rand=lambda: 0.0)


def fetching(max_attempts: int = 6) -> ReceiptFetch:
    m = settler(max_attempts)
    assert m.start(None) == [Fetch(RECEIPT_WAIT_S)]
    return m


def test_a_receipt_the_byte_connection_had_is_accepted_without_a_request() -> None:
    assert settler().start(RECEIPT) == [Accept(RECEIPT)]


def test_a_fetched_receipt_is_accepted() -> None:
    assert fetching().handle(Receipt(RECEIPT)) == [Accept(RECEIPT)]


def test_30_still_storing_answers_are_waited_for_then_each_is_a_failure_until_deferred() -> None:
    m = fetching()
    for _ in range(MAX_STORING_WAITS - 1):
        assert m.handle(StillStoring()) == [Fetch(RECEIPT_WAIT_S)]  # at once: it waited
    assert m.handle(StillStoring()) == [Wait(1.0), Fetch(RECEIPT_WAIT_S)]  # failure 1
    for delay in (2.0, 4.0, 8.0, 16.0):
        assert m.handle(StillStoring()) == [Wait(delay), Fetch(RECEIPT_WAIT_S)]
    assert without_logs(m.handle(StillStoring())) == [
        Defer("no receipt: the centre is still storing it")]


def test_a_refused_receipt_marks_the_segment_refused_and_the_pass_goes_on() -> None:
    assert fetching().handle(failed("refused", "altered", 422)) == [Refuse("altered (HTTP 422)")]


def test_a_centre_holding_fewer_bytes_gets_the_segment_again_at_the_end_of_the_pass() -> None:
    assert without_logs(fetching().handle(failed("offset_mismatch", status=409))) == [Resend()]


def test_an_upload_gone_before_its_receipt_is_forgotten_and_resent_in_the_same_pass() -> None:
    assert without_logs(fetching().handle(failed("upload_gone", status=404))) == [Forget(),
                                                                                  Resend()]


def test_unauthorized_at_the_receipt_defers_the_segment_without_refusing_it() -> None:
    assert fetching().handle(failed("unauthorized", "revoked", 403)) == [
        Defer("not authorised: revoked")]


def test_receipt_failures_back_off_and_after_max_attempts_leave_it_for_later() -> None:
    m = fetching(max_attempts=3)
    assert m.handle(failed("connection_lost", "cut")) == [Wait(1.0), Fetch(RECEIPT_WAIT_S)]
    assert m.handle(failed("retry_later", "busy", after_s=9.0)) == [Wait(9.0),
                                                                    Fetch(RECEIPT_WAIT_S)]
    assert without_logs(m.handle(failed("not_tus", "garbage"))) == [
        Defer("no receipt: garbage")]


def test_a_stopped_pass_defers_the_receipt() -> None:
    assert fetching().handle(Stopped()) == [Defer("stopped")]


# -- drive -----------------------------------------------------------------------------------
def test_drive_performs_effects_answers_requests_and_returns_the_outcome() -> None:
    m = upload()
    answers = iter([Attempt(None, 0), Created(LOC, 100), Patched(200), Patched(250)])
    requests: list = []
    effects: list = []
    outcome = drive(m.start(), m.handle, lambda r: requests.append(r) or next(answers),
                    effects.append)
    assert outcome == Handoff(LOC, None)
    assert requests == [Begin(), Create(CHUNK), Patch(LOC, 100, 100, False),
                        Patch(LOC, 200, 50, True)]
    assert effects == [SaveLocation(LOC), Report(100), Report(200), Report(250)]
