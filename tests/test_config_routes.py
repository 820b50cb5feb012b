"""[[desks]], [[routes]], [[webhooks]] and center.timezone in the centre's config: a rule set
that could leave an alert with no desk, or names what does not exist, is refused when the
config is loaded, in one line naming the file and the key; a config without routes keeps
the one implicit desk."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from control_center.config import SCHEMA, CenterConfig, load_center_config
from control_center.routing import Routed
from protocol.configfile import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BASE = """\
[center]
db = "c.sqlite"
fleet_dir = "fleet"
[broker]
host = "h"
port = 8883
ca_file = "ca.pem"
"""
SECRET = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
DESKS = """
[[desks]]
id = "police-a"
name = "Police A"
operators = ["alice"]
next = "national"
[[desks]]
id = "national"
name = "National"
"""
ROUTES = """
[[routes]]
name = "pillars"
device_kind = ["pillar"]
desks = ["police-a"]
[[routes]]
name = "rest"
desks = ["national"]
"""
WEBHOOK = """
[[webhooks]]
name = "police-cad"
url = "https://cad.police.example/sos"
secret_file = "cad.key"
"""
NOON = datetime(2025, 1, 15, 12, tzinfo=UTC)


def load(tmp_path: Path, text: str) -> CenterConfig:
    (tmp_path / "cad.key").write_bytes(SECRET + b"\n")
    path = tmp_path / "center.toml"
    path.write_text(BASE + text)
    return load_center_config(path)


def refusal(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, text)
    message = str(refused.value)
    prefix = f"{tmp_path / 'center.toml'}: "
    assert message.startswith(prefix)  # the file, then the key
    return message.removeprefix(prefix)


# -- what loads ---------------------------------------------------------------------------------

def test_without_routes_every_alert_goes_to_the_implicit_desk_all(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.routes.implicit
    assert config.routes.desk_ids == ("all",)
    assert config.routes.route({"device_kind": "pillar"}, NOON) == Routed("all", ("all",))
    assert config.routes.desk("all").escalate_after_s == _item("desks", "escalate_after_s")
    assert config.webhooks == ()


def test_a_config_built_in_code_has_the_implicit_table_too(tmp_path: Path) -> None:
    """CenterConfig(...) without routes (the CLI's tests, the simulator) gets the same table."""
    config = CenterConfig(db=tmp_path / "c", fleet_dir=tmp_path, group="g", operator="op",
                          broker=load(tmp_path, "").broker)
    assert config.routes == load(tmp_path, "").routes
    assert config.timezone == "UTC"


def test_desks_routes_and_webhooks_load_with_the_schemas_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, DESKS + ROUTES + WEBHOOK)
    assert not config.routes.implicit
    national = config.routes.desk("national")
    assert national.operators == ()  # default []
    assert national.escalate_after_s == _item("desks", "escalate_after_s")
    assert config.routes.escalation_chain("police-a") == ["police-a", "national"]
    assert config.routes.route({"device_kind": "pillar"}, NOON) == Routed("pillars",
                                                                        ("police-a",))
    [hook] = config.webhooks
    assert hook.events == tuple(_item("webhooks", "events"))
    assert hook.desks is None
    assert hook.secret == SECRET  # the trailing newline is not part of the key
    assert hook.secret_file == tmp_path / "cad.key"  # beside the config file
    assert SECRET.decode() not in repr(hook)


def test_a_webhook_sends_its_events_of_its_desks(tmp_path: Path) -> None:
    config = load(tmp_path, DESKS + ROUTES + WEBHOOK
                  + 'events = ["alert"]\ndesks = ["police-a"]\n')
    [hook] = config.webhooks
    assert hook.wants("alert", ("police-a", "national"))
    assert not hook.wants("closed", ("police-a",))
    assert not hook.wants("alert", ("national",))


def test_a_webhook_may_name_the_implicit_desk(tmp_path: Path) -> None:
    [hook] = load(tmp_path, WEBHOOK + 'desks = ["all"]\n').webhooks
    assert hook.desks == ("all",)


def test_the_example_config_routes_a_paramedics_sos_to_police_and_ambulance() -> None:
    config = load_center_config(ROOT / "hw" / "examples" / "center.toml")
    almaty = {"lat": 43.25, "lon": 76.95}
    token = {"device_id": "tok-017", "device_kind": "token", "trigger": "button_hold",
             "position": almaty}
    pillar = {"device_id": "pil-ala-003", "device_kind": "pillar", "trigger": "button_press"}
    assert config.routes.route(token, NOON) == Routed("Almaty tokens",
                                                      ("police-almaty", "ambulance-almaty"))
    assert config.routes.route(pillar, NOON) == Routed("Almaty pillars without a position",
                                                       ("police-almaty",))
    assert config.routes.escalation_chain("ambulance-almaty") == ["ambulance-almaty",
                                                                  "national"]


