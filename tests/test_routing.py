"""The routing decision as a table: alerts (kind, trigger, device, position) at given instants,
and the rule and desks each must reach. Pure: no store, no clock, no broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from control_center.routing import (
    Desk,
    Hours,
    Routed,
    RouteTable,
    Rule,
    point_in_polygon,
    polygon_problem,
)
from protocol.configfile import ConfigError

# Europe/Amsterdam rather than a Kazakh zone: its offsets (CET +1, CEST +2) have been stable for
# decades, so the expected local hours below do not depend on the host's tzdata release.
ZONE = "Europe/Amsterdam"
LOCAL = ZoneInfo(ZONE)

NORTH = [[52.0, 4.5], [52.5, 4.5], [52.5, 5.0], [52.0, 5.0]]
WIDE = [[51.5, 4.0], [53.0, 4.0], [53.0, 5.5], [51.5, 5.5]]  # contains NORTH

DESKS: list[dict[str, Any]] = [
    {"id": d, "name": d.title(), "operators": [], "escalate_after_s": 60}
    for d in ("test-desk", "police-north", "ambulance-north", "police-wide", "police-south",
              "night-desk", "ambulance-day", "national")
]
ROUTES: list[dict[str, Any]] = [
    {"name": "test alerts", "trigger": ["test"], "desks": ["test-desk"]},
    {"name": "north pillars", "device_kind": ["pillar"], "region": NORTH,
     "desks": ["police-north"]},
    {"name": "north tokens", "device_kind": ["token"], "trigger": ["button_hold"],
     "region": NORTH, "desks": ["police-north", "ambulance-north"]},
    {"name": "wide pillars", "device_kind": ["pillar"], "region": WIDE, "desks": ["police-wide"]},
    {"name": "south group", "devices": ["pil-sth-*", "tok-sth-0[0-9]"], "desks": ["police-south"]},
    {"name": "night", "hours": "22:00-06:00", "desks": ["night-desk"]},
    {"name": "day tokens", "device_kind": ["token"], "hours": "07:00-19:00",
     "desks": ["ambulance-day"]},
    {"name": "everything else", "desks": ["national"]},
]
TABLE = RouteTable.from_config(DESKS, ROUTES, ZONE)

IN_NORTH = (52.25, 4.75)
IN_WIDE_ONLY = (52.75, 4.25)
FAR = (43.25, 76.9)  # inside no region


def alert(device_id: str, trigger: str | None = None,
          position: tuple[float, float] | str | None = FAR) -> dict[str, Any]:
    """A stored alert message; `position` None leaves it out, "none" is a device that knew no
    position (source none, lat/lon null)."""
    kind = "pillar" if device_id.startswith("pil-") else "token"
    message: dict[str, Any] = {
        "v": 1, "alert_id": "0" * 32, "device_id": device_id, "device_kind": kind, "seq": 1,
        "trigger": trigger or ("button_press" if kind == "pillar" else "button_hold"),
        "created_at": "2025-01-15T12:00:00Z", "battery": {"percent": 80},
    }
    if position == "none":
        message["position"] = {"source": "none", "lat": None, "lon": None, "alt_m": None,
                               "accuracy_m": None, "fix_time": None, "age_s": None}
    elif isinstance(position, tuple):
        message["position"] = {"source": "live", "lat": position[0], "lon": position[1],
                               "alt_m": 1.0, "accuracy_m": 5.0,
                               "fix_time": "2025-01-15T12:00:00Z", "age_s": 0.5}
    return message


def local(hh_mm: str, day: str = "2025-01-15") -> datetime:
    """An instant given as Amsterdam wall-clock time."""
    return datetime.fromisoformat(f"{day}T{hh_mm}").replace(tzinfo=LOCAL)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


NOON = local("12:00")

CASES = [
    # (what, alert, now, rule, desks)
    # first match wins
    ("a test alert wins over the region rule after it",
     alert("pil-nth-001", "test", IN_NORTH), NOON, "test alerts", ("test-desk",)),
    ("a pillar in north matches north before the wider region that also holds it",
     alert("pil-nth-001", position=IN_NORTH), NOON, "north pillars", ("police-north",)),
    ("a pillar in the wide region only",
     alert("pil-nth-001", position=IN_WIDE_ONLY), NOON, "wide pillars", ("police-wide",)),
    # device kind and trigger
    ("a held token in north goes to both desks of its rule",
     alert("tok-abc-001", position=IN_NORTH), NOON, "north tokens",
     ("police-north", "ambulance-north")),
    ("a token in north whose trigger the rule does not list falls through",
     alert("tok-abc-001", "button_press", IN_NORTH), NOON, "day tokens", ("ambulance-day",)),
    ("a token in the wide region: that rule is for pillars",
     alert("tok-abc-001", position=IN_WIDE_ONLY), local("20:00"), "everything else",
     ("national",)),
    # polygon: inside, edge, corner, outside, no position
    ("a pillar on north's edge is inside",
     alert("pil-nth-001", position=(52.0, 4.75)), NOON, "north pillars", ("police-north",)),
    ("a pillar on north's corner is inside",
     alert("pil-nth-001", position=(52.5, 5.0)), NOON, "north pillars", ("police-north",)),
    ("a pillar just past north's edge",
     alert("pil-nth-001", position=(52.501, 4.75)), NOON, "wide pillars", ("police-wide",)),
    ("a pillar outside every region",
     alert("pil-xyz-001", position=FAR), NOON, "everything else", ("national",)),
    ("an alert without a position matches no region rule",
     alert("pil-nth-001", position=None), NOON, "everything else", ("national",)),
    ("a position of source none (lat/lon null) matches no region rule",
     alert("pil-nth-001", position="none"), NOON, "everything else", ("national",)),
    # device globs
    ("a glob with *", alert("pil-sth-042"), NOON, "south group", ("police-south",)),
    ("a glob with a class", alert("tok-sth-07"), NOON, "south group", ("police-south",)),
    ("a glob is matched whole: tok-sth-10 is not tok-sth-0[0-9]",
     alert("tok-sth-10"), NOON, "day tokens", ("ambulance-day",)),
    ("a glob does not match a longer id by its prefix",
     alert("xpil-sth-042"), NOON, "day tokens", ("ambulance-day",)),
    # hours, wrapping midnight, start included and end excluded
    ("22:00 is in 22:00-06:00", alert("pil-xyz-001"), local("22:00"), "night", ("night-desk",)),
    ("23:30 is in 22:00-06:00", alert("pil-xyz-001"), local("23:30"), "night", ("night-desk",)),
    ("00:00 is in 22:00-06:00", alert("pil-xyz-001"), local("00:00"), "night", ("night-desk",)),
    ("05:59:59 is in 22:00-06:00",
     alert("pil-xyz-001"), local("05:59:59"), "night", ("night-desk",)),
    ("06:00 is not in 22:00-06:00",
     alert("pil-xyz-001"), local("06:00"), "everything else", ("national",)),
    ("21:59 is not in 22:00-06:00",
     alert("pil-xyz-001"), local("21:59"), "everything else", ("national",)),
    ("07:00 is in 07:00-19:00", alert("tok-abc-001"), local("07:00"), "day tokens",
     ("ambulance-day",)),
    ("18:59 is in 07:00-19:00", alert("tok-abc-001"), local("18:59"), "day tokens",
     ("ambulance-day",)),
    ("19:00 is not in 07:00-19:00", alert("tok-abc-001"), local("19:00"), "everything else",
     ("national",)),
    # hours are local to the table's zone (CET in winter, CEST in summer), whatever `now`'s zone
    ("21:30 UTC in January is 22:30 CET: night",
     alert("pil-xyz-001"), utc("2025-01-15T21:30"), "night", ("night-desk",)),
    ("20:30 UTC in January is 21:30 CET: not yet night",
     alert("pil-xyz-001"), utc("2025-01-15T20:30"), "everything else", ("national",)),
    ("20:30 UTC in July is 22:30 CEST: night",
     alert("pil-xyz-001"), utc("2025-07-15T20:30"), "night", ("night-desk",)),
    ("05:30 UTC in July is 07:30 CEST: day",
     alert("tok-abc-001"), utc("2025-07-15T05:30"), "day tokens", ("ambulance-day",)),
    ("05:30 UTC in January is 06:30 CET: not yet day",
     alert("tok-abc-001"), utc("2025-01-15T05:30"), "everything else", ("national",)),
    ("the same instant given at +05:00 routes the same",
     alert("pil-xyz-001"), datetime(2025, 1, 16, 2, 30, tzinfo=timezone(timedelta(hours=5))),
     "night", ("night-desk",)),
]


@pytest.mark.parametrize(("what", "message", "now", "rule", "desks"), CASES,
                         ids=[case[0] for case in CASES])
def test_the_route_table(what: str, message: dict[str, Any], now: datetime, rule: str,
                         desks: tuple[str, ...]) -> None:
    assert TABLE.route(message, now) == Routed(rule, desks)


def test_the_decision_is_a_rule_and_desks_pair_that_stores_as_json() -> None:
    routed = TABLE.route(alert("tok-abc-001", position=IN_NORTH), NOON)
    rule, desks = routed
    assert (rule, desks) == ("north tokens", ("police-north", "ambulance-north"))
    assert routed.as_dict() == {"rule": "north tokens",
                                "desks": ["police-north", "ambulance-north"]}


def test_route_at_takes_the_services_epoch_seconds() -> None:
    instant = utc("2025-07-15T20:30")
    message = alert("pil-xyz-001")
    assert TABLE.route_at(message, instant.timestamp()) == TABLE.route(message, instant)


def test_a_naive_time_is_refused() -> None:
    """Hours are local to the table's zone: a time without a zone could be any instant."""
    with pytest.raises(ValueError, match="aware"):
        TABLE.route(alert("pil-xyz-001"), datetime(2025, 1, 15, 12))


