"""The pure part of end-to-end delivery: what waits for a receipt, and when it goes again."""

from __future__ import annotations

from firmware.uplink.delivery import DeliveryTracker, DeliveryWaits
from firmware.uplink.outgoing import OutboxRow
from protocol import MessageKind, payload_digest

WAITS = DeliveryWaits(first_wait_s=2.0, unrouted_wait_s=1.0, refused_wait_s=30.0,
                      max_wait_s=10.0, resend_batch=3)


def row(seq: int, kind: MessageKind = MessageKind.POSITION) -> OutboxRow:
    return OutboxRow(seq, kind, f"sos/v1/dev/tok-001/{kind.value}", b'{"seq":%d}' % seq)


def tracker_with(*rows: OutboxRow, accepted_at: float = 0.0) -> DeliveryTracker:
    tracker = DeliveryTracker(WAITS)
    for r in rows:
        tracker.sent(r)
        tracker.accepted(r.seq, accepted_at)
    return tracker


def test_a_message_the_broker_took_goes_again_when_no_receipt_comes() -> None:
    tracker = tracker_with(row(1))
    assert tracker.due(1.9) == []
    assert [r.seq for r in tracker.due(2.0)] == [1]


def test_the_wait_doubles_with_each_resend_up_to_the_cap() -> None:
    tracker = tracker_with(row(1))
    now, waits = 0.0, []
    for _ in range(5):
        due_at = tracker.next_due()
        waits.append(due_at - now)
        now = due_at
        assert tracker.due(now)
        tracker.accepted(1, now)
    assert waits == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_message_paho_still_holds_is_never_due() -> None:
    tracker = DeliveryTracker(WAITS)
    tracker.sent(row(1))
    assert tracker.next_due() is None
    assert tracker.due(1000.0) == []


def test_only_a_receipt_for_the_same_bytes_settles_a_message() -> None:
    tracker = tracker_with(row(1))
    assert tracker.receipted(1, "0" * 64, 0.5) is None
    assert 1 in tracker
    assert tracker.receipted(1, payload_digest(row(1).payload), 0.5) == row(1)
    assert 1 not in tracker


def test_a_late_resend_does_not_bring_a_settled_message_back() -> None:
    tracker = tracker_with(row(1))
    (due,) = tracker.due(2.0)
    tracker.receipted(1, payload_digest(due.payload), 2.0)
    assert not tracker.still_waiting(due)
    assert 1 not in tracker


def test_with_no_centre_connected_only_the_most_important_message_probes() -> None:
    tracker = DeliveryTracker(WAITS)
    rows = [row(1), row(2), row(3, MessageKind.ALERT), row(4, MessageKind.EVENT)]
    for r in rows:
        tracker.sent(r)
        tracker.unrouted(r.seq, 0.0)
    assert [r.seq for r in tracker.due(1.0)] == [3]  # the alert, alone
    tracker.accepted(3, 1.0)
    tracker.receipted(3, payload_digest(rows[2].payload), 1.1)  # a centre is back
    assert [r.seq for r in tracker.due(1.1)] == [1, 2, 4]


def test_messages_queued_behind_others_at_a_working_centre_are_held_back() -> None:
    """Receipts keep coming for older messages: the newer ones are queued, not lost."""
    tracker = tracker_with(row(1), row(2), row(3))
    tracker.receipted(1, payload_digest(row(1).payload), 1.5)
    assert tracker.due(2.0) == []
    assert tracker.next_due() == 4.0


def test_a_message_overtaken_by_a_later_receipt_goes_again_at_once() -> None:
    tracker = tracker_with(row(1), row(2))
    tracker.receipted(2, payload_digest(row(2).payload), 1.5)
    assert [r.seq for r in tracker.due(2.0)] == [1]


def test_resends_go_in_batches_alerts_first() -> None:
    tracker = tracker_with(row(1), row(2), row(3), row(4, MessageKind.ALERT), row(5))
    assert [r.seq for r in tracker.due(2.0)] == [4, 1, 2]
    assert [r.seq for r in tracker.due(4.0)] == [3, 5]
