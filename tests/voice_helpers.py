"""What the voice tests share: the operator's page as the tests open it, a wait for what nobody
announces, the alert's voice events, and the operator's click on the call button."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from simulator.browser import chromium, log_in, wait_until
from simulator.console_rig import PASSWORD, ConsoleRig

# The operator wears a headset: the page's call audio is muted, so Chromium's echo canceller
# gets no far-end signal and does not take the operator's voice for an echo to suppress while
# the caller talks (headless Chromium has no acoustic path; seen: r 0.62-0.76 without this).
# What the page receives is recorded from the call's stream itself, muted or not.
HEADSET = """document.getElementById("voice-audio").muted = true;"""


def operator_page(rig: ConsoleRig, profile: Path, microphone_wav: Path) -> WebDriver:
    """alice's console in headless Chromium, its microphone playing `microphone_wav`, loaded
    and wearing a headset."""
    driver = chromium(rig.cert_file, profile, microphone_wav=microphone_wav)
    log_in(driver, rig.url, "alice", PASSWORD)
    wait_until(driver, lambda d: d.execute_script("return window.sosConsole.ready"))
    driver.execute_script(HEADSET)
    return driver


def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """For what nobody announces (a WAV growing, a page's recording): looked at every 0.1 s,
    as a person checking would, until it holds or `timeout` passes."""
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s: {what}"
        pause.wait(0.1)


def voice_events(rig: ConsoleRig, alert_id: str, state: str | None = None) -> list[dict]:
    return [e for e in rig.store.voice_events(alert_id)
            if state is None or e.get("voice_state") == state]


def click_talk(driver: WebDriver, alert_id: str) -> str:
    """Select the alert and click its voice button, as the operator does; the button's label."""
    driver.execute_script("window.sosConsole.select(arguments[0])", alert_id)
    button = driver.find_element(By.ID, "voice-start")
    wait_until(driver, lambda d: button.is_displayed() and button.is_enabled())
    label = button.text
    button.click()
    return label