def test_the_example_in_docs_routing_loads_and_routes_as_it_says(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "ROUTING.md").read_text()
    example = re.search(r"## An example.*?```toml\n(.*?)```", text, re.DOTALL)
    assert example is not None
    center, body = example.group(1).split("\n\n", 1)  # [center] first: merged into BASE's
    assert center.startswith("[center]\n")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "webhook-police-cad.key").write_bytes(SECRET)
    path = tmp_path / "center.toml"
    path.write_text(BASE.replace("[center]\n", center + "\n")
                    + body.replace("/etc/sos-center/", "secrets/"))
    config = load_center_config(path)
    assert config.timezone == "Asia/Almaty"
    token = {"device_id": "tok-017", "device_kind": "token", "trigger": "button_hold",
             "position": {"lat": 51.15, "lon": 71.45}}
    assert config.routes.route(token, NOON) == Routed("Astana tokens",
                                                      ("police-astana", "ambulance-astana"))
    assert config.routes.route({"device_id": "pil-ala-003", "device_kind": "pillar"},
                               NOON) == Routed("Almaty pillars without a position",
                                               ("police-almaty",))
    [hook] = config.webhooks
    assert hook.desks == ("police-almaty", "police-astana")


# -- what is refused, naming the key --------------------------------------------------------------

