"""The centre's routing at run time (control_center/alert_routing.py) on a real store: incidents
given to new alerts, escalation of untaken ones, and what is queued for webhooks."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_center.alert_routing import AlertRouting
from control_center.routing import RouteTable
from control_center.service import CenterEvent
from control_center.store import Store
from control_center.webhook import WebhookTarget
from tests.helpers import alert_message

AT = 1_800_000_000.0


def position(lat: float, lon: float) -> dict:
    return {"source": "live", "lat": lat, "lon": lon, "alt_m": None, "accuracy_m": 5.0,
            "fix_time": "2027-01-15T08:00:00.000Z", "age_s": 1.0}


def table() -> RouteTable:
    desks = [{"id": "north", "name": "North", "operators": ["alice"], "escalate_after_s": 30.0,
              "next": "south"},
             {"id": "south", "name": "South", "operators": ["bob"], "escalate_after_s": 30.0}]
    return RouteTable.from_config(desks, [{"name": "all north", "desks": ["north"]}], "UTC")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "c.sqlite")


@pytest.fixture
def routing(store: Store) -> AlertRouting:
    hook = WebhookTarget("cad", "https://cad.example/sos", b"k" * 32,
                         frozenset({"alert", "escalated", "closed"}), None)
    now = [AT]
    running = AlertRouting(store, table(), [hook], clock=lambda: now[0])
    running.now = now  # type: ignore[attr-defined]
    yield running
    running.log.close()


def raise_alert(store: Store, routing: AlertRouting, device_id: str, at: float,
                where: tuple[float, float] | None = None) -> str:
    message = alert_message(device_id, position=position(*where) if where else
                            alert_message()["position"])
    store.add_alert(message, stored_at=at, route=tuple(table().route_at(message, at)))
    routing.on_center_event(CenterEvent("alert", device_id, message, True))
    return message["alert_id"]


def call_started(store: Store, device_id: str, call_id: str, at: float) -> None:
    store.add_update("event", {"v": 1, "device_id": device_id, "seq": 9, "type": "call_started",
                               "created_at": "2027-01-15T07:59:00.000Z", "call_id": call_id},
                     stored_at=at)


def test_alerts_near_each_other_are_one_incident(store: Store, routing: AlertRouting) -> None:
    first = raise_alert(store, routing, "tok-1", AT, (43.2389, 76.8897))
    second = raise_alert(store, routing, "pil-1", AT + 60, (43.2400, 76.8900))
    assert store.alert(second).incident_id == store.alert(first).incident_id == first


def test_a_tokens_alert_on_a_dispatch_call_carries_the_call(store: Store,
                                                           routing: AlertRouting) -> None:
    call_started(store, "tok-1", "call-77", AT - 100)
    alert_id = raise_alert(store, routing, "tok-1", AT)
    assert store.alert(alert_id).call_id == "call-77"


def test_far_apart_alerts_are_two_incidents(store: Store, routing: AlertRouting) -> None:
    first = raise_alert(store, routing, "tok-1", AT, (43.2389, 76.8897))
    second = raise_alert(store, routing, "pil-1", AT + 60, (43.30, 76.95))
    assert store.alert(second).incident_id == second != first


def test_each_new_alert_is_queued_once_for_the_webhook(store: Store,
                                                       routing: AlertRouting) -> None:
    alert_id = raise_alert(store, routing, "tok-1", AT)
    message = {"alert_id": alert_id, "device_id": "tok-1"}
    routing.on_center_event(CenterEvent("alert", "tok-1", message, True))  # another instance
    deliveries = routing.webhooks.outbox.deliveries(alert_id)
    assert [d.event_id for d in deliveries] == [f"{alert_id}:alert"]


def test_an_untaken_alert_escalates_and_the_step_is_queued(store: Store,
                                                           routing: AlertRouting) -> None:
    alert_id = raise_alert(store, routing, "tok-1", AT)
    assert routing.watch.check(AT + 29) == []
    (step,) = routing.watch.check(AT + 30)
    assert (step.step, step.to_desk) == (1, "south")
    events = [d.event_id for d in routing.webhooks.outbox.deliveries(alert_id)]
    assert f"{alert_id}:escalated:1" in events


def test_an_acknowledged_alert_does_not_escalate(store: Store, routing: AlertRouting) -> None:
    alert_id = raise_alert(store, routing, "tok-1", AT)
    store.mark(alert_id, "ack", "cli-operator", AT + 5)
    assert routing.watch.check(AT + 3600) == []


@pytest.mark.parametrize(("works", "desks", "escalated_to", "sees"), [
    ({"north"}, ["north"], [], True),  # routed to their desk
    ({"south"}, ["north"], [], False),  # another staffed desk's alert
    ({"south"}, ["north"], ["south"], True),  # escalated to them
    ({"south"}, ["north"], [None], False),  # the supervisors-only step is not theirs
    (set(), ["north"], [], True),  # works no desk: sees everything
    ({"south"}, [], [], True),  # an alert with no desk: everyone
    ({"south"}, ["empty"], [], True),  # its desk lists nobody: everyone, or it reaches no one
    ({"south"}, ["empty"], ["north"], False),  # it reached north, which has someone
])
def test_which_operator_sees_an_alert(works, desks, escalated_to, sees) -> None:
    from control_center.alert_routing import operator_sees

    assert operator_sees(works, {"north", "south"}, desks, escalated_to) is sees


def test_an_alert_whose_desk_was_removed_belongs_to_the_catch_all(store: Store,
                                                                  routing: AlertRouting) -> None:
    message = alert_message("tok-1")
    store.add_alert(message, stored_at=AT, route=("an old rule", ("gone",)))
    assert routing.desks_of(store.alert(message["alert_id"])) == ("north",)


def test_start_queues_what_a_crash_lost(store: Store, routing: AlertRouting) -> None:
    message = alert_message("tok-1")
    store.add_alert(message, stored_at=AT, route=("all north", ("north",)))  # no event: lost
    routing.catch_up()
    routing.catch_up()
    events = [d.event_id for d in routing.webhooks.outbox.deliveries(message["alert_id"])]
    assert events == [f"{message['alert_id']}:alert"]


def test_a_webhook_of_the_desk_it_climbed_to_also_gets_the_close(store: Store,
                                                                 tmp_path: Path) -> None:
    hook = WebhookTarget("south-cad", "https://cad.example/sos", b"k" * 32,
                         frozenset({"alert", "escalated", "closed"}), frozenset({"south"}))
    running = AlertRouting(store, table(), [hook], clock=lambda: AT)
    alert_id = raise_alert(store, running, "tok-1", AT)
    running.watch.check(AT + 30)
    store.mark(alert_id, "close", "op", AT + 40)
    running.on_center_event(CenterEvent("event", "tok-1", {
        "type": "command_applied", "command_type": "close", "alert_id": alert_id}, True))
    events = [d.event_id.split(":")[1] for d in running.webhooks.outbox.deliveries(alert_id)]
    assert sorted(events) == ["closed", "escalated"]  # not the routed desk's "alert"
    running.log.close()
