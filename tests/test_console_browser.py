"""The operator's console in real headless Chromium, against the real centre, broker and a
virtual token running the real firmware (with its synthetic camera streaming live video).

One SOS runs through the module, in the order an operator meets it: the row appears in an open
page with the alarm, the map and the live video; a second operator and an auditor are refused;
the CSRF token is required; acknowledge and close reach the device; the closed alert replays.
Each test checks one of those behaviours; the SOS (`sos`) and the operator's page are shared,
so their order is the file's order. Screenshots of every page are kept under the module's
temp dir (and copied to $SOS_CONSOLE_SCREENSHOTS when set: `docs/` for the README's).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from control_center.ingest import DirectoryStore
from simulator.broker import PrivateBroker
from simulator.browser import chromium, is_blank, log_in, page_fetch, wait_until
from simulator.console_rig import PASSWORD, ConsoleRig
from tests.helpers import Device
from tests.test_evidence_verify import FRAMES, tiny_ts
from tests.test_ingest_support import Card, enrol

pytestmark = pytest.mark.skipif(not shutil.which("chromedriver"),
                                reason="needs Debian's chromium-driver (make sysdeps)")
TOKEN = "tok-web-01"
EVIDENCE_DEVICE = "tok-ev-01"
CALL = "call-2026-0412"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("console")


@pytest.fixture(scope="module")
def rig(workdir: Path) -> Iterator[ConsoleRig]:
    with PrivateBroker(workdir / "broker") as broker:
        running = ConsoleRig(workdir / "centre", broker, evidence_dir=workdir / "evidence")
        running.start()
        yield running
        running.stop()


@pytest.fixture(scope="module")
def evidence(rig: ConsoleRig, workdir: Path) -> str:
    """A device's uploaded call in the ingest's store: real H.264, age-encrypted to the fleet's
    evidence key, chained and signed with the device's enrolled key."""
    fleet = rig.broker.fleet
    fleet.ensure_evidence_key()
    store = DirectoryStore(workdir / "evidence")
    card = Card(fleet, enrol(fleet, workdir / "cards", EVIDENCE_DEVICE), workdir / "card")
    for seq in (1, 2):
        segment = card.record(tiny_ts((seq - 1) * FRAMES), call_id=CALL, flags=("evidence",))
        store.put(EVIDENCE_DEVICE, segment.seq, segment.ciphertext, segment.manifest,
                  segment.signature)
    return CALL


@pytest.fixture(scope="module")
def token(rig: ConsoleRig, workdir: Path) -> Iterator[Device]:
    (workdir / "devices").mkdir(exist_ok=True)
    device = Device(rig.broker, workdir / "devices", TOKEN, camera=True)
    device.start()
    device.wait_kind("link", up=True)
    rig.wait_for(lambda: rig.store.device(TOKEN) is not None)
    yield device
    device.close()


class Browsers:
    """Chromium windows, each with its own profile (so its own session cookie)."""

    def __init__(self, rig: ConsoleRig, workdir: Path) -> None:
        self.rig, self.workdir = rig, workdir
        self.shots = workdir / "screenshots"
        self.shots.mkdir(exist_ok=True)
        self.open: list[WebDriver] = []

    def new(self, user: str | None = None) -> WebDriver:
        profile = self.workdir / f"profile-{len(self.open)}"
        driver = chromium(self.rig.cert_file, profile)
        self.open.append(driver)
        if user is not None:
            log_in(driver, self.rig.url, user, PASSWORD)
        return driver

    def screenshot(self, driver: WebDriver, name: str) -> Path:
        """Save the page as the test saw it; refuse a blank one."""
        path = self.shots / f"{name}.png"
        png = driver.get_screenshot_as_png()
        path.write_bytes(png)
        assert not is_blank(png), f"the {name} page rendered blank"
        target = os.environ.get("SOS_CONSOLE_SCREENSHOTS")
        if target:
            shutil.copy(path, Path(target) / f"console-{name}.png")
        return path

    def close(self) -> None:
        for driver in self.open:
            driver.quit()


