"""The operator on duty answering a pillar's SOS by voice, as `sos-sim run` plays it (issue 15):
a second headless Chromium logged in to the run's console as an operator, its microphone
Chromium's fake capture device playing the operator's espeak-ng clip (simulator/voice_media.py).

As soon as a pillar's alert row is in its page, it selects the alert and clicks "Talk to the
caller" (which takes the alert, as in the console), waits for the call to connect, lets SETTLE_S
pass, then listens for LISTEN_S: to what its page receives (the call's remote stream,
simulator/voice_probe.py) and to what the pillar's speaker played (the device's
data_dir/speaker.wav) over the same seconds. Each is compared with the other side's clip
(simulator/audio_compare.py: the energy envelopes after alignment), so the figures say whether
speech arrived both ways, not that a call object exists.

Like the ConsoleWatcher, a single worker thread owns the browser after `open()`; Chromium,
chromedriver or Selenium missing is not an error: `why_not` says why there are no figures.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.console_watch import why_not_here

USER = "duty"  # the answering browser's own account: the person's `operator` stays free
ROLE = "operator"  # it acts: answering a call takes the alert
CONNECT_WITHIN_S = 20.0  # from the row being in the page to the call connected, at most
# Not measured: the call's first second, while the browser's gain control on the operator's
# microphone (console.js asks for it) settles: what the caller hears then is up to twice as loud.
SETTLE_S = 1.0
LISTEN_S = 5.0  # how long each side of the call is recorded, after SETTLE_S
HEARD = 0.8  # the bar: the received envelope follows the sent one at least this well
# What answering one call may take beyond the scenario's own duration (a run waits this much
# longer for its alerts to close while a call is being measured).
# The operator on duty wears a headset: the page's call audio is not played into the room (the
# recording of the call, voice_probe's tap, is what the operator hears). So the browser's echo
# canceller has no loudspeaker sound to remove from the microphone; played, the caller's voice
# (which talks all the time, in the same rhythm as the operator's clip) makes it cut syllables
# of the operator's for seconds as if they were an echo.
MUTE_CALL_AUDIO = 'document.getElementById("voice-audio").muted = true;'
ALLOWANCE_S = CONNECT_WITHIN_S + SETTLE_S + LISTEN_S + 15.0


@dataclass
class VoiceAnswer:
    """One answered call. Epoch ms from the answering page's clock (the watcher's and the
    runner's are the same machine's); correlations None when that side was not measured."""

    alert_id: str
    clicked_at_ms: float | None = None
    connected_at_ms: float | None = None
    operator_heard_caller_r: float | None = None
    caller_heard_operator_r: float | None = None
    # What the page's jitter buffer did to the caller's sound while it was being listened to
    # (WebRTC's inbound-rtp statistics, ms of audio): sound made up for lost or late packets,
    # and sound cut or stretched to follow the sender's pace. Each time-warps what the operator
    # hears against what the caller said, which lowers operator_heard_caller_r.
    operator_receive: dict[str, float] | None = None
    error: str | None = None  # what went wrong, if anything


class VoiceAnswerer:
    """`open()` once (blocking: seconds), `answer()` each pillar alert as the centre stores it
    (any thread; a `threading.Event` is returned, set once the call was measured or given up),
    `answers()` at the end, then `close()`."""

    def __init__(self, url: str, cert_file: Path, profile_dir: Path, user: str, password: str,
                 *, operator_clip: Path, caller_clip: Path, keep_dir: Path | None = None,
                 on_step: Callable[[str, str, dict[str, Any]], None] | None = None) -> None:
        """`operator_clip`: the WAV the browser's microphone plays; `caller_clip`: what the
        pillar's microphone plays (what the operator should hear). `on_step(alert_id, kind,
        data)` is called from the worker as the call goes: "answered", "connected", "heard"
        and "failed". `keep_dir`: where to keep what each side heard, as WAVs
        (<alert>-operator-heard.wav, <alert>-caller-heard.wav), for a person to listen to."""
        self.url = url
        self.cert_file = cert_file
        self.profile_dir = profile_dir
        self.user = user
        self._password = password
        self.operator_clip = operator_clip.resolve()
        self.caller_clip = caller_clip.resolve()
        self.keep_dir = keep_dir
        self._on_step = on_step
        self.browser: str | None = None
        self.why_not: str | None = "not opened"
        self._driver: Any = None
        self._queue: queue.Queue[tuple[str, Path | None, threading.Event] | None] = queue.Queue()
        self._answers: dict[str, VoiceAnswer] = {}
        self._done: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._driver is not None

    def open(self) -> None:
        """Start Chromium with the fake microphone and log in; failures go to `why_not`."""
        reason = why_not_here()
        if reason is not None:
            self.why_not = reason
            return
        from simulator.browser import chromium, log_in

        driver = None
        try:
            driver = chromium(self.cert_file, self.profile_dir, microphone_wav=self.operator_clip)
            log_in(driver, self.url, self.user, self._password)
            driver.execute_script(MUTE_CALL_AUDIO)
        except Exception as exc:  # WebDriverException, OSError, ...: figures lost, not the run
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.why_not = f"the console did not open in Chromium: {first}"
            if driver is not None:
                with contextlib.suppress(Exception):
                    driver.quit()
            return
        self.browser = f"Chromium {driver.capabilities.get('browserVersion', '?')}"
        self.why_not = None
        self._driver = driver
        self._worker = threading.Thread(target=self._work, name="voice-answerer", daemon=True)
        self._worker.start()

    def answer(self, alert_id: str, speaker_wav: Path | None) -> threading.Event:
        """Answer this alert's call (its device's speaker writes `speaker_wav`; None: the
        caller's side is not measured). The event is set when the call has been measured,
        given up, or was never to be answered (not active)."""
        with self._lock:
            done = self._done.get(alert_id)
            if done is not None:
                return done
            done = self._done[alert_id] = threading.Event()
            if not self.active or self._stopping.is_set():
                done.set()
                return done
            self._answers[alert_id] = VoiceAnswer(alert_id)
        self._queue.put((alert_id, speaker_wav, done))
        return done

    def answers(self, timeout: float) -> dict[str, VoiceAnswer]:
        """Every call asked for, once measured (waiting at most `timeout` in all)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._done.values())
        for done in pending:
            done.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return dict(self._answers)

    def close(self) -> None:
        """Stop the worker (it gives up any wait) and quit the browser."""
        self._stopping.set()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(30)
        if self._driver is not None:
            with contextlib.suppress(Exception):
                self._driver.quit()
            self._driver = None
        with self._lock:
            for done in self._done.values():
                done.set()

    # -- the worker thread -----------------------------------------------------------------------
    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            alert_id, speaker_wav, done = item
            answer = self._answers[alert_id]
            try:
                self._call(answer, speaker_wav)
            except Exception as exc:  # Selenium's, a WAV cut mid-header...: a figure lost
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                answer.error = answer.error or first
            finally:
                if answer.error is not None:
                    self._step(alert_id, "failed", error=answer.error)
                done.set()

    def _step(self, alert_id: str, kind: str, **data: Any) -> None:
        if self._on_step is not None:
            self._on_step(alert_id, kind, data)

    def _call(self, answer: VoiceAnswer, speaker_wav: Path | None) -> None:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.common.by import By

        from simulator.audio_compare import JITTER_DRIFT_S, aligned_correlation, read_wav
        from simulator.browser import wait_until
        from simulator.voice_probe import RATE, read_tap, start_tap

        driver, alert_id = self._driver, answer.alert_id
        deadline = time.time() + CONNECT_WITHIN_S

        def left() -> float:
            return max(0.1, deadline - time.time())

        def row_shown(d: Any) -> bool:
            return self._stopping.is_set() or bool(d.execute_script(
                "const c = window.sosConsole;"
                "return !!(c && c.rowShownAt && c.rowShownAt[arguments[0]]);", alert_id))

        try:
            wait_until(driver, row_shown, timeout=left(), what=f"the row of {alert_id[:8]}")
            if self._stopping.is_set():
                answer.error = "the run stopped first"
                return
            driver.execute_script("window.sosConsole.select(arguments[0])", alert_id)
            button = driver.find_element(By.ID, "voice-start")
            wait_until(driver, lambda d: self._stopping.is_set()
                       or (button.is_displayed() and button.is_enabled()), timeout=left(),
                       what="the voice button")
            label = button.text
            button.click()
            answer.clicked_at_ms = driver.execute_script(
                "return window.sosConsole.voice.offeredAt")
            self._step(alert_id, "answered", label=label, clicked_at_ms=answer.clicked_at_ms)

            def connected(d: Any) -> Any:
                if self._stopping.is_set():
                    return True
                v = d.execute_script("const v = window.sosConsole.voice;"
                                     "return [v.state, v.connectedAt, v.error];")
                if v[0] == "failed":
                    raise RuntimeError(v[2] or "the call failed")
                return v[1] if v[0] == "connected" else None

            connected_at = wait_until(driver, connected, timeout=left(),
                                      what="the voice call to connect")
        except TimeoutException as exc:
            answer.error = exc.msg or "timed out"
            return
        if self._stopping.is_set():
            answer.error = "the run stopped first"
            return
        answer.connected_at_ms = float(connected_at)
        self._step(alert_id, "connected", connected_at_ms=answer.connected_at_ms)
        if self._stopping.wait(SETTLE_S):
            answer.error = "the run stopped first"
            return

        played_before = _samples(speaker_wav, read_wav)  # the settling time (and any message)
        start_tap(driver, "remote")
        receive_before = _receive_stats(driver)
        self._stopping.wait(LISTEN_S)
        until = time.monotonic() + LISTEN_S + 5.0  # the page's recorder and the file may lag
        heard = read_tap(driver, "remote").samples
        while len(heard) < LISTEN_S * RATE and time.monotonic() < until \
                and not self._stopping.wait(0.25):
            heard = read_tap(driver, "remote").samples
        heard = heard[:round(LISTEN_S * RATE)]
        receive_after = _receive_stats(driver)
        if receive_before is not None and receive_after is not None:
            answer.operator_receive = {
                f"{key}_ms": round((receive_after[key] - receive_before[key]) / RATE * 1000, 1)
                for key in receive_after}
        self._keep(alert_id, "operator-heard", heard)
        if len(heard) >= RATE:  # a second of it at least, or nothing is worth comparing
            answer.operator_heard_caller_r = round(aligned_correlation(
                read_wav(self.caller_clip), heard, RATE, looped=True,
                drift_s=JITTER_DRIFT_S).correlation, 3)
        if speaker_wav is not None:
            before = len(played_before) if played_before is not None else 0
            played = _samples(speaker_wav, read_wav)
            while (played is None or len(played) < before + LISTEN_S * RATE) \
                    and time.monotonic() < until and not self._stopping.wait(0.25):
                played = _samples(speaker_wav, read_wav)
            if played is not None:  # the same LISTEN_S as the page's recording
                listened = played[before:before + round(LISTEN_S * RATE)]
                self._keep(alert_id, "caller-heard", listened)
                if len(listened) >= RATE:
                    answer.caller_heard_operator_r = round(aligned_correlation(
                        read_wav(self.operator_clip), listened, RATE,
                        looped=True, drift_s=JITTER_DRIFT_S).correlation, 3)
        self._step(alert_id, "heard", operator_heard_caller_r=answer.operator_heard_caller_r,
                   caller_heard_operator_r=answer.caller_heard_operator_r)


    def _keep(self, alert_id: str, what: str, samples: Any) -> None:
        if self.keep_dir is None or not len(samples):
            return
        from simulator.voice_media import write_wav
        from simulator.voice_probe import RATE

        write_wav(self.keep_dir / f"{alert_id[:8]}-{what}.wav", samples, RATE)


_RECEIVE_STATS = """
const done = arguments[0];
const pc = window.sosConsole.voice.pc;
if (!pc) { done(null); return; }
pc.getStats().then((report) => {
  let found = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      found = {concealed: s.concealedSamples || 0,
               removed: s.removedSamplesForAcceleration || 0,
               inserted: s.insertedSamplesForDeceleration || 0};
    }
  });
  done(found);
}).catch(() => done(null));
"""


def _receive_stats(driver: Any) -> dict[str, float] | None:
    """The call's inbound audio counters (samples at 48 kHz), None if there are none."""
    found = driver.execute_async_script(_RECEIVE_STATS)
    return {k: float(v) for k, v in found.items()} if isinstance(found, dict) else None


def _samples(path: Path | None, read_wav: Callable[[Path], Any]) -> Any:
    """The WAV's samples so far (its header is rewritten after each write), None if there is
    none yet."""
    if path is None or not path.exists():
        return None
    try:
        return read_wav(path)
    except (EOFError, ValueError, OSError):  # caught between a write and its header
        return None
