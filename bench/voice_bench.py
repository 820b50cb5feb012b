"""Voice call: press -> voice connected, and mouth-to-ear latency both ways (issue 15).

`python -m bench.voice_bench [PRESSES]` (default 5) starts a private Mosquitto (mutual TLS),
the centre with its console over HTTPS (simulator.console_rig, as `sos-center serve` runs
them), a virtual pillar process (the real firmware: aiortc, its microphone playing the
citizen's clip in a loop, its speaker written to data_dir/speaker.wav with the play times
beside it) and Debian's headless Chromium logged in as an operator, whose fake microphone
plays the operator's clip in a loop (simulator.voice_media: 10 s clips, a 30 ms tone marker
every 2 s, 2.0 kHz from the citizen, 2.5 kHz from the operator). Then PRESSES times:

  press -> connected    the page is already open and answers at once: a loop in the page
                        (every 2 ms) waits for the new alert's row, selects it and clicks the
                        page's own "Talk to the caller" button. From the pillar's trigger
                        (its "trigger" event: the button logic recognised the press; also
                        from the first contact, its "button" event) to the page's
                        `sosConsole.voice.connectedAt` (RTCPeerConnection "connected").
  device -> browser     the citizen's markers: sent at the microphone's start wall time
                        (the process's "microphone" event: chunk 0's `utc`) + their place in
                        the looped clip; received where simulator.voice_probe's tap of the
                        page's remote stream has them (Tapped.first_unix + offset).
  browser -> device     the operator's markers: sent where the tap of the page's local
                        (microphone) stream has them; received where the pillar's
                        speaker.wav has them, its sample index turned into wall time by
                        speaker.times.jsonl ({"sample", "unix_s"} per play() call).

Each call is listened to for LISTEN_S (three markers each way), then the alert is closed
(POST /api/alerts/{id}/close from the page) and the pillar shows "closed" before the next
press. Before the browser starts, a floor: the same citizen clip from one aiortc peer to
another over loopback in this process (Opus, aiortc's jitter buffer; no centre, no browser),
paced and timed as the pillar's microphone is.

Everything runs on one machine and one clock. Targets (issue 15, in the simulator):
connected within 2 s p95 of the press; mouth-to-ear within 400 ms (p95, each way).

Systematic error of the method (see METHOD in the table):
- the page's taps: `first_unix` is the MediaRecorder's 'start' event (page clock, epoch ms),
  not the capture time of sample 0 (the recorder's 250 ms timeslice only decides when data is
  handed back). Measured, not assumed: browser -> device comes out below what aiortc's
  receiver alone holds (4 packets = 80 ms, the floor line), so the taps' times are late by
  some e of tens of ms (Chromium's recorder encodes 60 ms Opus frames). Both taps start
  together in one page, so e is the same for both: it lengthens device -> browser and
  shortens browser -> device by e, and their sum (the round trip, in the notes) is free
  of it.
- the pillar's speaker is a WAV file: "heard" is the moment aiortc's receiver hands the frame
  to the sink (a Pi's ALSA buffer would add its own 20-40 ms), and the sidecar time is taken
  per play() call (one 20 ms frame), the samples within it spaced at 48 kHz from there.
- the browser's "ear" is the tap of the remote stream, before the page's <audio> element
  and the audio output (headless: no sound card; a real one adds 10-40 ms).
- the microphone's "mouth" is the instant the sample was captured (chunk 0's utc + its
  index / 48 kHz): the 20 ms a microphone block takes to fill counts as latency, as it would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from simulator.audio_compare import envelope, find_markers, latencies, read_wav
from simulator.broker import PrivateBroker
from simulator.device_config import render_device_toml
from simulator.processes import DeviceProcess, Recorder

from .report import _finite, _row
from .stats import Summary, summarise

CONNECT_TARGET_MS = 2000.0
MOUTH_TO_EAR_TARGET_MS = 400.0
PRESSES = 5
PILLAR = "bench-voice-pil-01"
SURVEYED = {"lat": 52.37888, "lon": 4.90030, "accuracy_m": 1.0}
TIMEOUT_S = 20.0
LISTEN_S = 6.5  # per call: three markers each way (2 s apart)
FLOOR_S = 8.0  # the aiortc loopback floor: four markers
RATE = 48_000
# The spoken message would play on the speaker if nobody answered within answer_within_s:
# later than any call here, so the speaker carries the operator only.
VOICE = {"answer_within_s": 60, "message_every_s": 60}

log = logging.getLogger("bench.voice")


class VoiceBenchError(RuntimeError):
    pass


@dataclass
class VoiceReport:
    """The "voice" section: press -> connected and mouth-to-ear both ways, beside targets."""

    presses: int
    connect_target_ms: float = CONNECT_TARGET_MS
    m2e_target_ms: float = MOUTH_TO_EAR_TARGET_MS
    connect: Summary | None = None  # trigger recognised -> connected (the verdict's)
    breakdown: list[Summary] = field(default_factory=list)
    device_to_browser: Summary | None = None
    browser_to_device: Summary | None = None
    floor: Summary | None = None
    extra: list[Summary] = field(default_factory=list)  # the other method of each direction
    notes: list[str] = field(default_factory=list)
    why_not: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def _met(self, s: Summary | None, target: float) -> bool:
        return s is not None and s.n > 0 and s.p95_ms <= target

    @property
    def target_met(self) -> bool:
        return (not self.errors and self._met(self.connect, self.connect_target_ms)
                and self._met(self.device_to_browser, self.m2e_target_ms)
                and self._met(self.browser_to_device, self.m2e_target_ms))

    def verdict(self) -> str:
        if self.why_not:
            return f"voice: not measured: {self.why_not}"
        parts = []
        for name, s, target in (
                ("press -> connected", self.connect, self.connect_target_ms),
                ("device -> browser", self.device_to_browser, self.m2e_target_ms),
                ("browser -> device", self.browser_to_device, self.m2e_target_ms)):
            if s is None or not s.n:
                parts.append(f"{name}: not measured (target p95 <= {target:g} ms)")
            else:
                parts.append(f"{name} p95 {s.p95_ms:.0f} ms (target <= {target:g}) -> "
                             f"{'MET' if self._met(s, target) else 'MISSED'}")
        line = "; ".join(parts)
        return f"{line} -> INCOMPLETE RUN" if self.errors else line

    def lines(self) -> list[Summary]:
        return [s for s in (self.connect, *self.breakdown, self.device_to_browser,
                            self.browser_to_device, *self.extra, self.floor) if s is not None]

    def as_dict(self) -> dict[str, Any]:
        return _finite({
            "context": self.context | {"presses": self.presses},
            "why_not": self.why_not,
            "lines": [s.as_dict() for s in self.lines()],
            "notes": self.notes,
            "verdict": {"connect_target_ms": self.connect_target_ms,
                        "mouth_to_ear_target_ms": self.m2e_target_ms,
                        "met": self.target_met, "text": self.verdict()},
            "errors": self.errors,
        })

    def as_table(self) -> str:
        if self.why_not:
            return self.verdict()
        c = self.context
        out = [f"voice call in {c.get('browser', 'headless Chromium')} (headless) with a "
               "virtual pillar process (real firmware, aiortc), signalled through the centre "
               "over one private Mosquitto (mutual TLS); the page open and logged in, "
               "answering at once (a loop in the page clicks Talk when the row appears); "
               f"{self.presses} presses, {c.get('listen_s', LISTEN_S)} s of each call "
               "listened to",
               "mouth-to-ear: 30 ms tone markers every 2 s in the looped clips (2.0 kHz "
               "citizen, 2.5 kHz operator), found in what each side recorded; browser, "
               f"centre and device on one machine and one clock; {c.get('cpus', '?')} CPU(s)",
               ""]
        rows = self.lines()
        if rows:
            label_w = max(len(s.label) for s in rows) + 2
            out.append(f"{'':{label_w}}{'n':>5}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  (ms)")
            for s in rows:
                target = ""
                if s is self.connect:
                    target = f"   target p95 <= {self.connect_target_ms:g}"
                elif s in (self.device_to_browser, self.browser_to_device):
                    target = f"   target p95 <= {self.m2e_target_ms:g}"
                out.append(_row(s, label_w) + target)
            out.append(f"{'floor: press -> connected':{label_w}}  n/a (no voice call without "
                       "the centre's signalling; the SOS section's trigger -> stored is its "
                       "first part)")
        out += [""] + [f"note: {n}" for n in self.notes]
        out += [f"ERROR: {e}" for e in self.errors] + [self.verdict()]
        return "\n".join(out)


# -- the page ----------------------------------------------------------------------------------

_WATCH = """
const deviceId = arguments[0];
const c = window.sosConsole;
const now = () => performance.timeOrigin + performance.now();
const known = new Set(Object.keys(c.state.alerts));
const w = {alertId: null, seenAt: null, clickedAt: null, error: null};
window.benchVoice = w;
const look = () => {
  if (window.benchVoice !== w) return;
  for (const [id, a] of Object.entries(c.state.alerts)) {
    if (known.has(id) || a.device_id !== deviceId || a.status === "closed") continue;
    if (!c.rowShownAt[id]) continue;  // the operator answers the row on the screen
    w.alertId = id;
    w.seenAt = now();
    c.select(id);
    const button = document.getElementById("voice-start");
    if (button.disabled) { w.error = "the Talk button is disabled"; return; }
    button.click();
    w.clickedAt = now();
    return;
  }
  setTimeout(look, 2);
};
look();
return "ok";
"""

_CONNECTED = """
const [timeoutMs, done] = arguments;
const began = Date.now();
const check = () => {
  const w = window.benchVoice, c = window.sosConsole, v = c.voice;
  const base = {alertId: w.alertId, seenAt: w.seenAt, clickedAt: w.clickedAt,
                rowShownAt: w.alertId ? c.rowShownAt[w.alertId] : null,
                offeredAt: v.offeredAt, connectedAt: v.connectedAt, state: v.state,
                error: w.error || v.error || null};
  if (w.error) return done(base);
  if (w.alertId && v.alertId === w.alertId && v.connectedAt != null) return done(base);
  if (Date.now() - began > timeoutMs) return done(Object.assign(base, {timedOut: true}));
  setTimeout(check, 5);
};
check();
"""


# -- the pillar --------------------------------------------------------------------------------

@contextlib.contextmanager
def pillar_process(broker: PrivateBroker, workdir: Path,
                   microphone_wav: Path) -> Iterator[tuple[DeviceProcess, Recorder, Path]]:
    """The virtual pillar with sound as a real process, connected; (process, its events,
    its data directory)."""
    directory = workdir / PILLAR
    directory.mkdir(parents=True)
    config = directory / "device.toml"
    data_dir = directory / "data"
    config.write_text(render_device_toml(
        device_id=PILLAR, profile="pillar", data_dir=data_dir, broker=broker,
        surveyed=dict(SURVEYED), microphone_wav=microphone_wav, voice=dict(VOICE)))
    recorder = Recorder()
    process = DeviceProcess(PILLAR, config, directory / "device.log", recorder, battery=None)
    process.start()
    try:
        if not recorder.wait_for(lambda es: any(e.kind == "link" and e.data["up"]
                                                for e in es), TIMEOUT_S):
            raise VoiceBenchError(f"the pillar process never connected (log: "
                                  f"{directory / 'device.log'})")
        yield process, recorder, data_dir
    finally:
        process.stop()


def read_speaker(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(samples as floats, sidecar sample indices, their unix times) of the pillar's speaker,
    read while it is being written (a torn last line or half sample is left out)."""
    raw = (data_dir / "speaker.wav").read_bytes()[44:]
    pcm = np.frombuffer(raw[:len(raw) // 2 * 2], "<i2").astype(np.float64) / 32768.0
    starts, walls = [], []
    for line in (data_dir / "speaker.times.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            entry = json.loads(line)
            starts.append(int(entry["sample"]))
            walls.append(float(entry["unix_s"]))
    return pcm, np.asarray(starts, dtype=np.int64), np.asarray(walls)


def speaker_times(sample: np.ndarray | list[int], starts: np.ndarray,
                  walls: np.ndarray) -> list[float]:
    """Wall time a speaker sample was played: its play() call's time + its place in it."""
    out = []
    for k in sample:
        i = int(np.searchsorted(starts, k, side="right")) - 1
        if i >= 0:
            out.append(float(walls[i] + (k - starts[i]) / RATE))
    return out


def on_wall_grid(samples: np.ndarray, walls_of: Callable[[np.ndarray], np.ndarray],
                 start: float, stop: float, hop_s: float = 0.001) -> np.ndarray:
    """The 20 ms RMS envelope of `samples`, resampled onto wall times start, start + hop, ...
    (`walls_of(indices)` gives each sample index's wall time)."""
    env = envelope(samples, RATE, 0.02, hop_s)
    centres = np.arange(env.size) * round(hop_s * RATE) + round(0.01 * RATE)
    grid = np.arange(start, stop, hop_s)
    return np.interp(grid, walls_of(centres), env, left=np.nan, right=np.nan)


def envelope_lags(sent: np.ndarray, received: np.ndarray, *, piece_s: float = 2.0,
                  max_lag_s: float = 1.0, hop_s: float = 0.001,
                  min_corr: float = 0.7) -> list[float]:
    """Delay of `received` behind `sent` (both envelopes on one wall grid), in s, per
    `piece_s` piece of the sent side: the lag where the energy envelopes correlate best (when
    that is at least `min_corr`; a piece of silence or of cut speech gives nothing)."""
    out = []
    step, lags = round(piece_s / hop_s), round(max_lag_s / hop_s)
    for at in range(0, sent.size - step + 1, step):
        a = sent[at:at + step]
        if np.isnan(a).any() or a.std() == 0:
            continue
        best, best_lag = -1.0, 0
        for lag in range(lags):
            b = received[at + lag:at + lag + step]
            if b.size < step or np.isnan(b).any() or b.std() == 0:
                continue
            corr = float(np.corrcoef(a, b)[0, 1])
            if corr > best:
                best, best_lag = corr, lag
        if best >= min_corr:
            out.append(best_lag * hop_s)
    return out


def clip_samples(path: Path) -> int:
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() * RATE // wav.getframerate()


# -- the floor: aiortc to aiortc over loopback -------------------------------------------------

def aiortc_floor(clip: Any, seconds: float = FLOOR_S) -> list[float]:
    """Mouth-to-ear of the clip's markers from one aiortc peer to another over 127.0.0.1, in
    s: sent paced as the pillar's microphone (chunk n handed over at start + (n + 1) x 20 ms,
    its samples' mouth time start + index / 48 kHz), received when the receiving peer's
    track hands a frame over (as the pillar's speaker is fed)."""
    return asyncio.run(_floor(clip, seconds))


async def _floor(clip: Any, seconds: float) -> list[float]:
    import av
    from aiortc import MediaStreamTrack, RTCPeerConnection
    from aiortc.mediastreams import MediaStreamError

    from firmware.audio.pacing import loop_slice
    from firmware.audio.source import load_wav

    pcm = load_wav(clip.path)
    chunk = 960

    class Clip(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.start: float | None = None
            self.n = 0

        async def recv(self) -> av.AudioFrame:
            if self.start is None:
                self.start = time.time()
            due = self.start + (self.n + 1) * chunk / RATE
            await asyncio.sleep(max(0.0, due - time.time()))
            piece = loop_slice(pcm, self.n * chunk, chunk)
            frame = av.AudioFrame(format="s16", layout="mono", samples=chunk)
            frame.planes[0].update(piece)
            frame.sample_rate, frame.pts = RATE, self.n * chunk
            frame.time_base = Fraction(1, RATE)
            self.n += 1
            return frame

    sender, receiver = RTCPeerConnection(), RTCPeerConnection()
    track = Clip()
    sender.addTrack(track)
    pieces: list[tuple[float, bytes]] = []
    done = asyncio.Event()

    async def listen(remote: Any) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        while not done.is_set():
            try:
                frame = await remote.recv()
            except MediaStreamError:
                return
            wall = time.time()
            for out in resampler.resample(frame):
                pieces.append((wall, bytes(out.planes[0])[:out.samples * 2]))

    tasks: list[asyncio.Task[None]] = []
    receiver.on("track", lambda remote: tasks.append(asyncio.ensure_future(listen(remote))))
    try:
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)
        await asyncio.sleep(seconds)
        done.set()
    finally:
        await sender.close()
        await receiver.close()
        for task in tasks:
            task.cancel()
    if not pieces or track.start is None:
        return []
    starts = np.cumsum([0] + [len(p) // 2 for _, p in pieces[:-1]])
    walls = np.asarray([w for w, _ in pieces])
    samples = np.frombuffer(b"".join(p for _, p in pieces), "<i2").astype(np.float64) / 32768
    found = find_markers(samples, RATE, clip.marker_hz)
    received = speaker_times([round(t * RATE) for t in found], starts, walls)
    sent = clip.markers_between(track.start, time.time())
    return latencies(sent, received)


# -- the run -----------------------------------------------------------------------------------

def why_not_here() -> str | None:
    from simulator.console_watch import why_not_here as no_browser

    reason = no_browser()
    if reason:
        return reason
    if shutil.which("espeak-ng") is None:
        return "espeak-ng not installed (make sysdeps): no voices to send"
    return None


def measure(tmpdir: Path, presses: int, *,
            progress: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Everything the section reports (see the module docstring), as lists of seconds."""
    from simulator.browser import chromium, log_in, page_fetch
    from simulator.console_rig import PASSWORD, ConsoleRig
    from simulator.voice_media import citizen_wav, operator_wav
    from simulator.voice_probe import read_tap, start_tap

    clips = tmpdir / "clips"
    citizen, operator = citizen_wav(clips), operator_wav(clips)
    citizen = dataclasses.replace(citizen, duration_s=clip_samples(citizen.path) / RATE)
    found: dict[str, Any] = {
        "trigger_connected": [], "contact_connected": [], "trigger_row": [], "row_seen": [],
        "d2b_env": [], "b2d_env": [], "b2d_spoken": 0,
        "row_click": [], "click_connected": [], "d2b": [], "b2d": [], "floor": [],
        "d2b_markers": 0, "b2d_markers": 0, "browser": None, "errors": [], "notes": []}
    progress(f"voice: floor, aiortc -> aiortc over loopback ({FLOOR_S:g} s)")
    try:
        found["floor"] = aiortc_floor(citizen)
    except Exception as exc:
        found["errors"].append(f"floor: {type(exc).__name__}: {exc}")
    with PrivateBroker(tmpdir / "broker") as broker:
        rig = ConsoleRig(tmpdir / "centre", broker)
        rig.start()
        driver = None
        try:
            with pillar_process(broker, tmpdir / "devices", citizen.path) as (
                    process, recorder, data_dir):
                if not recorder.wait_for(lambda es: any(e.kind == "microphone" for e in es),
                                         TIMEOUT_S):
                    raise VoiceBenchError("the pillar reported no microphone start (does "
                                          "simulator/virtual_device.py emit 'microphone'?)")
                mic_start = recorder.find(kind="microphone")[0].data["start_unix"]
                rig.wait_for(lambda: rig.store.device(PILLAR) is not None, TIMEOUT_S)
                driver = chromium(rig.cert_file, tmpdir / "profile",
                                  microphone_wav=operator.path)
                found["browser"] = f"Chromium {driver.capabilities.get('browserVersion', '?')}"
                driver.set_script_timeout(TIMEOUT_S + 10)
                log_in(driver, rig.url, "alice", PASSWORD)
                progress(f"voice: {presses} presses, each call listened to for {LISTEN_S:g} s")
                for run in range(presses):
                    try:
                        one_call(run, found, rig, driver, process, recorder, data_dir,
                                 mic_start, citizen, operator, page_fetch, start_tap,
                                 read_tap)
                    except Exception as exc:
                        found["errors"].append(f"press {run + 1}: {type(exc).__name__}: "
                                               f"{exc}")
                        break
        finally:
            if driver is not None:
                with contextlib.suppress(Exception):
                    driver.quit()
            rig.stop()
    return found


def one_call(run: int, found: dict[str, Any], rig: Any, driver: Any, process: DeviceProcess,
             recorder: Recorder, data_dir: Path, mic_start: float, citizen: Any,
             operator: Any, page_fetch: Any, start_tap: Any, read_tap: Any) -> None:
    from simulator.browser import wait_until

    if driver.execute_script(_WATCH, PILLAR) != "ok":
        raise VoiceBenchError("the page's answering loop did not start")
    triggers = len(recorder.find(kind="trigger"))
    buttons = len(recorder.find(kind="button"))
    process.send({"op": "press", "hold_s": 0.3, "seed": run + 1})
    if not recorder.wait_for(lambda es: sum(e.kind == "trigger" for e in es) > triggers,
                             TIMEOUT_S):
        raise VoiceBenchError("the pillar raised no alert")
    trigger = recorder.find(kind="trigger")[triggers]
    contact = recorder.find(kind="button")[buttons]
    page = driver.execute_async_script(_CONNECTED, TIMEOUT_S * 1000)
    if page.get("error") or page.get("timedOut") or page.get("alertId") != \
            trigger.data["alert_id"]:
        raise VoiceBenchError(f"the call did not connect: {page}")
    connected = page["connectedAt"] / 1000
    found["trigger_connected"].append(connected - trigger.wall)
    found["contact_connected"].append(connected - contact.wall)
    found["trigger_row"].append(page["rowShownAt"] / 1000 - trigger.wall)
    found["row_seen"].append((page["seenAt"] - page["rowShownAt"]) / 1000)
    found["row_click"].append((page["clickedAt"] - page["seenAt"]) / 1000)
    found["click_connected"].append((page["connectedAt"] - page["clickedAt"]) / 1000)

    # Both directions at once, LISTEN_S of the call.
    start_tap(driver, "remote")
    start_tap(driver, "local")
    time.sleep(LISTEN_S)
    heard = read_tap(driver, "remote")
    said = read_tap(driver, "local")
    pcm, starts, walls = read_speaker(data_dir)

    received = [heard.first_unix + t for t in find_markers(heard.samples, RATE,
                                                           citizen.marker_hz)]
    sent = citizen.markers_between(mic_start, time.time())
    d2b = latencies(sent, received)
    found["d2b"] += d2b
    found["d2b_markers"] += len(received)

    spoken = [said.first_unix + t for t in find_markers(said.samples, RATE,
                                                        operator.marker_hz)]
    # only what the speaker played since the local tap started (older markers have no partner)
    since = int(np.searchsorted(walls, said.first_unix - 1.0))
    first_sample = int(starts[since]) if since < len(starts) else len(pcm)
    played = find_markers(pcm[first_sample:], RATE, operator.marker_hz)
    played_unix = speaker_times([first_sample + round(t * RATE) for t in played], starts, walls)
    b2d = latencies(spoken, played_unix)
    found["b2d"] += b2d
    found["b2d_markers"] += len(played_unix)
    found["b2d_spoken"] += len(spoken)

    # The same by the speech itself: energy envelopes on one wall-clock grid, per 2 s piece.
    begin, end = said.first_unix, said.first_unix + said.samples.size / RATE
    grid_end = end + 1.0
    tail = pcm[first_sample:]
    speaker_env = on_wall_grid(tail, lambda i: np.asarray(speaker_times(
        first_sample + i, starts, walls)), begin, grid_end)
    b2d_env = envelope_lags(on_wall_grid(said.samples, lambda i: said.first_unix + i / RATE,
                                         begin, end), speaker_env)
    found["b2d_env"] += b2d_env
    clip = read_wav(citizen.path)
    loops = int((heard.first_unix + heard.samples.size / RATE - mic_start) // citizen.duration_s)
    played_clip = np.tile(clip, loops + 2)
    hbegin = heard.first_unix
    hend = heard.first_unix + heard.samples.size / RATE
    d2b_env = envelope_lags(
        on_wall_grid(played_clip, lambda i: mic_start + i / RATE, hbegin - 1.0, hend),
        on_wall_grid(heard.samples, lambda i: heard.first_unix + i / RATE, hbegin - 1.0, hend))
    found["d2b_env"] += d2b_env
    if os.environ.get("VOICE_BENCH_KEEP"):
        np.save(data_dir / f"said{run}.npy", said.samples)
        np.save(data_dir / f"heard{run}.npy", heard.samples)
        (data_dir / f"call{run}.json").write_text(json.dumps({
            "said_first": said.first_unix, "heard_first": heard.first_unix, "spoken": spoken,
            "played_unix": played_unix, "first_sample": first_sample, "received": received,
            "sent": sent, "page": page}))
    log.info("press %d: connected %.0f ms after the trigger; d2b %s (speech %s); b2d %s "
             "(speech %s)", run + 1, 1000 * (connected - trigger.wall),
             [round(1000 * x) for x in d2b], [round(1000 * x) for x in d2b_env],
             [round(1000 * x) for x in b2d], [round(1000 * x) for x in b2d_env])

    alert_id = page["alertId"]
    closed = len(recorder.find(kind="feedback", state="closed"))
    answer = page_fetch(driver, "POST", f"/api/alerts/{alert_id}/close",
                        {"reason": "bench: caller safe"})
    if not 200 <= answer["status"] < 300:
        raise VoiceBenchError(f"closing the alert: {answer}")
    if not recorder.wait_for(lambda es: sum(e.kind == "feedback"
                                            and e.data.get("state") == "closed"
                                            for e in es) > closed, TIMEOUT_S):
        raise VoiceBenchError("the pillar never showed 'closed'")
    wait_until(driver, lambda d: d.execute_script("return window.sosConsole.voice.state")
               == "idle", timeout=TIMEOUT_S, what="the page's call to end")


def run_voice(tmpdir: Path, presses: int = PRESSES, *,
              progress: Callable[[str], None] = lambda text: None,
              context: dict[str, Any] | None = None) -> VoiceReport:
    """The voice section of `python -m bench`."""
    report = VoiceReport(presses=presses, context=dict(context or {}))
    report.context["listen_s"] = LISTEN_S
    report.why_not = why_not_here()
    if report.why_not:
        progress(f"voice: skipped ({report.why_not})")
        return report
    try:
        found = measure(Path(tmpdir), presses, progress=progress)
    except Exception as exc:  # broker, browser, pillar: reported, not raised
        report.errors.append(f"voice: {type(exc).__name__}: {exc}")
        return report
    report.context["browser"] = found["browser"]
    report.errors += found["errors"]
    report.connect = summarise("voice_connect", "press (trigger recognised) -> voice connected",
                               found["trigger_connected"])
    report.breakdown = [
        summarise("voice_contact_connect", "  from the first contact -> voice connected",
                  found["contact_connected"]),
        summarise("voice_trigger_row", "  trigger -> alert row in the page",
                  found["trigger_row"]),
        summarise("voice_row_seen", "  row -> seen by the page's answering loop",
                  found["row_seen"]),
        summarise("voice_seen_click", "  seen -> selected and Talk clicked",
                  found["row_click"]),
        summarise("voice_click_connected", "  Talk clicked -> RTCPeerConnection connected",
                  found["click_connected"]),
    ]
    d2b = summarise("voice_d2b", "mouth-to-ear device -> browser, markers", found["d2b"])
    d2b_env = summarise("voice_d2b_speech", "mouth-to-ear device -> browser, speech envelope",
                        found["d2b_env"])
    b2d = summarise("voice_b2d", "mouth-to-ear browser -> device, markers", found["b2d"])
    b2d_env = summarise("voice_b2d_speech", "mouth-to-ear browser -> device, speech envelope",
                        found["b2d_env"])
    # The headline of each direction: its markers when each call gave at least one, else the
    # speech envelope (the browser's audio processing may take the markers out, see notes).
    report.device_to_browser = d2b if d2b.n >= presses else d2b_env
    report.browser_to_device = b2d if b2d.n >= presses else b2d_env
    report.extra = [x for x in (d2b, d2b_env, b2d, b2d_env)
                    if x not in (report.device_to_browser, report.browser_to_device)]
    report.floor = summarise(
        "voice_floor", "floor: aiortc -> aiortc loopback, markers", found["floor"])
    expected = presses * int(LISTEN_S // 2)
    report.notes.append(
        f"markers paired: device -> browser {len(found['d2b'])} of {found['d2b_markers']} "
        f"found, browser -> device {len(found['b2d'])} of {found['b2d_markers']} found on "
        f"the pillar's speaker, {found['b2d_spoken']} in the page's own microphone tap "
        f"(about {expected} each expected); speech envelope: per 2 s piece, the lag of best "
        "correlation (>= 0.7) on one wall-clock grid, 1 ms steps")
    d, b = report.device_to_browser, report.browser_to_device
    report.notes.append(
        "method error: each tap's first_unix is its MediaRecorder's 'start' event, not the "
        "capture time of its sample 0; an offset e there makes device -> browser e longer and "
        "browser -> device e shorter (the local tap times the operator's mouth, the remote "
        "tap the browser's ear), so their sum, the round trip, is free of it: "
        f"{d.p50_ms + b.p50_ms:.0f} ms (p50 + p50). browser -> device below the floor "
        "(aiortc's receiver holds 4 packets, 80 ms, before it decodes) says e is real: at least "
        f"{max(0.0, 80.0 - b.p50_ms):.0f} ms here, about "
        f"{max(0.0, report.floor.p50_ms - b.p50_ms):.0f} by the floor (Chromium's MediaRecorder "
        "encodes 60 ms Opus frames; its 'start' seems to follow its first). The pillar's "
        "'ear' is the frame handed to its speaker (a WAV here; a Pi's ALSA buffer adds "
        "20-40 ms), the browser's the stream before its audio output; the microphone's "
        "'mouth' is the sample's capture time (its 20 ms block counts)")
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    numbers = [a for a in args if a != "-v"]
    presses = int(numbers[0]) if numbers else PRESSES
    logging.basicConfig(level=logging.INFO if "-v" in args else logging.ERROR,
                        stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    began = time.monotonic()
    keep = os.environ.get("VOICE_BENCH_KEEP")
    with (contextlib.nullcontext(keep) if keep
          else tempfile.TemporaryDirectory(prefix="voice-bench-")) as tmp:
        report = run_voice(Path(tmp), presses,
                           progress=lambda text: print(f"bench: {text}", file=sys.stderr),
                           context={"cpus": os.cpu_count()})
    report.context["elapsed_s"] = round(time.monotonic() - began, 1)
    print(report.as_table())
    print(f"bench: done in {report.context['elapsed_s']} s", file=sys.stderr)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
