"""A token's recorder as its own process, so tests can SIGKILL it mid-segment.

    python -m simulator.recording_process --dir DIR --recipient age1... --signing-key FILE

It recovers what a previous run left, then records the synthetic camera continuously as one
call, printing `recovered SEQ...` once and `committed SEQ` per closed segment (flushed), until
SIGTERM, when it closes the open segment cleanly.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from firmware.camera.recorder import SegmentRecorder
from firmware.camera.recording import RecordingPolicy
from firmware.camera.store import SegmentStore
from firmware.camera.synthetic import SyntheticCamera
from protocol.signing import load_or_make_key


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--recipient", required=True)
    parser.add_argument("--signing-key", type=Path, required=True)
    parser.add_argument("--device-id", default="tok-rec-01")
    parser.add_argument("--segment-s", type=float, default=1.0)
    args = parser.parse_args(argv)

    policy = RecordingPolicy(preroll_s=0.0)
    policy.call_start("call-crash-test")
    recorder = SegmentRecorder(
        SegmentStore(args.dir), device_id=args.device_id, recipients=[args.recipient],
        signing_key=load_or_make_key(args.signing_key), fps=20, size=(320, 240), policy=policy,
        segment_s=args.segment_s, on_commit=lambda seq: say(f"committed {seq}"))
    say("recovered " + " ".join(str(s) for s in recorder.recover(now_mono=time.monotonic())))
    camera = SyntheticCamera(args.device_id, size=(320, 240), fps=20, gop_s=0.5)
    # Wait for SIGTERM with sigwait, not a handler that sets an Event the main thread waits on:
    # a handler runs on the main thread, and can interrupt that very wait while it holds the
    # Event's lock (a self-deadlock seen once here: the camera recorded on, 'stopped' never came).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started now inherit it
    recorder.update()
    camera.start(recorder.on_frame)
    signal.sigwait({signal.SIGTERM})
    camera.stop()
    recorder.close()
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
