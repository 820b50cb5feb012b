"""Build the device's voice call from its config: the engine, the message and the lamps."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from firmware.audio.sink import open_audio_sink
from firmware.audio.source import AudioSource
from firmware.config import DeviceConfig
from firmware.voice.device_voice import DeviceVoice
from firmware.voice.duplex import HalfDuplexGate
from firmware.voice.engine import VoiceEngine, VoiceNews
from firmware.voice.lights import PillarLamps
from firmware.voice.message import MessageSchedule

__all__ = ["SPEAKER_WAV", "VoiceNews", "make_voice"]

SPEAKER_WAV = "speaker.wav"  # audio.source = "wav": the speaker plays into data_dir/speaker.wav


def make_voice(config: DeviceConfig, source: AudioSource | None,
               report: Callable[[VoiceNews], None], *, pin_factory: Any = None,
               utc: Callable[[], datetime]) -> DeviceVoice | None:
    """None for a device without a voice call (no [audio], or voice.mode = "off")."""
    voice, audio = config.voice, config.audio
    if voice is None or audio is None:
        return None
    two_way = voice.mode == "two_way"
    # A device whose microphone is a WAV file (the simulator) has a WAV file for a speaker.
    speaker_wav = config.data_dir / SPEAKER_WAV if audio.source == "wav" else None
    sink = open_audio_sink(audio, wav_path=speaker_wav) if two_way else None
    gate = HalfDuplexGate() if two_way and voice.duplex == "half" else None
    engine = VoiceEngine(mode=voice.mode, source=source, sink=sink, on_news=report,
                         reconnect_s=voice.reconnect_s, duplex=gate)
    lights = getattr(config, "lights", None)
    lamps = (PillarLamps(lights.yellow_pin, lights.green_pin, pin_factory=pin_factory)
             if lights is not None else None)
    message = MessageSchedule(voice.answer_within_s, voice.message_every_s) if two_way else None
    return DeviceVoice(engine, device_id=config.device_id, utc=utc, message=message,
                       message_file=Path(voice.message_file) if voice.message_file else None,
                       lamps=lamps)
