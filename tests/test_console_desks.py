"""Desks in the console, in real headless Chromium: an operator's queue shows the alerts routed to
the desks they work; an alert nobody takes climbs to the next desk, where it appears with a
louder alarm, and the escalation step is shown. The escalation itself runs on the real clock
here (its timing is tested exactly in test_escalation.py).

Desks: north (alice), south (bob); an untaken alert climbs north -> south after 2 s; sam, a
supervisor, sees every alert.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from control_center.routing import RouteTable
from simulator.broker import PrivateBroker
from simulator.browser import chromium, is_blank, log_in, wait_until
from simulator.console_rig import PASSWORD, ConsoleRig
from tests.helpers import raise_alert

pytestmark = pytest.mark.skipif(not shutil.which("chromedriver"),
                                reason="needs Debian's chromium-driver (make sysdeps)")
ESCALATE_AFTER_S = 2.0


def desks_table() -> RouteTable:
    desks = [{"id": "north", "name": "North desk", "operators": ["alice"],
              "escalate_after_s": ESCALATE_AFTER_S, "next": "south"},
             {"id": "south", "name": "South desk", "operators": ["bob"],
              "escalate_after_s": 60.0}]
    routes = [{"name": "everything to the north desk", "desks": ["north"]}]
    return RouteTable.from_config(desks, routes, "UTC")


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Iterator[ConsoleRig]:
    workdir = tmp_path_factory.mktemp("desks")
    with PrivateBroker(workdir / "broker") as broker:
        running = ConsoleRig(workdir / "centre", broker, routes=desks_table())
        running.start()
        yield running
        running.stop()


@pytest.fixture(scope="module")
def pages(rig: ConsoleRig, tmp_path_factory) -> Iterator[dict[str, WebDriver]]:
    """alice, bob and sam, each logged in before anything happens."""
    profiles = tmp_path_factory.mktemp("profiles")
    opened = {}
    try:
        for user in ("alice", "bob", "sam"):
            opened[user] = chromium(rig.cert_file, profiles / user)
            log_in(opened[user], rig.url, user, PASSWORD)
        yield opened
    finally:
        for driver in opened.values():
            driver.quit()


@pytest.fixture(scope="module")
def untaken(rig: ConsoleRig, pages) -> str:
    """An alert routed to the north desk, which nobody takes."""
    return raise_alert(rig, "tok-desk-01")


def has_row(driver: WebDriver, alert_id: str) -> bool:
    return bool(driver.find_elements(By.CSS_SELECTOR, f'tr[data-alert-id="{alert_id}"]'))


def test_the_alert_is_stored_with_its_desk_and_rule(rig: ConsoleRig, untaken: str) -> None:
    record = rig.store.alert(untaken)
    assert (record.desks, record.route_rule) == (("north",), "everything to the north desk")


def test_the_operator_of_the_routed_desk_sees_it_and_a_supervisor_too(pages,
                                                                      untaken: str) -> None:
    wait_until(pages["alice"], lambda d: has_row(d, untaken), what="alice's row")
    wait_until(pages["sam"], lambda d: has_row(d, untaken), what="sam's row")


def test_an_operator_of_another_desk_does_not_see_it_before_it_escalates(
        rig: ConsoleRig, pages, untaken: str) -> None:
    if rig.routing.steps(untaken):
        pytest.skip("escalated already (a slow machine): the next test covers bob's page")
    assert not has_row(pages["bob"], untaken)


def test_an_untaken_alert_climbs_to_the_next_desk_with_a_louder_alarm(rig: ConsoleRig, pages,
                                                                      untaken: str) -> None:
    rig.wait_for(lambda: rig.routing.steps(untaken), timeout=20)
    step = rig.routing.steps(untaken)[0]
    assert (step["step"], step["to_desk"]) == (1, "south")
    bob = pages["bob"]
    wait_until(bob, lambda d: has_row(d, untaken), what="the escalated alert in bob's queue")
    wait_until(bob, lambda d: d.execute_script("return window.sosConsole.loudBeepsHeard") >= 1,
               what="the louder alarm to reach the speaker")
    assert "ESCALATED" in bob.find_element(By.ID, "alarm-text").text
    bob.find_element(By.CSS_SELECTOR, f'tr[data-alert-id="{untaken}"]').click()
    facts = wait_until(bob, lambda d: d.find_element(By.ID, "detail-facts").text,
                       what="the alert's facts")
    assert "Escalated (1)" in facts and "south" in facts


def test_taking_it_stops_the_climb(rig: ConsoleRig, pages, untaken: str) -> None:
    page = pages["bob"]
    page.find_element(By.CSS_SELECTOR, f'tr[data-alert-id="{untaken}"]').click()
    button = wait_until(page, lambda d: d.find_element(
        By.CSS_SELECTOR, '#details button[data-action="claim"]'))
    button.click()
    rig.wait_for(lambda: rig.store.alert(untaken).claimed_by == "bob")
    steps = len(rig.routing.steps(untaken))
    assert rig.routing.watch.check(rig.store.alert(untaken).stored_at + 3600) == []
    assert len(rig.routing.steps(untaken)) == steps


def test_the_api_lists_an_operator_only_their_desks_alerts(rig: ConsoleRig, pages,
                                                           untaken: str,
                                                           tmp_path: Path) -> None:
    """Before escalation only alice (north) and sam see it; this checks the filter itself on a
    second, fresh alert through each page's own request."""
    second = raise_alert(rig, "tok-desk-02")
    listed = {}
    for user, page in pages.items():
        ids = page.execute_async_script("""
            const done = arguments[0];
            fetch("/api/alerts", {credentials: "same-origin"}).then(r => r.json())
              .then(b => done(b.alerts.map(a => a.alert_id)));
        """)
        listed[user] = second in ids
    if rig.routing.steps(second):
        pytest.skip("escalated before the pages asked (a slow machine)")
    assert listed == {"alice": True, "bob": False, "sam": True}


def test_alerts_of_one_incident_are_shown_together_on_one_map(rig: ConsoleRig, pages,
                                                            tmp_path: Path) -> None:
    """Two SOS 200 m apart within a minute: one incident; the second's map shows the first."""
    ids = []
    for device_id, (lat, lon) in (("tok-inc-01", (43.2389, 76.8897)),
                                  ("pil-inc-01", (43.2407, 76.8897))):
        where = {"source": "live", "lat": lat, "lon": lon, "alt_m": None, "accuracy_m": 8.0,
                 "fix_time": "2027-01-15T08:00:00.000Z", "age_s": 1.0}
        ids.append(raise_alert(rig, device_id, position=where))
    rig.wait_for(lambda: rig.store.alert(ids[1]).incident_id is not None)
    assert rig.store.alert(ids[1]).incident_id == rig.store.alert(ids[0]).incident_id
    sam = pages["sam"]
    line = wait_until(sam, lambda d: next(iter(d.find_elements(
        By.CSS_SELECTOR, f'tr[data-alert-id="{ids[1]}"]')), None), what="the second alert")
    line.click()
    facts = wait_until(sam, lambda d: "Incident" in d.find_element(By.ID, "detail-facts").text
                       and d.find_element(By.ID, "detail-facts").text, what="the incident")
    assert "tok-inc-01" in facts
    wait_until(sam, lambda d: d.execute_script(
        "return document.querySelectorAll('#map path[stroke=\"#ffb020\"]').length") >= 1,
        what="the incident's other alert on the map")
    png = sam.get_screenshot_as_png()
    (tmp_path / "incident.png").write_bytes(png)  # kept as the test's artefact
    assert not is_blank(png)