def test_a_message_missing_fields_still_reaches_the_catch_all() -> None:
    assert TABLE.route({}, NOON) == Routed("everything else", ("national",))


def test_the_implicit_table_sends_everything_to_all() -> None:
    desk = Desk("all", "All operators", (), 60.0)
    table = RouteTable.implicit_table(desk, "UTC")
    assert table.implicit
    assert table.route(alert("tok-abc-001", "test", IN_NORTH), NOON) == Routed("all", ("all",))
    assert table.escalation_chain("all") == ["all"]


# -- desks and escalation chains --------------------------------------------------------------

CHAINED = RouteTable.from_config(
    [{"id": "police-almaty", "name": "Police, Almaty", "operators": ["alice", "bob"],
      "escalate_after_s": 45, "next": "police-region"},
     {"id": "police-region", "name": "Police, region", "operators": ["bob"],
      "escalate_after_s": 90, "next": "police-national"},
     {"id": "police-national", "name": "Police, national", "operators": [],
      "escalate_after_s": 120}],
    [{"name": "all", "desks": ["police-almaty"]}], "UTC")


def test_an_escalation_chain_starts_at_the_desk_and_follows_next() -> None:
    assert CHAINED.escalation_chain("police-almaty") == ["police-almaty", "police-region",
                                                         "police-national"]
    assert CHAINED.escalation_chain("police-region") == ["police-region", "police-national"]
    assert CHAINED.escalation_chain("police-national") == ["police-national"]