@pytest.fixture(scope="module")
def browsers(rig: ConsoleRig, workdir: Path) -> Iterator[Browsers]:
    opened = Browsers(rig, workdir)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def alice(browsers: Browsers, token: Device) -> WebDriver:
    """The operator on duty: her console is open before anything happens."""
    return browsers.new("alice")


@pytest.fixture(scope="module")
def sos(rig: ConsoleRig, token: Device, alice: WebDriver) -> str:
    """The wearer holds SOS; the alert's id once the centre has stored it."""
    token.press(2.0)
    rig.wait_for(lambda: rig.store.alerts())
    return rig.store.alerts()[0].alert_id


def row(driver: WebDriver, alert_id: str):
    rows = driver.find_elements(By.CSS_SELECTOR, f'tr[data-alert-id="{alert_id}"]')
    return rows[0] if rows else None


def select_alert(driver: WebDriver, alert_id: str) -> None:
    """Click the alert's row (opening the collapsed "Closed" list first for a closed one)."""
    line = wait_until(driver, lambda d: row(d, alert_id), what="the alert's row")
    if not line.is_displayed():
        driver.find_element(By.CSS_SELECTOR, "#closed-alerts summary").click()
    line.click()
    wait_until(driver, lambda d: d.execute_script(
        "return window.sosConsole.selected() === arguments[0]", alert_id),
        what="the alert to be selected")


def click_action(driver: WebDriver, action: str) -> None:
    button = wait_until(driver, lambda d: d.find_element(
        By.CSS_SELECTOR, f'#details button[data-action="{action}"]'))
    wait_until(driver, lambda d: button.is_enabled(), what=f"the {action} button")
    button.click()


def ticks_pass(driver: WebDriver, n: int) -> None:
    """Wait for the page's own 1 s tick (it beeps on it) to come round n times."""
    start = driver.execute_script("return window.sosConsole.ticks")
    wait_until(driver, lambda d: d.execute_script("return window.sosConsole.ticks") >= start + n,
               what=f"{n} ticks of the page")


def assert_silent(driver: WebDriver) -> None:
    """No beep reaches the speaker over three ticks (one beep begun before may still count)."""
    ticks_pass(driver, 1)
    heard = driver.execute_script("return window.sosConsole.beepsHeard")
    ticks_pass(driver, 3)
    assert driver.execute_script("return window.sosConsole.beepsHeard") == heard


def action_error(driver: WebDriver) -> str:
    return wait_until(driver, lambda d: d.find_element(By.ID, "action-error").text.strip(),
                      what="an error line")


# -- accounts ----------------------------------------------------------------------------------
def test_a_wrong_password_is_refused_with_a_message_and_no_session(browsers, rig) -> None:
    driver = browsers.new()
    driver.get(rig.url + "login")
    driver.find_element(By.NAME, "username").send_keys("alice")
    driver.find_element(By.NAME, "password").send_keys("not the password at all")
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    message = wait_until(driver, lambda d: d.find_element(By.ID, "login-error").text.strip())
    assert "wrong user name or password" in message
    browsers.screenshot(driver, "login-refused")
    driver.get(rig.url)
    assert driver.current_url.endswith("/login")


def test_log_out_ends_the_session(browsers, rig) -> None:
    driver = browsers.new("bob")
    driver.find_element(By.ID, "logout").click()
    wait_until(driver, lambda d: d.current_url.endswith("/login"), what="the log-in page")
    driver.get(rig.url + "api/me")
    assert '"log in first"' in driver.page_source


# -- an SOS, as the operator meets it ----------------------------------------------------------
def test_a_press_on_the_device_makes_a_row_appear_in_the_open_page(alice, sos, browsers) -> None:
    shown = wait_until(alice, lambda d: row(d, sos), what="the new alert's row")
    assert shown.get_attribute("data-status") == "open"
    assert TOKEN in shown.text
    browsers.screenshot(alice, "alert-queue")


