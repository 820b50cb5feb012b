"""Taking (claiming) an alert in the store: one operator decides an alert."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from control_center.store import AlreadyClaimed, Store
from tests.helpers import alert_message


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "c.sqlite")


def test_the_first_operator_to_take_an_alert_gets_it(store: Store) -> None:
    alert = alert_message()
    store.add_alert(alert, stored_at=1.0)
    record = store.claim(alert["alert_id"], "alice", at=2.0)
    assert (record.claimed_by, record.claimed_at) == ("alice", 2.0)


def test_a_second_operator_is_refused_and_told_who_has_it(store: Store) -> None:
    alert = alert_message()
    store.add_alert(alert, stored_at=1.0)
    store.claim(alert["alert_id"], "alice", at=2.0)
    with pytest.raises(AlreadyClaimed, match="taken by alice"):
        store.claim(alert["alert_id"], "bob", at=3.0)
    assert store.alert(alert["alert_id"]).claimed_by == "alice"


def test_taking_an_alert_one_holds_again_keeps_the_first_time(store: Store) -> None:
    alert = alert_message()
    store.add_alert(alert, stored_at=1.0)
    store.claim(alert["alert_id"], "alice", at=2.0)
    assert store.claim(alert["alert_id"], "alice", at=9.0).claimed_at == 2.0


def test_a_closed_alert_cannot_be_taken(store: Store) -> None:
    alert = alert_message()
    store.add_alert(alert, stored_at=1.0)
    store.mark(alert["alert_id"], "close", "another centre", at=2.0)
    with pytest.raises(AlreadyClaimed, match="closed"):
        store.claim(alert["alert_id"], "alice", at=3.0)


def test_an_unknown_alert_cannot_be_taken(store: Store) -> None:
    with pytest.raises(LookupError):
        store.claim("0" * 32, "alice", at=1.0)


def test_of_many_operators_taking_at_once_exactly_one_gets_it(tmp_path: Path) -> None:
    """Each through its own connection to the one file, as several centre instances are."""
    first = Store(tmp_path / "c.sqlite")
    alert = alert_message()
    first.add_alert(alert, stored_at=1.0)
    stores = [Store(tmp_path / "c.sqlite") for _ in range(8)]
    start, winners, losers = threading.Barrier(8), [], []

    def take(i: int) -> None:
        start.wait()
        try:
            stores[i].claim(alert["alert_id"], f"op-{i}", at=2.0)
            winners.append(i)
        except AlreadyClaimed:
            losers.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and len(losers) == 7
    assert first.alert(alert["alert_id"]).claimed_by == f"op-{winners[0]}"


def test_a_store_from_before_claims_gains_the_columns_and_keeps_its_alerts(
        tmp_path: Path) -> None:
    import sqlite3

    store = Store(tmp_path / "c.sqlite")
    alert = alert_message()
    store.add_alert(alert, stored_at=1.0)
    store.close()
    db = sqlite3.connect(tmp_path / "c.sqlite")
    db.execute("ALTER TABLE alerts DROP COLUMN claimed_by")
    db.execute("ALTER TABLE alerts DROP COLUMN claimed_at")
    db.commit()
    db.close()
    reopened = Store(tmp_path / "c.sqlite")
    assert reopened.alert(alert["alert_id"]).claimed_by is None
    assert reopened.claim(alert["alert_id"], "alice", at=2.0).claimed_by == "alice"