def test_a_desk_carries_its_operators_and_delay() -> None:
    desk = CHAINED.desk("police-almaty")
    assert (desk.operators, desk.escalate_after_s, desk.next) == (("alice", "bob"), 45.0,
                                                                  "police-region")
    assert CHAINED.desks_of("bob") == ("police-almaty", "police-region")
    assert CHAINED.desks_of("carol") == ()


def test_an_unknown_desk_is_a_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match="no desk 'nowhere'"):
        CHAINED.escalation_chain("nowhere")


def test_a_table_built_directly_is_checked_too() -> None:
    """No unchecked table exists: the constructor refuses what from_config refuses."""
    desk = Desk("a-desk", "A", (), 60.0)
    with pytest.raises(ConfigError, match=r"key 'routes': the last rule \('kind'\) has"):
        RouteTable((desk,), (Rule("kind", ("a-desk",), device_kind=frozenset({"pillar"})),),
                   "UTC")
    with pytest.raises(ConfigError, match=r"key 'routes\[0\]\.desks': no desk 'b-desk'"):
        RouteTable((desk,), (Rule("all", ("b-desk",)),), "UTC")
    with pytest.raises(ConfigError, match=r"key 'desks\[0\]\.next'.*a-desk -> a-desk"):
        RouteTable((Desk("a-desk", "A", (), 60.0, next="a-desk"),),
                   (Rule("all", ("a-desk",)),), "UTC")