def test_a_new_sos_sounds_the_alarm_until_someone_takes_it(alice, sos) -> None:
    wait_until(alice, lambda d: row(d, sos))
    assert alice.execute_script("return window.sosConsole.alarmActive()")
    assert alice.find_element(By.ID, "alarm").is_displayed()
    wait_until(alice, lambda d: d.execute_script("return window.sosConsole.beepsHeard") >= 2,
               what="the alarm's beeps to reach the speaker")


def newest_position(rig: ConsoleRig, alert_id: str) -> dict:
    """Where the centre last heard the alert's device was (its updates follow the alert)."""
    updates = [u["position"] for u in rig.store.updates(alert_id) if u["kind"] == "position"]
    return updates[-1] if updates else rig.store.alert(alert_id).position


def test_the_map_marker_stands_at_the_reported_position(alice, sos, rig) -> None:
    select_alert(alice, sos)
    assert rig.store.alert(sos).position["source"] == "live"

    def marker_offset(driver: WebDriver) -> list[float] | None:
        """The marker's tip minus where the newest position projects, in pixels (None until
        the marker is drawn or while a new update is on its way to the page)."""
        position = newest_position(rig, sos)
        offset = driver.execute_script("""
            const c = window.sosConsole, marker = c.markerFor(arguments[0]);
            if (!marker || !marker.getElement()) return null;
            const expected = c.map.latLngToContainerPoint([arguments[1], arguments[2]]);
            const box = c.map.getContainer().getBoundingClientRect();
            const icon = marker.getElement().getBoundingClientRect();
            // Leaflet's default marker points at the bottom centre of its icon
            return [icon.left + icon.width / 2 - box.left - expected.x,
                    icon.bottom - box.top - expected.y];
        """, sos, position["lat"], position["lon"])
        return offset if offset and abs(offset[0]) <= 2 and abs(offset[1]) <= 2 else None

    assert wait_until(alice, marker_offset, what="the marker at the newest position")


def test_the_live_video_plays_in_the_page(alice, sos, browsers) -> None:
    select_alert(alice, sos)
    video = wait_until(alice, lambda d: d.find_element(By.ID, "live-video"),
                       what="the live video element")
    first = wait_until(alice, lambda d: d.execute_script(
        "const v = arguments[0]; return v.currentTime > 0 ? v.currentTime : null", video),
        what="the video to play")
    wait_until(alice, lambda d: d.execute_script(
        "return arguments[0].currentTime > arguments[1]", video, first),
        what="the video's time to advance")
    spread = alice.execute_script("""
        const v = arguments[0], c = document.createElement("canvas");
        c.width = v.videoWidth; c.height = v.videoHeight;
        const g = c.getContext("2d"); g.drawImage(v, 0, 0);
        const px = g.getImageData(0, 0, c.width, c.height).data;
        let lo = 255, hi = 0;
        for (let i = 0; i < px.length; i += 4) {
            const y = (px[i] + px[i + 1] + px[i + 2]) / 3;
            lo = Math.min(lo, y); hi = Math.max(hi, y);
        }
        return hi - lo;
    """, video)
    assert spread > 32, f"the captured frame is blank (luma spread {spread})"
    browsers.screenshot(alice, "alert-live")


def test_a_second_operator_cannot_take_an_alert_already_taken(alice, sos, browsers,
                                                               rig) -> None:
    select_alert(alice, sos)
    click_action(alice, "claim")
    wait_until(alice, lambda d: row(d, sos).get_attribute("data-claimed-by") == "alice",
               what="alice's claim to show")
    assert not alice.execute_script("return window.sosConsole.alarmActive()")
    assert_silent(alice)
    bob = browsers.new("bob")
    select_alert(bob, sos)
    click_action(bob, "claim")
    assert "taken by alice" in action_error(bob)
    assert rig.store.alert(sos).claimed_by == "alice"


def test_an_auditor_may_not_acknowledge_and_nothing_changes(sos, browsers, rig) -> None:
    audrey = browsers.new("audrey")
    select_alert(audrey, sos)
    assert not audrey.find_element(By.CSS_SELECTOR,
                                   '#details button[data-action="ack"]').is_enabled()
    answer = page_fetch(audrey, "POST", f"/api/alerts/{sos}/ack", {})
    assert answer["status"] == 403
    assert rig.store.commands(sos) == []
    assert rig.store.alert(sos).status == "open"