REFUSALS = [
    ("no catch-all at the end",
     DESKS + '[[routes]]\nname = "pillars"\ndevice_kind = ["pillar"]\ndesks = ["police-a"]\n',
     "key 'routes': the last rule ('pillars') has conditions, so an alert matching none would "
     "reach no desk: end with a rule without conditions"),
    ("a catch-all before the end hides the rules after it",
     DESKS + '[[routes]]\nname = "early"\ndesks = ["national"]\n' + ROUTES,
     "key 'routes[0]' (rule 'early'): has no conditions, so the rules after it ('pillars', "
     "'rest') would never match"),
    ("a rule names a desk that does not exist",
     DESKS + ROUTES.replace('desks = ["national"]', 'desks = ["national", "police-x"]'),
     "key 'routes[1].desks': no desk 'police-x' (desks: national, police-a)"),
    ("routes without any desks",
     ROUTES, "key 'routes[0].desks': no desk 'police-a' (no [[desks]] are defined)"),
    ("desks without routes", DESKS, "key 'desks': desks are defined but there are no [[routes]]"),
    ("next names a desk that does not exist",
     DESKS.replace('next = "national"', 'next = "natoinal"') + ROUTES,
     "key 'desks[0].next': no desk 'natoinal' (desks: national, police-a)"),
    ("next makes a cycle",
     DESKS + 'next = "police-a"\n' + ROUTES,
     "key 'desks[1].next': the escalation chain police-a -> national -> police-a is a cycle"),
    ("a desk escalates to itself",
     DESKS.replace('next = "national"', 'next = "police-a"') + ROUTES,
     "key 'desks[0].next': the escalation chain police-a -> police-a is a cycle"),
    ("a desk defined twice",
     DESKS + '[[desks]]\nid = "national"\nname = "again"\n' + ROUTES,
     "key 'desks[2].id': desk 'national' is defined twice"),
    ("a rule name used twice",
     DESKS + ROUTES.replace('name = "rest"', 'name = "pillars"'),
     "key 'routes[1].name': rule 'pillars' is named twice (also routes[0])"),
    ("a webhook names a desk that does not exist",
     DESKS + ROUTES + WEBHOOK + 'desks = ["police-b"]\n',
     "key 'webhooks[0].desks': no desk 'police-b' (desks: national, police-a)"),
    ("a webhook names a desk when there is only the implicit one",
     WEBHOOK + 'desks = ["police-a"]\n',
     "key 'webhooks[0].desks': no desk 'police-a' (desks: all)"),
    # regions
    ("a region with crossing edges (corners out of order)",
     DESKS + '[[routes]]\nname = "bow"\nregion = [[0, 0], [1, 1], [0, 1], [1, 0]]\n'
     'desks = ["police-a"]\n' + ROUTES,
     "key 'routes[0].region' (rule 'bow'): its edges cross"),
    ("a region whose corners are on one line",
     DESKS + '[[routes]]\nname = "line"\nregion = [[0, 0], [1, 1], [2, 2]]\n'
     'desks = ["police-a"]\n' + ROUTES,
     "key 'routes[0].region' (rule 'line'): the corners are on one line"),
    ("a region of two corners",
     DESKS + '[[routes]]\nname = "two"\nregion = [[0, 0], [1, 1]]\ndesks = ["police-a"]\n'
     + ROUTES,
     "key 'routes[0].region': must be a polygon: at least 3 [lat, lon] corners"),
    ("a corner with a latitude out of range (lon, lat swapped)",
     DESKS + '[[routes]]\nname = "swap"\nregion = [[43.2, 76.8], [96.8, 43.3], [43.3, 77.0]]\n'
     'desks = ["police-a"]\n' + ROUTES,
     "key 'routes[0].region[1][0]': must be a latitude in degrees, -90 to 90"),
    ("a corner of three numbers",
     DESKS + '[[routes]]\nname = "3d"\nregion = [[0, 0], [1, 1, 5], [0, 1]]\n'
     'desks = ["police-a"]\n' + ROUTES,
     "key 'routes[0].region[1]': must be one corner, [lat, lon] in degrees"),
    # hours
    ("hours without leading zeros",
     DESKS + '[[routes]]\nname = "day"\nhours = "7:00-19:00"\ndesks = ["police-a"]\n' + ROUTES,
     "key 'routes[0].hours': must be HH:MM-HH:MM, 24-hour local time"),
    ("hours past 23:59",
     DESKS + '[[routes]]\nname = "day"\nhours = "07:00-25:00"\ndesks = ["police-a"]\n' + ROUTES,
     "key 'routes[0].hours': must be HH:MM-HH:MM"),
    ("hours whose start is their end",
     DESKS + '[[routes]]\nname = "day"\nhours = "08:00-08:00"\ndesks = ["police-a"]\n' + ROUTES,
     "key 'routes[0].hours' (rule 'day'): the span is the whole day or empty"),
    # the other keys of a rule and a desk
    ("a trigger the alert schema does not have",
     DESKS + '[[routes]]\nname = "t"\ntrigger = ["button_click"]\ndesks = ["police-a"]\n'
     + ROUTES, "key 'routes[0].trigger[0]': 'button_click' is not one of"),
    ("a device glob in capitals (device ids are lower-case)",
     DESKS + '[[routes]]\nname = "g"\ndevices = ["PIL-*"]\ndesks = ["police-a"]\n' + ROUTES,
     "key 'routes[0].devices[0]': must be a device id or a glob of ids"),
    ("a rule without desks",
     DESKS + '[[routes]]\nname = "g"\ndevice_kind = ["token"]\n' + ROUTES,
     "missing key 'routes[0].desks'"),
    ("a rule with an empty condition",
     DESKS + '[[routes]]\nname = "g"\ndevice_kind = []\ndesks = ["police-a"]\n' + ROUTES,
     "key 'routes[0].device_kind': [] should be non-empty"),
    ("an unknown key in a rule",
     DESKS + ROUTES + 'region_name = "x"\n', "unknown key 'routes[1].region_name' (a typo?)"),
    ("a desk id with capitals",
     DESKS.replace('id = "police-a"', 'id = "Police-A"') + ROUTES,
     "key 'desks[0].id': must be a desk id"),
    ("a desk that escalates at once",
     DESKS + "escalate_after_s = 0\n" + ROUTES,
     "key 'desks[1].escalate_after_s': 0 is less than or equal to the minimum of 0"),
    ("an operator name the console would not take",
     DESKS.replace('["alice"]', '["Alice Smith"]') + ROUTES,
     "key 'desks[0].operators[0]': must be a console user name"),
    # webhooks
    ("a webhook over plain http",
     WEBHOOK.replace("https://", "http://"),
     "key 'webhooks[0].url': must be an https:// URL: an alert carries a person's position"),
    ("a webhook url with a port out of range",
     WEBHOOK.replace("example/sos", "example:99999/sos"),
     "key 'webhooks[0].url': Port out of range"),
    ("a webhook url with a password in it",
     WEBHOOK.replace("https://", "https://cad:hunter2@"),
     "key 'webhooks[0].url': must not carry a user or password"),
    ("a webhook whose secret file is missing",
     WEBHOOK.replace("cad.key", "missing.key"),
     "key 'webhooks[0].secret_file': {tmp}/missing.key: no such file"),
    ("a webhook whose secret is short",
     WEBHOOK.replace("cad.key", "short.key"),
     "key 'webhooks[0].secret_file': {tmp}/short.key: the key is 16 bytes; it must be at "
     "least 32"),
    ("a webhook event that does not exist",
     WEBHOOK + 'events = ["opened"]\n', "key 'webhooks[0].events[0]': 'opened' is not one of"),
    ("two webhooks of one name",
     WEBHOOK + WEBHOOK, "key 'webhooks[1].name': webhook 'police-cad' is defined twice"),
    ("a webhook CA file that is not a certificate",
     WEBHOOK + 'ca_file = "short.key"\n',
     "key 'webhooks[0].ca_file': {tmp}/short.key: not a PEM certificate"),
]


