"""Listen to what a console page's voice call carries: the tests' and the benchmark's ears.

`start_tap` records, inside the page, the call's remote stream (what the device sent) or the
local microphone (what the operator said) with a MediaRecorder (WebM/Opus), noting the page's
wall clock when it started; `read_tap` brings a recording back as 48 kHz floats. This is how a
person would check a call: by what arrives, not by the call object existing.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import av
import numpy as np
from selenium.webdriver.remote.webdriver import WebDriver

RATE = 48_000

_START = """
const which = arguments[0];
const voice = window.sosConsole.voice;
const stream = which === "remote" ? voice.remote : voice.local;
if (!stream) return "no " + which + " stream";
window.sosTaps = window.sosTaps || {};
// MediaRecorder runs off the page's main thread: a busy page loses no sound.
const recorder = new MediaRecorder(stream, {mimeType: "audio/webm;codecs=opus"});
const tap = {blobs: [], firstUnixMs: null, recorder};
recorder.onstart = () => { tap.firstUnixMs = performance.timeOrigin + performance.now(); };
recorder.ondataavailable = (e) => { if (e.data.size) tap.blobs.push(e.data); };
recorder.start(250);
window.sosTaps[which] = tap;
return "ok";
"""

_READ = """
const [which, done] = arguments;
const tap = (window.sosTaps || {})[which];
if (!tap) { done(null); return; }
tap.recorder.requestData();
setTimeout(async () => {
  const buffer = new Uint8Array(await new Blob(tap.blobs).arrayBuffer());
  let text = "";
  for (let i = 0; i < buffer.length; i += 32768) {
    text += String.fromCharCode.apply(null, buffer.subarray(i, i + 32768));
  }
  done({webm: btoa(text), firstUnixMs: tap.firstUnixMs});
}, 50);
"""


@dataclass(frozen=True)
class Tapped:
    samples: np.ndarray  # float, -1..1, RATE Hz mono
    first_unix: float  # wall-clock time of samples[0] (approximate: one audio block)


def start_tap(driver: WebDriver, which: str) -> None:
    """`which`: "remote" (what the device sends) or "local" (the operator's microphone)."""
    result = driver.execute_script(_START, which)
    if result != "ok":
        raise RuntimeError(f"cannot tap the call: {result}")


def read_tap(driver: WebDriver, which: str) -> Tapped:
    result = driver.execute_async_script(_READ, which)
    if result is None:
        raise RuntimeError(f"no {which} tap running")
    return Tapped(_decode(base64.b64decode(result["webm"])),
                  (result["firstUnixMs"] or 0.0) / 1000.0)


def _decode(webm: bytes) -> np.ndarray:
    """The recorder's WebM/Opus as RATE Hz mono floats (PyAV; an unfinished file's last
    cluster may be cut: what decodes is kept)."""
    out: list[np.ndarray] = []
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    try:
        with av.open(io.BytesIO(webm), format="webm") as container:
            for frame in container.decode(audio=0):
                for piece in resampler.resample(frame):
                    out.append(piece.to_ndarray().reshape(-1))
    except av.error.FFmpegError:
        pass  # the tail of a recording still running
    if not out:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(out).astype(np.float32) / 32767.0