def test_a_request_without_the_csrf_token_is_refused(alice, sos, rig) -> None:
    answer = page_fetch(alice, "POST", f"/api/alerts/{sos}/ack", {}, csrf=False)
    assert answer["status"] == 403 and "CSRF" in answer["body"]["error"]
    assert rig.store.commands(sos) == []


def test_acknowledge_makes_the_device_show_acknowledged(alice, sos, token) -> None:
    select_alert(alice, sos)
    click_action(alice, "ack")
    token.wait(lambda es: any(e.kind == "feedback" and e.data["state"] == "acknowledged"
                              for e in es))
    wait_until(alice, lambda d: row(d, sos).get_attribute("data-status") == "acknowledged",
               what="the row to show acknowledged")


def test_close_with_a_reason_makes_the_device_show_closed(alice, sos, token, rig,
                                                          browsers) -> None:
    select_alert(alice, sos)
    Select(alice.find_element(By.CSS_SELECTOR, '#details select[name="reason"]')
           ).select_by_visible_text("Help arrived")
    click_action(alice, "close")
    token.wait(lambda es: any(e.kind == "feedback" and e.data["state"] == "closed"
                              for e in es))
    wait_until(alice, lambda d: (row(d, sos) or d.find_element(
        By.CSS_SELECTOR, f'[data-alert-id="{sos}"]')).get_attribute("data-status") == "closed",
        what="the alert to show closed")
    record = rig.store.alert(sos)
    assert (record.status, record.closed_by) == ("closed", "alice")
    assert rig.store.commands(sos)[-1]["note"].lower().startswith("help arrived")
    browsers.screenshot(alice, "alert-closed")


def test_a_closed_alerts_video_replays(alice, sos) -> None:
    select_alert(alice, sos)
    assert alice.find_element(By.ID, "live-label").text.strip() == "Replay"
    video = wait_until(alice, lambda d: d.find_element(By.ID, "live-video"))
    wait_until(alice, lambda d: d.execute_script(
        "return arguments[0].currentTime > 0.5", video), what="the replay to play")


# -- fleet, dispatch, evidence -----------------------------------------------------------------
def open_tab(driver: WebDriver, name: str) -> None:
    driver.find_element(By.ID, f"tab-{name}").click()
    wait_until(driver, lambda d: d.find_element(By.ID, f"panel-{name}").is_displayed(),
               what=f"the {name} tab")


def test_the_fleet_view_shows_the_token_online_with_its_battery_and_firmware(
        alice, token, browsers) -> None:
    open_tab(alice, "fleet")
    line = wait_until(alice, lambda d: d.find_element(
        By.CSS_SELECTOR, f'tr[data-device-id="{TOKEN}"]'), what="the token's row")
    assert line.get_attribute("data-state") == "online"
    assert "90" in line.text  # the virtual token's battery, per cent
    assert "0.1.0" in line.text or "0." in line.text  # its firmware version
    browsers.screenshot(alice, "fleet")
    open_tab(alice, "alerts")


def applied(rig: ConsoleRig, kind: str) -> bool:
    """The token applied a dispatch command of this kind (calls are about no alert)."""
    return any(c["type"] == kind and c["status"] == "applied" and c["operator"] == "alice"
               for c in rig.store.commands(""))


def test_dispatch_starts_and_ends_a_call_on_the_token(alice, token, rig, browsers) -> None:
    open_tab(alice, "dispatch")
    Select(alice.find_element(By.ID, "dispatch-device")).select_by_value(TOKEN)
    alice.find_element(By.ID, "dispatch-call-id").send_keys("call-77")
    alice.find_element(By.CSS_SELECTOR, '#dispatch-form button[data-action="call_start"]').click()
    result = wait_until(alice, lambda d: d.find_element(By.ID, "dispatch-result").text.strip()
                        or d.find_element(By.ID, "dispatch-error").text.strip(),
                        what="the dispatch's result line")
    assert "delivered" in result.lower(), result
    rig.wait_for(lambda: applied(rig, "call_start"), timeout=20)
    alice.find_element(By.CSS_SELECTOR, '#dispatch-form button[data-action="call_end"]').click()
    rig.wait_for(lambda: applied(rig, "call_end"), timeout=20)
    assert "call-77" in alice.find_element(By.ID, "dispatch-history").text
    browsers.screenshot(alice, "dispatch")
    audit = (rig.config.audit_log).read_text()
    assert '"event":"console_dispatch"' in audit.replace(" ", "") and '"alice"' in audit
    open_tab(alice, "alerts")


