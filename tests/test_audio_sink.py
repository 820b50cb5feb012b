"""The simulator's speaker: a WAV file and a sidecar of play times."""

from __future__ import annotations

import json
import subprocess
import wave

import numpy as np

from firmware.audio.sink import NullAudioSink, WavFileSink, open_audio_sink
from firmware.config import AudioConfig


def test_everything_played_is_in_a_valid_wav_with_its_times(tmp_path) -> None:
    times = iter([10.0, 10.01, 10.05])  # handed over faster than it plays: nothing is lost
    sink = WavFileSink(tmp_path / "speaker.wav", wall=lambda: next(times))
    tone = (np.sin(np.arange(4800) / 10) * 9000).astype("<i2")
    sink.play(tone[:960].tobytes())
    sink.play(tone[960:].tobytes())
    with wave.open(str(tmp_path / "speaker.wav")) as readback:  # valid before close
        assert readback.getnframes() == 4800
    sink.play(b"\x00\x00" * 100)
    sink.close()
    with wave.open(str(tmp_path / "speaker.wav")) as readback:
        assert (readback.getframerate(), readback.getnchannels(), readback.getsampwidth()) == \
            (48_000, 1, 2)
        data = np.frombuffer(readback.readframes(5000), "<i2")
    assert np.array_equal(data[:4800], tone) and len(data) == 4900
    lines = [json.loads(line) for line in
             (tmp_path / "speaker.times.jsonl").read_text().splitlines()]
    # each piece comes out of the speaker when the one before it has played
    assert lines == [{"sample": 0, "unix_s": 10.0}, {"sample": 960, "unix_s": 10.02},
                     {"sample": 4800, "unix_s": 10.1}]
    probe = subprocess.run(["/usr/bin/ffprobe", "-v", "error", "-show_entries",
                            "stream=codec_name,sample_rate", "-of", "json",
                            str(tmp_path / "speaker.wav")], capture_output=True, text=True,
                           check=True)
    (stream,) = json.loads(probe.stdout)["streams"]
    assert stream == {"codec_name": "pcm_s16le", "sample_rate": "48000"}


def test_open_audio_sink_writes_a_file_when_given_one(tmp_path) -> None:
    config = AudioConfig(source="wav", capture_device="default", playback_device="default",
                         wav_file="x.wav", record=True)
    sink = open_audio_sink(config, wav_path=tmp_path / "out.wav")
    assert isinstance(sink, WavFileSink)
    sink.close()
    assert isinstance(open_audio_sink(config, wav_path=None), NullAudioSink)


def test_a_late_piece_follows_the_silence_the_speaker_played_meanwhile(tmp_path) -> None:
    times = iter([10.0, 10.5])  # 20 ms of sound, then nothing for 480 ms: an underrun
    sink = WavFileSink(tmp_path / "speaker.wav", wall=lambda: next(times))
    sink.play(b"\x10\x00" * 960)
    sink.play(b"\x20\x00" * 960)
    sink.close()
    with wave.open(str(tmp_path / "speaker.wav")) as readback:
        data = np.frombuffer(readback.readframes(readback.getnframes()), "<i2")
    assert len(data) == 960 + 23_040 + 960  # the 0.48 s of silence is in the file
    assert not data[960:960 + 23_040].any() and (data[-960:] == 0x20).all()
    lines = [json.loads(line) for line in
             (tmp_path / "speaker.times.jsonl").read_text().splitlines()]
    assert lines[-1] == {"sample": 960 + 23_040, "unix_s": 10.5}
