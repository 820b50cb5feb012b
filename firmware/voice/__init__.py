"""firmware/voice: the voice call of an SOS (docs/VOICE.md)."""