def test_an_operator_may_see_evidence_but_not_export_it(alice, evidence) -> None:
    open_tab(alice, "evidence")
    call = wait_until(alice, lambda d: d.find_element(
        By.CSS_SELECTOR, f'section[data-device-id="{EVIDENCE_DEVICE}"] '
                         f'tr[data-call-id="{evidence}"]'), what="the call's row")
    assert not call.find_element(By.CSS_SELECTOR, 'button[data-action="export"]').is_enabled()
    open_tab(alice, "alerts")


def test_an_auditor_exports_a_verified_call_and_the_audit_log_names_her(
        evidence, browsers, rig) -> None:
    audrey = browsers.new("audrey")
    open_tab(audrey, "evidence")
    section = wait_until(audrey, lambda d: d.find_element(
        By.CSS_SELECTOR, f'section[data-device-id="{EVIDENCE_DEVICE}"]'), what="the device")
    assert "VERIFIED" in section.text.upper()
    section.find_element(By.CSS_SELECTOR, f'tr[data-call-id="{evidence}"] '
                                          'button[data-action="export"]').click()
    links = wait_until(audrey, lambda d: d.find_elements(By.CSS_SELECTOR, ".export-result a"),
                       what="the export's download links")
    names = {link.text.strip() for link in links}
    assert any(name.endswith(".ts") for name in names), names
    browsers.screenshot(audrey, "evidence")
    events = [line for line in rig.config.audit_log.read_text().splitlines()
              if '"audrey"' in line]
    assert any("console_evidence_view" in line for line in events)
    assert any("console_evidence_export" in line and evidence in line for line in events)
    (stored,) = rig.store.exports()
    assert (stored["operator"], stored["call_id"], stored["verified"]) == ("audrey", evidence, 1)


def test_a_supervisor_takes_over_an_alert_from_its_holder(alice, token, rig, browsers) -> None:
    """A second SOS: a supervisor's open page selects it by itself, and takes it from alice."""
    sam = browsers.new("sam")
    known = {a.alert_id for a in rig.store.alerts(open_only=False)}
    token.press(2.0)
    rig.wait_for(lambda: {a.alert_id for a in rig.store.alerts()} - known)
    (second,) = {a.alert_id for a in rig.store.alerts()} - known
    wait_until(sam, lambda d: d.execute_script(
        "return window.sosConsole.selected() === arguments[0]", second),
        what="the supervisor's page to select the new SOS by itself")
    select_alert(alice, second)
    click_action(alice, "claim")
    takeover = wait_until(sam, lambda d: next(
        (b for b in d.find_elements(By.CSS_SELECTOR, '#details button[data-action="takeover"]')
         if b.is_displayed()), None), what="the Take over button")
    assert "alice" in takeover.text
    takeover.click()
    wait_until(sam, lambda d: row(d, second).get_attribute("data-claimed-by") == "sam",
               what="sam to hold the alert")
    assert rig.store.alert(second).claimed_by == "sam"
    Select(sam.find_element(By.CSS_SELECTOR, '#details select[name="reason"]')
           ).select_by_visible_text("Help arrived")
    click_action(sam, "close")
    rig.wait_for(lambda: rig.store.alert(second).status == "closed")

def test_no_page_broke_a_content_security_policy_rule(browsers) -> None:
    """Every page the tests opened ran under the console's strict CSP without a violation."""
    violations = [entry["message"] for driver in browsers.open
                  for entry in driver.get_log("browser")
                  if "Content Security Policy" in entry["message"]]
    assert violations == []
