"""Which desks an alert goes to: the centre's route table (`[[desks]]` and `[[routes]]` in its
config; docs/ROUTING.md).

The decision is a pure function of the alert, the table and the time it is given: no I/O, no
clock read. So it is tested as a table, replayed exactly, and the centre's instances agree on it;
the caller passes `now` (the time the centre received the alert: a device's clock may be wrong)
and stores the result with the alert, because the same alert routed at another hour may go
elsewhere.

A table is checked as a whole when it is built, because a rule set that can leave an alert with
no desk must never start: the last rule has no conditions (a catch-all), every desk a rule or an
escalation names exists, and escalation chains end. Each refusal is a ConfigError naming the key
(`routes[2].desks`: indexes count from 0, in file order), which the config loader prefixes with
the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from protocol.configfile import ConfigError

# A config without [[routes]] keeps the behaviour from before routing: every alert goes to one
# desk that every operator works.
IMPLICIT_DESK = "all"
IMPLICIT_RULE = "all"

Point = tuple[float, float]  # (lat, lon) in degrees

_CONDITIONS = ("device_kind", "trigger", "devices", "region", "hours")


@dataclass(frozen=True)
class Desk:
    """A place alerts are worked from (a district's police, an ambulance dispatch).

    `operators` are console user names; empty is allowed (a desk whose people are not yet
    entered, or one only reached by escalation). `next` is the desk an alert climbs to when none
    of its desks took it within `escalate_after_s` (the escalation itself is not done here)."""

    id: str
    name: str
    operators: tuple[str, ...]
    escalate_after_s: float
    next: str | None = None


@dataclass(frozen=True)
class Hours:
    """A daily span of local time, start included, end excluded, in minutes since midnight;
    `end` may be 1440 (24:00). A start after the end wraps midnight (22:00-06:00)."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> Hours:
        """`HH:MM-HH:MM` (the schema has checked the shape); ValueError for a span that says
        nothing: the same start and end (leave `hours` out for all day)."""
        first, last = text.split("-")
        start, end = _minutes(first), _minutes(last)
        if start == 1440:
            raise ValueError("a span cannot start at 24:00 (write 00:00)")
        if start == end or (start == 0 and end == 1440):
            raise ValueError("the span is the whole day or empty: leave `hours` out for a rule "
                             "that holds all day")
        return cls(start, end)

    def contains(self, local: datetime) -> bool:
        minute = local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # wraps midnight

    def __str__(self) -> str:
        return "-".join(f"{m // 60:02d}:{m % 60:02d}" for m in (self.start, self.end))


@dataclass(frozen=True)
class Rule:
    """One `[[routes]]` entry: its conditions (all must hold; within one, any value may) and
    the desks an alert that meets them goes to. A condition left out (None) always holds, so a
    rule with none is a catch-all."""

    name: str
    desks: tuple[str, ...]
    device_kind: frozenset[str] | None = None
    trigger: frozenset[str] | None = None
    devices: tuple[str, ...] | None = None  # fnmatch globs of device ids: a "device group"
    region: tuple[Point, ...] | None = None  # polygon, (lat, lon) corners in order
    hours: Hours | None = None  # local time in the table's zone

    @property
    def conditions(self) -> tuple[str, ...]:
        """The names of the conditions this rule sets, in config order."""
        return tuple(c for c in _CONDITIONS if getattr(self, c) is not None)

    def matches(self, alert: Mapping[str, Any], local: datetime) -> bool:
        """Whether `alert` (a stored alert message) at local time `local` meets every condition.
        A missing field never meets a condition on it: an alert without a position (or with
        lat/lon null) does not match a rule with a region."""
        if self.device_kind is not None and alert.get("device_kind") not in self.device_kind:
            return False
        if self.trigger is not None and alert.get("trigger") not in self.trigger:
            return False
        if self.devices is not None:
            device = alert.get("device_id")
            if not isinstance(device, str) or not any(fnmatchcase(device, g)
                                                      for g in self.devices):
                return False
        if self.region is not None:
            point = _position(alert)
            if point is None or not point_in_polygon(point, self.region):
                return False
        return self.hours is None or self.hours.contains(local)


class Routed(NamedTuple):
    """The decision for one alert: the rule that matched and the desks it names. Stored with
    the alert, so the console and an auditor can see why it went where it went. A named tuple,
    so it is also the plain `(rule, desks)` pair the service's `router` returns."""

    rule: str
    desks: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "desks": list(self.desks)}


