"""Stub `Output`, with picamera2's real signatures."""


class Output:
    def __init__(self, pts=None):
        self.recording = False
        self.ptsoutput = pts
        self.needs_pacing = False

    def start(self):
        self.recording = True

    def stop(self):
        self.recording = False

    def outputframe(self, frame, keyframe=True, timestamp=None, packet=None, audio=False):
        """Called from the encoder's thread with one encoded frame."""

    def outputtimestamp(self, timestamp):
        pass

    def _add_stream(self, encoder_stream, *args, **kwargs):
        pass