# -- the geometry and the hours -----------------------------------------------------------------

# An L: the west strip (lon 0-1) and the south strip (lat 0-1) of a 3 x 3 square.
L_SHAPE = [(0.0, 0.0), (3.0, 0.0), (3.0, 1.0), (1.0, 1.0), (1.0, 3.0), (0.0, 3.0)]


@pytest.mark.parametrize(("point", "inside"), [
    ((2.0, 0.5), True),    # in the west strip
    ((0.5, 2.0), True),    # in the south strip
    ((0.5, 0.5), True),    # in the corner where they meet
    ((2.0, 2.0), False),   # in the notch: inside the bounding box, outside the L
    ((1.0, 2.0), True),    # on an inner edge
    ((1.0, 1.0), True),    # on the inner corner
    ((3.5, 0.5), False),   # beyond the end of the west strip
    ((-0.1, 0.5), False),
    ((3.0, 0.5), True),    # on the far edge
])
def test_point_in_a_concave_polygon(point: tuple[float, float], inside: bool) -> None:
    assert point_in_polygon(point, L_SHAPE) is inside


@pytest.mark.parametrize(("polygon", "why"), [
    ([(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0)], "its edges cross"),  # a bow-tie
    ([(0.0, 0.0), (1.0, 1.0), (2.0, 2.0)], "on one line"),
    ([(0.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.0, 0.0)], "repeated"),
    ([(0.0, -179.0), (1.0, -179.0), (1.0, 179.0), (0.0, 179.0)], "180 degrees"),
])
def test_a_polygon_that_cannot_be_a_region(polygon: list[tuple[float, float]], why: str) -> None:
    problem = polygon_problem(polygon)
    assert problem is not None and why in problem


def test_a_polygon_in_order_is_a_region() -> None:
    assert polygon_problem(L_SHAPE) is None
    assert polygon_problem([(lat, lon) for lat, lon in NORTH]) is None


@pytest.mark.parametrize(("span", "inside", "outside"), [
    ("07:00-19:00", ["07:00", "12:00", "18:59:59"], ["06:59:59", "19:00", "00:00"]),
    ("22:00-06:00", ["22:00", "23:59:59", "00:00", "05:59"], ["06:00", "12:00", "21:59"]),
    ("18:00-24:00", ["18:00", "23:59:59"], ["00:00", "17:59"]),
    ("00:00-00:30", ["00:00", "00:29"], ["00:30", "23:59"]),
])
def test_hours(span: str, inside: list[str], outside: list[str]) -> None:
    hours = Hours.parse(span)
    assert str(hours) == span
    at = {t: local(t) for t in [*inside, *outside]}
    assert [t for t in inside if not hours.contains(at[t])] == []
    assert [t for t in outside if hours.contains(at[t])] == []


@pytest.mark.parametrize("span", ["08:00-08:00", "00:00-24:00", "24:00-06:00"])
def test_hours_that_say_nothing_are_refused(span: str) -> None:
    with pytest.raises(ValueError):
        Hours.parse(span)
