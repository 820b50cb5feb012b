"""The device's voice engine (firmware/voice/engine.py) against a real aiortc peer standing in
for the operator's browser, in one process: it answers, the operator hears the microphone, the
device's speaker plays the operator; and a call ended while it is being answered stays ended.
(The browser itself: tests/test_voice_browser.py.)"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

import firmware.voice.engine as engine_module
from firmware.audio.sink import WavFileSink
from firmware.audio.source import WavAudioSource
from firmware.voice.duplex import HalfDuplexGate
from firmware.voice.engine import VoiceAnswer, VoiceEngine, VoiceNews, VoiceStateChanged
from simulator.audio_compare import read_wav
from simulator.voice_media import write_wav

ALERT = "a1" * 16
SESSION = "5e" * 16
RATE = 48_000
WAIT_S = 15.0


class Tone(MediaStreamTrack):
    """The operator's microphone: a 440 Hz tone, paced in real time as a microphone is."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._n = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        loop = asyncio.get_running_loop()
        self._start = self._start or loop.time()
        await asyncio.sleep(max(0.0, self._start + self._n * 0.02 - loop.time()))
        t = (np.arange(960) + self._n * 960) / RATE
        frame = av.AudioFrame.from_ndarray(
            (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").reshape(1, -1), format="s16",
            layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self._n * 960, Fraction(1, RATE)
        self._n += 1
        return frame


@pytest.fixture
def microphone(tmp_path: Path) -> Iterator[WavAudioSource]:
    """The device's microphone: 1 s of a 1 kHz tone, then 1 s of silence, looped."""
    t = np.arange(RATE) / RATE
    write_wav(tmp_path / "mic.wav", np.concatenate([0.3 * np.sin(2 * np.pi * 1000 * t),
                                                    np.zeros(RATE)]))
    source = WavAudioSource(tmp_path / "mic.wav")
    source.start()
    yield source
    source.stop()


@pytest.fixture
def news() -> queue.Queue[VoiceNews]:
    return queue.Queue()


@pytest.fixture
def engine(microphone: WavAudioSource, news: queue.Queue[VoiceNews],
           tmp_path: Path) -> Iterator[VoiceEngine]:
    made = VoiceEngine(mode="two_way", source=microphone,
                       sink=WavFileSink(tmp_path / "speaker.wav"), on_news=news.put)
    yield made
    made.close()


def next_news(news: queue.Queue[VoiceNews], kind: type, **fields) -> VoiceNews:
    while True:
        item = news.get(timeout=WAIT_S)
        if isinstance(item, kind) and all(getattr(item, k) == v for k, v in fields.items()):
            return item


async def operator_offer() -> tuple[RTCPeerConnection, list[av.AudioFrame]]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(Tone())
    heard: list[av.AudioFrame] = []
    listening: list[asyncio.Task[None]] = []

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        async def consume() -> None:
            while True:
                heard.append(await track.recv())

        listening.append(asyncio.ensure_future(consume()))

    await pc.setLocalDescription(await pc.createOffer())
    return pc, heard


def listen(engine: VoiceEngine, news: queue.Queue[VoiceNews],
           seconds: float = 3.0) -> list[av.AudioFrame]:
    """Offer a call as the operator's peer, connect it, and keep `seconds` of what the device
    sends."""
    async def call() -> list[av.AudioFrame]:
        pc, heard = await operator_offer()
        engine.offer(ALERT, SESSION, pc.localDescription.sdp, [])
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, next_news, news, VoiceAnswer)
        await pc.setRemoteDescription(RTCSessionDescription(answer.sdp, "answer"))
        await loop.run_in_executor(None, lambda: next_news(news, VoiceStateChanged,
                                                           state="connected"))
        while sum(f.samples for f in heard) < seconds * RATE:
            await asyncio.sleep(0.1)  # polls the peer's own list: nothing announces a frame
        await pc.close()
        return heard

    return asyncio.run(asyncio.wait_for(call(), 3 * WAIT_S))


def test_the_engine_answers_and_each_side_hears_the_other(
        engine: VoiceEngine, news: queue.Queue[VoiceNews], tmp_path: Path) -> None:
    heard = listen(engine, news)
    pcm = np.concatenate([f.to_ndarray().reshape(-1)[::f.layout.nb_channels] for f in heard])
    levels = [np.abs(pcm[i:i + RATE // 10]).mean() for i in range(0, len(pcm), RATE // 10)]
    assert max(levels) > 20 * max(min(levels), 1)  # the tone's seconds and the silent ones
    played = read_wav(tmp_path / "speaker.wav")
    last_second = played[-RATE:]
    spectrum = np.abs(np.fft.rfft(last_second))
    peak_hz = np.argmax(spectrum) * RATE / len(last_second)
    assert abs(peak_hz - 440) <= 2  # the operator's 440 Hz tone


class HeldPeer(RTCPeerConnection):
    """aiortc's peer whose answer waits at a gate the test opens: the race held open."""

    gate = threading.Event()

    async def setLocalDescription(self, description):
        await asyncio.get_running_loop().run_in_executor(None, HeldPeer.gate.wait, WAIT_S)
        return await super().setLocalDescription(description)


@pytest.mark.parametrize("ending", ["hangup", "alert closed"])
def test_a_call_ended_while_it_is_answered_is_not_answered(
        engine: VoiceEngine, news: queue.Queue[VoiceNews], microphone: WavAudioSource,
        ending: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def offer() -> str:
        pc, _ = await operator_offer()
        await pc.close()
        return pc.localDescription.sdp

    monkeypatch.setattr(engine_module, "RTCPeerConnection", HeldPeer)
    HeldPeer.gate.clear()
    engine.offer(ALERT, SESSION, asyncio.run(offer()), [])
    if ending == "hangup":
        engine.hangup(SESSION)
    else:
        engine.end_all("the alert was closed")
    ended = next_news(news, VoiceStateChanged, session=SESSION)
    assert ended.state == "ended"
    HeldPeer.gate.set()  # the answer goes on now, for a call that has ended
    engine.close()  # everything it was asked has run
    rest = []
    while not news.empty():
        rest.append(news.get())
    assert not any(isinstance(item, VoiceAnswer) for item in rest), rest
    assert not engine.connected


def test_an_answer_too_big_for_an_event_fails_the_call_saying_so(
        engine: VoiceEngine, news: queue.Queue[VoiceNews],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "ANSWER_MAX", 100)

    async def offer() -> str:
        pc, _ = await operator_offer()
        await pc.close()
        return pc.localDescription.sdp

    engine.offer(ALERT, SESSION, asyncio.run(offer()), [])
    failed = next_news(news, VoiceStateChanged, session=SESSION)
    assert failed.state == "failed" and "more than an event carries" in failed.reason


def test_half_duplex_mutes_the_microphone_while_the_operator_speaks(
        microphone: WavAudioSource, news: queue.Queue[VoiceNews], tmp_path: Path) -> None:
    """The operator's tone never stops here, so the pillar's microphone (its 1 kHz tone every
    other second) must not be heard at all once the tone plays on the pillar's speaker."""
    engine = VoiceEngine(mode="two_way", source=microphone,
                         sink=WavFileSink(tmp_path / "speaker.wav"), on_news=news.put,
                         duplex=HalfDuplexGate())
    try:
        heard = listen(engine, news)
    finally:
        engine.close()
    pcm = np.concatenate([f.to_ndarray().reshape(-1)[::f.layout.nb_channels] for f in heard])
    later = pcm[RATE:]  # after the first second: the operator's tone is playing by then
    assert np.abs(later).max() < 50  # silence (Opus may leave a trace of noise)
    assert read_wav(tmp_path / "speaker.wav").size > RATE  # the operator was heard, though