@pytest.mark.parametrize(("what", "text", "expected"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_routing_key_that_cannot_work_is_refused_naming_it(tmp_path: Path, what: str,
                                                             text: str, expected: str) -> None:
    (tmp_path / "short.key").write_bytes(b"0123456789abcdef\n")
    message = refusal(tmp_path, text)
    assert message.startswith(expected.format(tmp=tmp_path)), message


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../../etc/passwd", "Almaty"])
def test_a_time_zone_that_does_not_exist_is_refused_naming_the_key(tmp_path: Path,
                                                                   zone: str) -> None:
    """Checked even without [[routes]]: a zone that is wrong today is wrong when routes come."""
    path = tmp_path / "center.toml"
    path.write_text(BASE.replace("[broker]", f'timezone = "{zone}"\n[broker]'))
    with pytest.raises(ConfigError) as refused:
        load_center_config(path)
    assert str(refused.value) == (f"{path}: key 'center.timezone': no time zone '{zone}' (an "
                                  "IANA name such as Asia/Almaty or Europe/Amsterdam, or UTC)")


# -- the schema of the arrays of tables ---------------------------------------------------------
# tests/test_config_schema.py walks `properties`; these keys live under `items`.

def _walk(node: dict[str, Any], key: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield key, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{key}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{key}[]")
    for index, sub in enumerate(node.get("prefixItems", [])):
        yield from _walk(sub, f"{key}[{index}]")


ARRAYS = ["desks", "routes", "webhooks"]


def _item(array: str, key: str) -> Any:
    return SCHEMA["properties"][array]["items"]["properties"][key]["default"]


@pytest.mark.parametrize("array", ARRAYS)
def test_every_key_of_an_array_of_tables_is_described(array: str) -> None:
    nodes = list(_walk(SCHEMA["properties"][array], array))
    assert [key for key, node in nodes if not node.get("description")] == []


@pytest.mark.parametrize("array", ARRAYS)
def test_every_table_in_an_array_refuses_keys_it_does_not_list(array: str) -> None:
    nodes = list(_walk(SCHEMA["properties"][array], array))
    tables = [key for key, node in nodes if "properties" in node]
    assert tables == [f"{array}[]"]
    assert [key for key, node in nodes
            if "properties" in node and node.get("additionalProperties") is not False] == []


def test_the_defaults_inside_the_arrays_are_the_ones_tested_above() -> None:
    """A new default in a [[table]] needs a line in the loading test above."""
    found = sorted(key for array in ARRAYS for key, node in _walk(SCHEMA["properties"][array],
                                                                   array) if "default" in node)
    assert found == ["desks[].escalate_after_s", "desks[].operators", "webhooks[].events"]


def test_a_rules_kinds_and_triggers_are_the_alert_schemas() -> None:
    alert = json.loads((ROOT / "protocol" / "schemas" / "alert.schema.json").read_text())
    rule = SCHEMA["properties"]["routes"]["items"]["properties"]
    assert rule["device_kind"]["items"]["enum"] == alert["properties"]["device_kind"]["enum"]
    assert rule["trigger"]["items"]["enum"] == alert["properties"]["trigger"]["enum"]


def test_the_docs_example_is_the_example_configs_table() -> None:
    """docs/ROUTING.md says hw/examples/center.toml carries the same table."""
    text = (ROOT / "docs" / "ROUTING.md").read_text()
    example = re.search(r"## An example.*?```toml\n(.*?)```", text, re.DOTALL)
    assert example is not None
    doc = tomllib.loads(example.group(1))
    shipped = tomllib.loads((ROOT / "hw" / "examples" / "center.toml").read_text())
    assert (doc["desks"], doc["routes"]) == (shipped["desks"], shipped["routes"])
    assert doc["center"]["timezone"] == shipped["center"]["timezone"]
