"""The device's microphone and speaker (docs/EVIDENCE.md "Sound", docs/VOICE.md).

Inside the device all sound is s16le mono at 48 kHz in 20 ms chunks (`source.py`); the
evidence recorder and the live view encode it to AAC (`aac.py`), the voice call sends it over
WebRTC. PyAV (and through it ALSA) is imported only by the adapters that need it.
"""
