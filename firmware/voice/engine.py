"""The device's end of a voice call: an aiortc (WebRTC) peer that answers the operator's offer.

The operator's browser offers, the device answers (docs/VOICE.md, "Call flow"): the offer comes
as a signed `voice_offer` command, already checked by the alert core (signature, replay window,
active alert), and the answer leaves as a `voice_answer` event through the outbox. Neither side
trickles ICE candidates: aiortc gathers all of its own before `setLocalDescription` returns, and
the browser waits for its gathering to complete, so one message each way sets the call up.

The engine runs aiortc on an asyncio loop in a thread of its own; its methods may be called from
any thread. What it learns (the answer, the call's state, a TURN fault) goes to `on_news`, which
the device loop turns into events. Media:
- the microphone (`firmware/audio/source.py`, shared with the recorder) feeds `MicrophoneTrack`;
- what the operator says is played on the sink (the pillar's speaker) in `two_way` mode only: in
  `listen_in` (the token) the device answers send-only and plays nothing, so the paramedic is not
  disturbed;
- the spoken message (`play_clip`) goes to the same sink, and stops when an operator connects.

Limits: one call at a time (a new offer for the same alert, the operator's rejoin, replaces the
old call); at most `MIC_QUEUE_CHUNKS` x 20 ms of microphone sound waits for the encoder (older
sound is dropped: late speech is worth less than a short gap; a loop stalled by a busy CPU
for less than that loses nothing). The microphone is listened to only
from the sender's first frame on: sound queued while ICE and DTLS connect would reach the
browser as a burst, and its jitter buffer would then speed the speech up for seconds to catch
up (measured: 160 ms cut from the first 4 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from firmware.audio.sink import AudioSink
from firmware.audio.source import CHUNK_SAMPLES, SAMPLE_RATE, AudioChunk, AudioSource
from firmware.voice.duplex import HalfDuplexGate, rms
from firmware.voice.turn_probe import probe_turn

log = logging.getLogger("sos.voice")

MIC_QUEUE_CHUNKS = 10  # 200 ms of microphone sound at most waits for the encoder
SILENT_AFTER_S = 2.0  # two_way: no sound from the operator's side this long = interrupted
TURN_PROBE_TIMEOUT_S = 3.0
ANSWER_MAX = 10_000  # the voice_answer event's `sdp` limit (event.schema.json)
CLIP_CHUNK_S = CHUNK_SAMPLES / SAMPLE_RATE
CLIP_LEAD_S = 0.1  # the spoken message is handed to the speaker this far ahead of playing


class VoiceNews:
    """What the engine tells the device loop (from the voice thread)."""


@dataclass(frozen=True)
class VoiceAnswer(VoiceNews):
    alert_id: str
    session: str
    sdp: str


@dataclass(frozen=True)
class VoiceStateChanged(VoiceNews):
    """`state`: connecting, connected, interrupted, ended or failed (the event's voice_state)."""

    alert_id: str
    session: str
    state: str
    reason: str | None = None


@dataclass(frozen=True)
class VoiceFaultChanged(VoiceNews):
    """The voice link's fault began (`reason`) or cleared (None): shown in the fleet view."""

    reason: str | None



class MicrophoneTrack(MediaStreamTrack):
    """The shared microphone as a WebRTC audio track: 20 ms s16 mono 48 kHz frames."""

    kind = "audio"

    def __init__(self, loop: asyncio.AbstractEventLoop, source: AudioSource,
                 gate: HalfDuplexGate | None = None) -> None:
        """`gate`: half-duplex; silence is sent while it keeps the microphone shut."""
        super().__init__()
        self._loop = loop
        self._source = source
        self._gate = gate
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._pts = 0
        self._unsubscribe: Callable[[], None] | None = None

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        super().stop()

    def feed(self, chunk: AudioChunk) -> None:
        """Called on the audio source's thread: never blocks."""
        with contextlib.suppress(RuntimeError):  # the loop closed: the call is over
            self._loop.call_soon_threadsafe(self._put, chunk.pcm)

    def _put(self, pcm: bytes) -> None:
        while self._queue.qsize() >= MIC_QUEUE_CHUNKS:
            self._queue.get_nowait()
        self._queue.put_nowait(pcm)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._unsubscribe is None:  # the sender started: the call is connected
            self._unsubscribe = self._source.subscribe(self.feed)
        pcm = await self._queue.get()
        if self._gate is not None and not self._gate.microphone_open(self._loop.time()):
            pcm = bytes(len(pcm))  # half-duplex: the operator is speaking
        frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
        frame.planes[0].update(pcm)
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = Fraction(1, SAMPLE_RATE)
        self._pts += frame.samples
        return frame


class _Gone(Exception):
    """The call being answered was ended meanwhile (a hang-up, the alert's end, a rejoin)."""


@dataclass
class _Call:
    alert_id: str
    session: str
    pc: RTCPeerConnection
    ice_servers: list[dict[str, Any]]
    mic: MicrophoneTrack | None = None
    tasks: list[asyncio.Task[Any]] | None = None
    state: str = "connecting"
    heard_at: float | None = None  # loop time the operator's side was last heard


class VoiceEngine:
    """Answers offers and runs the call. `mode`: "two_way" or "listen_in"."""

    def __init__(self, *, mode: str, source: AudioSource | None, sink: AudioSink | None,
                 on_news: Callable[[VoiceNews], None], reconnect_s: float = 30.0,
                 duplex: HalfDuplexGate | None = None) -> None:
        """`duplex`: a half-duplex gate (two_way without echo cancellation), or None: full."""
        if mode not in ("two_way", "listen_in"):
            raise ValueError(f"voice mode must be two_way or listen_in, not {mode!r}")
        self.mode = mode
        self._source = source
        self._sink = sink if mode == "two_way" else None
        self._on_news = on_news
        self._reconnect_s = reconnect_s
        self._duplex = duplex if self._sink is not None else None
        self._calls: dict[str, _Call] = {}
        self._clip: asyncio.Task[None] | None = None
        self._fault: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="voice", daemon=True)
        self._thread.start()

    # -- the device loop's side (any thread) -----------------------------------------------------
    def offer(self, alert_id: str, session: str, sdp: str,
              ice_servers: list[dict[str, Any]]) -> None:
        self._submit(self._answer(alert_id, session, sdp, ice_servers))

    def hangup(self, session: str) -> None:
        self._submit(self._end(session, "the operator hung up"))

    def end_all(self, reason: str) -> None:
        """The alert ended (closed): every call ends, and the message stops."""
        self._submit(self._end_all(reason))

    def play_clip(self, path: Path) -> None:
        """Play a WAV (the spoken message) on the speaker, unless an operator is connected."""
        self._submit(self._start_clip(path))

    @property
    def connected(self) -> bool:
        return any(call.state == "connected" for call in list(self._calls.values()))

    def close(self, timeout_s: float = 5.0) -> None:
        """End every call, stop the loop and its thread, and let the speaker go."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shut_down(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._loop.close()
        if self._sink is not None:
            self._sink.close()

    async def _shut_down(self) -> None:
        await self._end_all("the device stopped")
        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()
        await self._loop.shutdown_default_executor()

    def _submit(self, coro: Any) -> None:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        future.add_done_callback(_log_failure)

    def _tell(self, news: VoiceNews) -> None:
        try:
            self._on_news(news)
        except Exception:
            log.exception("voice: could not report %r", news)

    # -- the call (on the voice loop) ------------------------------------------------------------
    async def _answer(self, alert_id: str, session: str, sdp: str,
                      ice_servers: list[dict[str, Any]]) -> None:
        """The call is registered before the first await: a hang-up or the alert's end that
        comes while it is being answered finds it, ends it, and the answer stops there."""
        config = RTCConfiguration(iceServers=[
            RTCIceServer(urls=server["urls"], username=server.get("username"),
                         credential=server.get("credential")) for server in ice_servers])
        pc = RTCPeerConnection(configuration=config)
        call = _Call(alert_id, session, pc, ice_servers, tasks=[])
        old_calls = [old for old in self._calls if old != session]
        self._calls[session] = call
        pc.on("connectionstatechange", lambda: self._connection_changed(call))
        pc.on("track", lambda track: self._remote_track(call, track))
        for old in old_calls:  # a rejoin: the operator's new offer replaces the call
            await self._end(old, "replaced by a new offer (the operator rejoined)")
        try:
            if self._calls.get(session) is not call:
                raise _Gone
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
            if not audio:
                raise ValueError("the offer has no audio")
            if self._source is not None:
                call.mic = MicrophoneTrack(self._loop, self._source, self._duplex)
                audio[0].sender.replaceTrack(call.mic)
                audio[0].direction = "sendrecv" if self._sink is not None else "sendonly"
            else:
                audio[0].direction = "recvonly" if self._sink is not None else "inactive"
            await pc.setLocalDescription(await pc.createAnswer())
            if self._calls.get(session) is not call:
                raise _Gone
            if len(pc.localDescription.sdp) > ANSWER_MAX:
                raise ValueError(f"the answer's SDP is {len(pc.localDescription.sdp)} characters, "
                                 f"more than an event carries ({ANSWER_MAX}): too many network "
                                 "interfaces or candidates")
        except Exception as exc:
            if self._calls.get(session) is not call:  # hung up or the alert ended meanwhile
                await self._close_call(call)  # (which said "ended" already)
                return
            reason = f"could not answer the operator's offer: {exc}"
            log.error("voice: %s", reason)
            del self._calls[session]
            await self._close_call(call)
            self._tell(VoiceStateChanged(alert_id, session, "failed", reason[:200]))
            return
        log.info("voice: answering the operator for alert %s (call %s, %s)", alert_id[:8],
                 session[:8], self.mode)
        self._tell(VoiceAnswer(alert_id, session, pc.localDescription.sdp))
        self._tell(VoiceStateChanged(alert_id, session, "connecting"))
        call.tasks.append(asyncio.ensure_future(self._watch(call)))
        if _names_turn(ice_servers) and " typ relay" not in pc.localDescription.sdp:
            # TURN named but no relay gathered: behind NAT the call cannot connect. Say why in
            # the fleet view now, not only once the call has failed.
            call.tasks.append(asyncio.ensure_future(self._check_turn(ice_servers)))

    def _remote_track(self, call: _Call, track: MediaStreamTrack) -> None:
        if track.kind != "audio":
            return
        assert call.tasks is not None
        call.tasks.append(asyncio.ensure_future(self._receive(call, track)))

    async def _receive(self, call: _Call, track: MediaStreamTrack) -> None:
        """What the operator says: played on the speaker (two_way), or only noted (listen_in:
        the frames still tell the call is alive)."""
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            call.heard_at = self._loop.time()
            if call.state == "interrupted" and call.pc.connectionState == "connected":
                self._set_state(call, "connected")
            if self._sink is None:
                continue
            for out in resampler.resample(frame):
                pcm = bytes(out.planes[0])[: out.samples * 2]
                if self._duplex is not None:
                    self._duplex.played(rms(pcm), self._loop.time())
                self._sink.play(pcm)

    def _connection_changed(self, call: _Call) -> None:
        state = call.pc.connectionState
        if self._calls.get(call.session) is not call:
            return
        if state == "connected":
            call.heard_at = self._loop.time()
            self._set_state(call, "connected")
            self._stop_clip()
            if self._fault is not None:
                self._fault = None
                self._tell(VoiceFaultChanged(None))
        elif state == "failed":
            assert call.tasks is not None
            call.tasks.append(asyncio.ensure_future(self._failed(call)))

    async def _failed(self, call: _Call,
                      reason: str = "no connection could be made with the operator's browser"
                      ) -> None:
        """ICE or DTLS failed, or the call did not (re)connect within `reconnect_s`: find out
        whether TURN is to blame, so the fleet view says what to fix; the call ends (the
        operator's console can offer again)."""
        if self._calls.get(call.session) is not call:  # ended meanwhile (replaced, closed)
            return
        turn_problem = await self._check_turn(call.ice_servers)
        reason = turn_problem or reason
        log.error("voice: call %s failed: %s", call.session[:8], reason)
        await self._end(call.session, reason, state="failed")

    async def _check_turn(self, ice_servers: list[dict[str, Any]]) -> str | None:
        """Probe the offer's TURN servers; report a fault that began (once), and None if one
        works or none is named."""
        if not _names_turn(ice_servers):
            return None
        problem = await probe_turn(ice_servers, TURN_PROBE_TIMEOUT_S)
        if problem is not None and self._fault != problem:
            self._fault = problem
            self._tell(VoiceFaultChanged(problem))
        return problem

    async def _watch(self, call: _Call) -> None:
        """Interrupted: connected, but the operator's side went silent (two_way: the browser
        always sends). Failed: interrupted, or never connected, for `reconnect_s`."""
        since = self._loop.time()
        while self._calls.get(call.session) is call:
            await asyncio.sleep(0.25)
            now = self._loop.time()
            if call.state == "connected" and self._sink is not None and call.heard_at is not None \
                    and now - call.heard_at > SILENT_AFTER_S:
                self._set_state(call, "interrupted")
                since = now
            if call.state in ("connecting", "interrupted") and now - since > self._reconnect_s:
                what = "never connected" if call.state == "connecting" else "dropped"
                # aiortc may never report "failed" (an offer without candidates, as a browser
                # whose TURN server is unreachable sends, leaves ICE waiting): probe TURN here too
                await self._failed(call, f"the call {what} and did not come back within "
                                   f"{self._reconnect_s:g} s")
                return
            if call.state == "connected":
                since = now

    def _set_state(self, call: _Call, state: str, reason: str | None = None) -> None:
        if call.state == state:
            return
        call.state = state
        log.info("voice: call %s %s%s", call.session[:8], state, f" ({reason})" if reason else "")
        self._tell(VoiceStateChanged(call.alert_id, call.session, state, reason))

    async def _end(self, session: str, reason: str, *, state: str = "ended") -> None:
        call = self._calls.pop(session, None)
        if call is None:
            return
        await self._close_call(call)
        call.state = "closing"
        self._set_state(call, state, reason[:200])

    async def _end_all(self, reason: str) -> None:
        self._stop_clip()
        for session in list(self._calls):
            await self._end(session, reason)

    async def _close_call(self, call: _Call) -> None:
        current = asyncio.current_task()
        for task in call.tasks or []:
            if task is not current:
                task.cancel()
        if call.mic is not None:
            call.mic.stop()
        await call.pc.close()

    # -- the spoken message ----------------------------------------------------------------------
    async def _start_clip(self, path: Path) -> None:
        if self._sink is None or self.connected:
            return
        self._stop_clip()
        self._clip = asyncio.ensure_future(self._play_clip(path))

    def _stop_clip(self) -> None:
        if self._clip is not None:
            self._clip.cancel()
            self._clip = None

    async def _play_clip(self, path: Path) -> None:
        """Paced in 20 ms chunks, so the speaker's buffer never holds more than CLIP_LEAD_S of
        it and an operator who connects cuts it off at once."""
        assert self._sink is not None
        pcm = await asyncio.to_thread(read_wav_pcm, path)
        step = CHUNK_SAMPLES * 2
        start = time.monotonic()
        for n, at in enumerate(range(0, len(pcm), step)):
            self._sink.play(pcm[at:at + step])
            # CLIP_LEAD_S ahead of the speaker: a busy loop late by less does not gap the words
            due = start + (n + 1) * CLIP_CHUNK_S - CLIP_LEAD_S
            await asyncio.sleep(max(0.0, due - time.monotonic()))


def read_wav_pcm(path: Path) -> bytes:
    """A WAV as s16le mono 48 kHz (PyAV resamples whatever rate and channels it has)."""
    with wave.open(str(path), "rb") as check:  # a clear error for a file that is not a WAV
        check.getnframes()
    out = bytearray()
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            for piece in resampler.resample(frame):
                out += bytes(piece.planes[0])[: piece.samples * 2]
        for piece in resampler.resample(None):
            out += bytes(piece.planes[0])[: piece.samples * 2]
    return bytes(out)


def _names_turn(ice_servers: list[dict[str, Any]]) -> bool:
    return any(str(url).startswith(("turn:", "turns:")) for server in ice_servers
               for url in server.get("urls", []))


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("voice: internal error: %r", future.exception())