@dataclass(frozen=True)
class RouteTable:
    """The desks and the ordered rules; the first rule an alert matches decides.

    Built through `from_config` (or `implicit_table`), which check the whole table; constructing one
    directly runs the same checks (catch-all last, desks exist, regions, no cycle), so no
    unchecked table exists. `implicit` is true for the table of a config without
    [[routes]]: one desk, `all`, which every operator works."""

    desks: tuple[Desk, ...]
    rules: tuple[Rule, ...]
    timezone: str
    implicit: bool = False
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)
    _by_id: dict[str, Desk] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", _zone(self.timezone))
        object.__setattr__(self, "_by_id", _desks_by_id(self.desks))
        _check_rules(self.rules, self._by_id)
        _check_chains(self.desks, self._by_id)

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, desks: Sequence[Mapping[str, Any]],
                    routes: Sequence[Mapping[str, Any]], timezone: str) -> RouteTable:
        """The table of a config's `[[desks]]` and `[[routes]]` (schema-checked, with the
        schema's defaults filled in) and `center.timezone`. `routes` must not be empty: a
        config without routes gets `implicit_table` (the loader decides that, with the schema's
        defaults for the implicit desk)."""
        if not routes:
            raise ConfigError("key 'routes': at least one rule (a config without [[routes]] "
                              "gets RouteTable.implicit_table)")
        return cls(desks=tuple(_desk(d) for d in desks),
                   rules=tuple(_rule(i, r) for i, r in enumerate(routes)),
                   timezone=timezone)

    @classmethod
    def implicit_table(cls, desk: Desk, timezone: str) -> RouteTable:
        """The table of a config without [[routes]]: every alert to `desk` (id `all`), by one
        rule without conditions (also named `all`)."""
        return cls(desks=(desk,), rules=(Rule(IMPLICIT_RULE, (desk.id,)),), timezone=timezone,
                   implicit=True)

    # -- using ------------------------------------------------------------------------------

    def route(self, alert: Mapping[str, Any], now: datetime) -> Routed:
        """The first rule `alert` matches at instant `now` (an aware datetime; hours are read
        in the table's zone) and its desks. Always a decision: the last rule is a catch-all."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be an aware datetime (hours are local to the table's "
                             "zone, so a naive time is ambiguous)")
        local = now.astimezone(self._zone)
        for rule in self.rules:
            if rule.matches(alert, local):
                return Routed(rule.name, rule.desks)
        raise AssertionError("unreachable: the last rule is a catch-all")  # checked at build

    def route_at(self, alert: Mapping[str, Any], at: float) -> Routed:
        """`route` at `at` seconds since the epoch (the service's clock): the shape of
        CenterService's `router(alert, stored_at)`."""
        return self.route(alert, datetime.fromtimestamp(at, UTC))

    def desk(self, desk_id: str) -> Desk:
        """The desk `desk_id`; KeyError naming it when there is none."""
        try:
            return self._by_id[desk_id]
        except KeyError:
            raise KeyError(f"no desk '{desk_id}'") from None

    @property
    def desk_ids(self) -> tuple[str, ...]:
        return tuple(d.id for d in self.desks)

    def desks_of(self, operator: str) -> tuple[str, ...]:
        """The desks whose `operators` list `operator` (none for the implicit desk, which
        lists nobody because everybody works it: check `implicit` first)."""
        return tuple(d.id for d in self.desks if operator in d.operators)

    def escalation_chain(self, desk_id: str) -> list[str]:
        """`desk_id` followed by the desks its alerts climb to, in order (`next`, then that
        desk's `next`, ...). Finite: cycles are refused when the table is built."""
        chain = [self.desk(desk_id).id]
        while (following := self._by_id[chain[-1]].next) is not None:
            chain.append(following)
        return chain


# -- geometry -------------------------------------------------------------------------------------

def point_in_polygon(point: Point, polygon: Sequence[Point]) -> bool:
    """Whether (lat, lon) `point` lies in `polygon` (corners in order, not repeating the first),
    by even-odd ray casting, with a point on an edge counted inside (so a point on the border of
    two districts matches the first rule that has either; first match wins).

    Latitude and longitude are treated as plane coordinates. Over a district (tens of km) the
    error is a small distortion of straight edges, far below the accuracy of the corners
    anyone draws; it would be wrong for a polygon across the 180th meridian or around a pole,
    which the table refuses (a span of more than 180 degrees of longitude)."""
    y, x = point
    inside = False
    count = len(polygon)
    for i in range(count):
        y1, x1 = polygon[i]
        y2, x2 = polygon[(i + 1) % count]
        if _on_segment(point, (y1, x1), (y2, x2)):
            return True
        if (y1 > y) != (y2 > y):  # the edge crosses the point's latitude
            crossing = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            if x < crossing:
                inside = not inside
    return inside


def _on_segment(p: Point, a: Point, b: Point) -> bool:
    if _cross(a, b, p) != 0:
        return False
    return (min(a[0], b[0]) <= p[0] <= max(a[0], b[0])
            and min(a[1], b[1]) <= p[1] <= max(a[1], b[1]))


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _segments_cross(a: Point, b: Point, c: Point, d: Point) -> bool:
    """Whether segments ab and cd share a point (touching counts)."""
    d1, d2 = _cross(c, d, a), _cross(c, d, b)
    d3, d4 = _cross(a, b, c), _cross(a, b, d)
    if ((d1 > 0) != (d2 > 0) and d1 != 0 and d2 != 0
            and (d3 > 0) != (d4 > 0) and d3 != 0 and d4 != 0):
        return True
    return (_on_segment(a, c, d) or _on_segment(b, c, d)
            or _on_segment(c, a, b) or _on_segment(d, a, b))


def polygon_problem(polygon: Sequence[Point]) -> str | None:
    """Why `polygon` cannot be a region, or None. Refused: a repeated corner, corners on one
    line (no area), edges that cross (corners listed out of order make a bow-tie whose even-odd
    inside is not the area meant), and a span over 180 degrees of longitude (planar geometry
    would take the long way round the globe)."""
    count = len(polygon)
    if count < 3:
        return "a region needs at least 3 corners"
    lons = [lon for _, lon in polygon]
    if max(lons) - min(lons) > 180:
        return ("the region spans more than 180 degrees of longitude (across the 180th "
                "meridian?): split it into two rules")
    if len(set(polygon)) != count:
        return "a corner is repeated (do not close the ring by repeating the first corner)"
    if all(_cross(polygon[0], polygon[1], p) == 0 for p in polygon[2:]):
        return "the corners are on one line: the region has no area"
    for i in range(count):
        for j in range(i + 1, count):
            if j == i + 1 or (i == 0 and j == count - 1):
                continue  # neighbouring edges share a corner
            a, b = polygon[i], polygon[(i + 1) % count]
            c, d = polygon[j], polygon[(j + 1) % count]
            if _segments_cross(a, b, c, d):
                return (f"its edges cross (corner {i + 1} to {i + 2}, and corner {j + 1} to "
                        f"{(j + 1) % count + 1}): list the corners in order around the area")
    return None


def _position(alert: Mapping[str, Any]) -> Point | None:
    position = alert.get("position")
    if not isinstance(position, Mapping):
        return None
    lat, lon = position.get("lat"), position.get("lon")
    if isinstance(lat, bool) or isinstance(lon, bool):
        return None
    if not isinstance(lat, int | float) or not isinstance(lon, int | float):
        return None
    return (float(lat), float(lon))


# -- building and checking ------------------------------------------------------------------------

def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"key 'center.timezone': no time zone '{name}' (an IANA name such as "
                          "Asia/Almaty or Europe/Amsterdam, or UTC)") from None


