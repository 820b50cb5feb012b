"""The voice call, end to end: a virtual pillar running the real firmware (aiortc, its
microphone playing an espeak-ng voice, its speaker written to a WAV), the real centre and
Mosquitto, and the operator's console in real headless Chromium whose microphone plays another
voice (Chromium's fake capture device).

Both ends record what they receive, and the tests check that the other side's speech arrived:
the energy envelope of what was received follows what was sent (correlation >= 0.8 after
alignment, simulator/audio_compare.py). One pillar SOS runs through the module in the order the
citizen and the operator meet it: nobody answers yet, so the spoken message plays; the operator
answers in one click; each hears the other; the operator's page reloads and rejoins; the close
ends the call. A token's SOS is then listened in on, without a sound from the token.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from firmware.voice.device_voice import BUILT_IN_MESSAGE
from simulator.audio_compare import JITTER_DRIFT_S, aligned_correlation, read_wav
from simulator.broker import PrivateBroker
from simulator.browser import is_blank, wait_until
from simulator.console_rig import ConsoleRig
from simulator.voice_media import VoiceClip, citizen_wav, operator_wav
from simulator.voice_probe import RATE, read_tap, start_tap
from tests.helpers import Device
from tests.voice_helpers import HEADSET, operator_page
from tests.voice_helpers import click_talk as _click_talk
from tests.voice_helpers import until as _until
from tests.voice_helpers import voice_events as _voice_events

pytestmark = pytest.mark.skipif(
    not (shutil.which("chromedriver") and shutil.which("espeak-ng")),
    reason="needs Debian's chromium-driver and espeak-ng (make sysdeps)")

PILLAR = "pil-voice-01"
TOKEN = "tok-voice-01"
ANSWER_WITHIN_S = 1.0  # the spoken message plays this soon after the alert is delivered
HEARD = 0.8  # the bar: the received envelope follows the sent one at least this well
LISTEN_S = 6.0  # how much of the call each side records


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("voice")


@pytest.fixture(scope="module")
def citizen(workdir: Path) -> VoiceClip:
    return citizen_wav(workdir / "clips")


@pytest.fixture(scope="module")
def operator_voice(workdir: Path) -> VoiceClip:
    return operator_wav(workdir / "clips")


@pytest.fixture(scope="module")
def rig(workdir: Path) -> Iterator[ConsoleRig]:
    with PrivateBroker(workdir / "broker") as broker:
        running = ConsoleRig(workdir / "centre", broker)
        running.start()
        yield running
        running.stop()


def _device(rig: ConsoleRig, workdir: Path, device_id: str, profile: str,
            clip: VoiceClip) -> Device:
    (workdir / "devices").mkdir(exist_ok=True)
    device = Device(rig.broker, workdir / "devices", device_id, profile=profile,
                    microphone_wav=clip.path,
                    voice={"answer_within_s": ANSWER_WITHIN_S, "message_every_s": 60})
    device.start()
    device.wait_kind("link", up=True)
    rig.wait_for(lambda: rig.store.device(device_id) is not None)
    return device


@pytest.fixture(scope="module")
def pillar(rig: ConsoleRig, workdir: Path, citizen: VoiceClip) -> Iterator[Device]:
    device = _device(rig, workdir, PILLAR, "pillar", citizen)
    yield device
    device.close()


@pytest.fixture(scope="module")
def alice(rig: ConsoleRig, workdir: Path, operator_voice: VoiceClip) -> Iterator[WebDriver]:
    driver = operator_page(rig, workdir / "profile-alice", operator_voice.path)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def sos(rig: ConsoleRig, pillar: Device) -> str:
    pillar.press(0.4)
    alert_id = rig.wait_for(lambda: next(iter(rig.store.alerts()), None)).alert_id
    pillar.wait_kind("feedback", state="delivered")
    return alert_id


def screenshot(driver: WebDriver, workdir: Path, name: str) -> None:
    """Keep the page as the test saw it (refused if blank); also in $SOS_CONSOLE_SCREENSHOTS."""
    png = driver.get_screenshot_as_png()
    assert not is_blank(png), f"the {name} page rendered blank"
    (workdir / f"{name}.png").write_bytes(png)
    target = os.environ.get("SOS_CONSOLE_SCREENSHOTS")
    if target:
        (Path(target) / f"console-{name}.png").write_bytes(png)


def _connected(driver: WebDriver) -> bool:
    return driver.execute_script("return window.sosConsole.voice.state") == "connected"


def test_with_no_operator_on_the_line_the_caller_hears_the_spoken_message(
        rig: ConsoleRig, pillar: Device, sos: str) -> None:
    _until(lambda: pillar.speaker.exists() and pillar.speaker.stat().st_size > RATE * 2 * 4,
           20, "the spoken message on the pillar's speaker")
    played = read_wav(pillar.speaker)
    message = read_wav(BUILT_IN_MESSAGE)
    assert aligned_correlation(message, played, RATE).correlation >= HEARD


def test_the_operator_answers_in_one_click_and_the_call_connects(
        rig: ConsoleRig, pillar: Device, alice: WebDriver, sos: str, workdir: Path) -> None:
    assert _click_talk(alice, sos) == "Talk to the caller"
    wait_until(alice, _connected, what="the voice call to connect")
    rig.wait_for(lambda: _voice_events(rig, sos, "connected"))
    status = alice.find_element(By.ID, "voice-status").text
    assert status == "Talking with the caller"
    assert rig.store.alert(sos).claimed_by == "alice"  # answering took the alert
    screenshot(alice, workdir, "voice-connected")


def test_the_operator_hears_the_caller(alice: WebDriver, citizen: VoiceClip, sos: str,
                                       rig: ConsoleRig) -> None:
    start_tap(alice, "remote")
    _until(lambda: len(read_tap(alice, "remote").samples) > LISTEN_S * RATE, LISTEN_S + 10,
           "the page to record the call")
    heard = read_tap(alice, "remote").samples
    match = aligned_correlation(read_wav(citizen.path), heard, RATE, looped=True,
                                drift_s=JITTER_DRIFT_S)
    assert match.correlation >= HEARD


def test_the_caller_hears_the_operator(pillar: Device, alice: WebDriver,
                                       operator_voice: VoiceClip, rig: ConsoleRig,
                                       sos: str) -> None:
    connected_at = _voice_events(rig, sos, "connected")[0]["stored_at"]
    played = read_wav(pillar.speaker)
    _until(lambda: len(read_wav(pillar.speaker)) > len(played) + LISTEN_S * RATE,
           LISTEN_S + 10, "the pillar's speaker to play the call")
    since_call = read_wav(pillar.speaker)[len(played) - RATE:]  # the message, if any, is older
    match = aligned_correlation(read_wav(operator_voice.path), since_call, RATE, looped=True,
                                drift_s=JITTER_DRIFT_S)
    assert match.correlation >= HEARD, f"connected at {connected_at}"


def test_a_reloaded_page_rejoins_the_call_and_the_alert_stays_open(
        rig: ConsoleRig, alice: WebDriver, sos: str) -> None:
    sessions_before = {e["voice_session"] for e in _voice_events(rig, sos, "connected")}
    alice.refresh()
    wait_until(alice, lambda d: d.execute_script("return window.sosConsole.ready"))
    alice.execute_script(HEADSET)
    wait_until(alice, _connected, what="the call to be offered again after the reload")
    rig.wait_for(lambda: {e["voice_session"] for e in _voice_events(rig, sos, "connected")}
                 - sessions_before)
    assert rig.store.alert(sos).status == "open"


def test_closing_the_alert_ends_the_call(rig: ConsoleRig, pillar: Device, alice: WebDriver,
                                         sos: str) -> None:
    alice.execute_script("window.sosConsole.select(arguments[0])", sos)
    alice.find_element(By.ID, "close-note").send_keys("caller safe, ambulance on scene")
    alice.find_element(By.CSS_SELECTOR, '#close-form button[type="submit"]').click()
    rig.wait_for(lambda: rig.store.alert(sos).status == "closed")
    rig.wait_for(lambda: _voice_events(rig, sos, "ended"))
    wait_until(alice, lambda d: d.execute_script("return window.sosConsole.voice.state")
               == "idle")


@pytest.fixture(scope="module")
def token(rig: ConsoleRig, workdir: Path, citizen: VoiceClip) -> Iterator[Device]:
    device = _device(rig, workdir, TOKEN, "token", citizen)
    yield device
    device.close()


@pytest.fixture(scope="module")
def token_sos(rig: ConsoleRig, token: Device) -> str:
    token.press(1.8)
    alert = rig.wait_for(lambda: next((a for a in rig.store.alerts()
                                        if a.device_id == TOKEN), None))
    token.wait_kind("feedback", state="delivered")
    return alert.alert_id


def test_the_operator_listens_in_on_a_token_and_hears_its_microphone(
        rig: ConsoleRig, alice: WebDriver, token_sos: str, citizen: VoiceClip) -> None:
    assert _click_talk(alice, token_sos) == "Listen in"
    wait_until(alice, _connected, what="the listen-in to connect")
    assert alice.find_element(By.ID, "voice-status").text == \
        "Listening to the device's microphone"
    start_tap(alice, "remote")
    _until(lambda: len(read_tap(alice, "remote").samples) > LISTEN_S * RATE, LISTEN_S + 10,
           "the page to record the token")
    heard = read_tap(alice, "remote").samples
    assert aligned_correlation(read_wav(citizen.path), heard, RATE,
                               looped=True, drift_s=JITTER_DRIFT_S).correlation >= HEARD


def test_the_token_plays_nothing_to_the_paramedic(token: Device, token_sos: str) -> None:
    assert not token.speaker.exists()  # listen-in: no speaker is even opened