def _desk(data: Mapping[str, Any]) -> Desk:
    return Desk(id=data["id"], name=data["name"], operators=tuple(data["operators"]),
                escalate_after_s=float(data["escalate_after_s"]), next=data.get("next"))


def _rule(index: int, data: Mapping[str, Any]) -> Rule:
    key = f"routes[{index}]"
    region = None  # checked with the table (_check_rules)
    if "region" in data:
        region = tuple((float(lat), float(lon)) for lat, lon in data["region"])
    hours = None
    if "hours" in data:
        try:
            hours = Hours.parse(data["hours"])
        except ValueError as exc:
            raise ConfigError(f"key '{key}.hours' (rule '{data['name']}'): {exc}") from None
    return Rule(
        name=data["name"], desks=tuple(data["desks"]),
        device_kind=_set(data.get("device_kind")), trigger=_set(data.get("trigger")),
        devices=tuple(data["devices"]) if "devices" in data else None,
        region=region, hours=hours,
    )


def _set(values: Iterable[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


def _desks_by_id(desks: Sequence[Desk]) -> dict[str, Desk]:
    by_id: dict[str, Desk] = {}
    for index, desk in enumerate(desks):
        if desk.id in by_id:
            raise ConfigError(f"key 'desks[{index}].id': desk '{desk.id}' is defined twice")
        by_id[desk.id] = desk
    return by_id


def unknown_desk(key: str, desk_id: str, known: Iterable[str]) -> ConfigError:
    """The refusal of a key that names a desk the table does not have (also used by the
    loader for `webhooks[i].desks`)."""
    names = sorted(known)
    listed = f"desks: {', '.join(names)}" if names else "no [[desks]] are defined"
    return ConfigError(f"key '{key}': no desk '{desk_id}' ({listed})")


def _check_rules(rules: Sequence[Rule], desks: Mapping[str, Desk]) -> None:
    if not rules:
        raise ConfigError("key 'routes': a route table needs at least one rule")
    names: dict[str, int] = {}
    for index, rule in enumerate(rules):
        key = f"routes[{index}]"
        if rule.name in names:
            raise ConfigError(f"key '{key}.name': rule '{rule.name}' is named twice (also "
                              f"routes[{names[rule.name]}]); the name is stored with each "
                              "alert it routes, so it must say which rule it was")
        names[rule.name] = index
        if not rule.desks:
            raise ConfigError(f"key '{key}.desks' (rule '{rule.name}'): names no desk")
        why = None if rule.region is None else polygon_problem(rule.region)
        if why is not None:
            raise ConfigError(f"key '{key}.region' (rule '{rule.name}'): {why}")
        for desk_id in rule.desks:
            if desk_id not in desks:
                raise unknown_desk(f"{key}.desks", desk_id, desks)
        if not rule.conditions and index != len(rules) - 1:
            later = ", ".join(f"'{r.name}'" for r in rules[index + 1:])
            raise ConfigError(f"key '{key}' (rule '{rule.name}'): has no conditions, so the "
                              f"rules after it ({later}) would never match: only the last rule "
                              "may be without conditions")
    last = rules[-1]
    if last.conditions:
        raise ConfigError(f"key 'routes': the last rule ('{last.name}') has conditions, so an "
                          "alert matching none would reach no desk: end with a rule without "
                          "conditions")


def _check_chains(desks: Sequence[Desk], by_id: Mapping[str, Desk]) -> None:
    for index, desk in enumerate(desks):
        if desk.next is not None and desk.next not in by_id:
            raise unknown_desk(f"desks[{index}].next", desk.next, by_id)
    position = {desk.id: index for index, desk in enumerate(desks)}
    for desk in desks:
        chain = [desk.id]
        while (following := by_id[chain[-1]].next) is not None:
            if following in chain:  # named at the desk whose `next` closes the loop
                path = " -> ".join([*chain[chain.index(following):], following])
                raise ConfigError(f"key 'desks[{position[chain[-1]]}].next': the escalation "
                                  f"chain {path} is a cycle: an unanswered alert would climb "
                                  "round it for ever; end the chain at a desk without `next`")
            chain.append(following)
