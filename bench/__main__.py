"""`python -m bench`: SOS trigger -> stored latency beside the bare MQTT floor, in one run;
then the evidence video, upload and live view sections.

Lines:
  floor   a bare paho MQTT 5 QoS 1 publish -> subscriber on_message (and -> PUBACK), TLS
  ours    pillar button trigger recognised -> alert stored by the control centre
Then a breakdown (device-side share from the same run; storage and decoding measured alone) and
the verdict: ours p99 minus floor p99 against the target. A missed target still exits 0
(benchmarks report, they do not assert); a run that broke exits 1.

Evidence video: our segment writer (encrypt + hash + sign + fsync + commit) in MB/s beside the
stock `age -r` on the same bytes (target: ours >= 90% of stock), stock + fsync as the fair
comparison, and the camera's CPU share for a 1080p30 8 Mbit/s stream (bench/evidence.py).

Upload: the shift-end uploader's goodput beside a raw HTTPS PUT of the same segment files to
the same ingest server over the same TLS, stored as durably (target: ours >= 90% of it;
bench/upload_bench.py).

Live view: glass-to-glass latency p50/p95 of the newest and the first frame of each live chunk
during an SOS, chunks and losses (bench/live_bench.py).

GPS decoder: NmeaDecoder lines/s on the real receiver logs (tests/data/nmea), fed in
reader-sized reads, beside bare `pynmea2.parse` on the same lines (target: ours >= 0.8 of it;
bench/gps_bench.py).

Camera callback: how long picamera2's `outputframe` holds the camera thread per frame (p50/p99/
max, microseconds) while the recorder writes real segments, beside the old synchronous path
(target: p99 < 1 ms; bench/camera_bench.py).

Operator console: in headless Chromium with the console page open, alert stored -> its row
visible in the page (p50/p95/p99, and from the device's publish; beside the SOS section's
trigger -> stored), and alert stored -> the live video playing (the page selects a new SOS by
itself; target: row within 250 ms p99, video within 2 s; bench/console_bench.py). Without
chromium the section prints why instead.

Voice: press -> voice connected with the console page open and answering at once (p50/p95),
and mouth-to-ear latency both ways from tone markers found in what each side recorded, beside
an aiortc -> aiortc loopback floor (target: connected within 2 s p95, mouth-to-ear within
400 ms; bench/voice_bench.py). Without chromium or espeak-ng it prints why instead.

Audio: the recorder's CPU cost per second of sound (AAC + ADTS + MPEG-TS mux) beside PyAV's
bare aac encoder (bench/audio_bench.py).

--skip-sos, --skip-evidence, --skip-upload, --skip-live, --skip-gps, --skip-callback,
--skip-console, --skip-voice and --skip-audio leave a section out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulator.broker import BrokerError, PrivateBroker

from . import audio_bench
from .camera_bench import run_callback
from .console_bench import run_console
from .evidence import run_evidence
from .floor import FloorError, FloorSamples, run_floor
from .gps_bench import run_gps
from .live_bench import run_live
from .report import Report, combined_json
from .sos import DEVICE_ID, run_sos
from .stats import summarise
from .storage import run_micro, sample_alert
from .upload_bench import run_upload
from .voice_bench import PRESSES as VOICE_PRESSES
from .voice_bench import run_voice

TARGET_MS = 20.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure SOS trigger -> alert stored at the control centre, beside a bare "
                    "MQTT QoS 1 round trip through the same private TLS Mosquitto; then the "
                    "evidence segment writer beside stock age, the shift-end upload beside a "
                    "raw HTTPS PUT to the same server, and the live view's glass-to-glass "
                    "latency.",
        epilog="Takes about presses x 0.2 s plus set-up (about 45 s for 200), about 10 s for "
               "the evidence video section at 64 MB, 15 s for the upload section at 64 MB "
               "(half of it the relay lines), --live-seconds plus 2 s for the live view and "
               "about 15 s for the operator console: about 95 s in all on 2 cores. Exit "
               "status 0 whether or not a target is met; 1 if a part could not run.",
    )
    parser.add_argument("--presses", type=int, default=200, metavar="N",
                        help="counted samples per line: presses, floor round trips and "
                             "micro-benchmark iterations (default 200)")
    parser.add_argument("--warmup", type=int, default=10, metavar="K",
                        help="uncounted presses and round trips before each line (default 10)")
    parser.add_argument("--hold", type=float, default=0.15, metavar="S",
                        help="clean hold of each press in seconds; the pillar triggers at 0.1 "
                             "(default 0.15)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the contact bounce (1)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="give up on any single step after this long (default 10)")
    parser.add_argument("--target-ms", type=float, default=TARGET_MS, metavar="MS",
                        help=f"allowed p99 gap ours vs floor (default {TARGET_MS:g})")
    parser.add_argument("--tmpdir", type=Path, default=None,
                        help="where every section's temporary broker, outbox, stores and "
                             "segments live; fsync cost depends on this filesystem (default: "
                             "the system temp dir)")
    parser.add_argument("--evidence-mb", type=int, default=64, metavar="MB",
                        help="plaintext per evidence throughput run, 10**6 bytes; each line "
                             "runs 3 times interleaved and the best counts (default 64)")
    parser.add_argument("--upload-mb", type=int, default=128, metavar="MB",
                        help="plaintext per upload run, in 8 MB segments (10**6 bytes); each "
                             "line runs 3 times interleaved and the best counts (default 128)")
    parser.add_argument("--upload-link-mbit", type=float, default=400.0, metavar="MBIT",
                        help="pace of the relay the upload section's last two lines go "
                             "through, Mbit/s (default 400; 0 leaves them out)")
    parser.add_argument("--live-seconds", type=float, default=10.0, metavar="S",
                        help="seconds of live view streamed (default 10: about 20 chunks)")
    parser.add_argument("--console-alerts", type=int, default=30, metavar="N",
                        help="alerts sent into the open console page, after 3 uncounted "
                             "(default 30)")
    parser.add_argument("--console-video-runs", type=int, default=3, metavar="K",
                        help="SOS presses timed until the console plays their live video "
                             "(default 3; 0 leaves that line out)")
    parser.add_argument("--voice-presses", type=int, default=VOICE_PRESSES, metavar="N",
                        help="SOS presses on a pillar with sound, each answered at once in "
                             f"the console and listened to for a few seconds (default "
                             f"{VOICE_PRESSES}: about 75 s)")
    parser.add_argument("--skip-sos", action="store_true", help="skip the SOS latency section")
    parser.add_argument("--skip-evidence", action="store_true",
                        help="skip the evidence video section")
    parser.add_argument("--skip-upload", action="store_true", help="skip the upload section")
    parser.add_argument("--skip-live", action="store_true", help="skip the live view section")
    parser.add_argument("--skip-gps", action="store_true", help="skip the GPS decoder section")
    parser.add_argument("--skip-callback", action="store_true",
                        help="skip the camera callback hold-time section")
    parser.add_argument("--skip-console", action="store_true",
                        help="skip the operator console section (headless Chromium)")
    parser.add_argument("--skip-voice", action="store_true",
                        help="skip the voice call section (headless Chromium, espeak-ng)")
    parser.add_argument("--skip-audio", action="store_true",
                        help="skip the audio recording CPU section")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead (the SOS keys as before, plus "
                             "\"evidence_video\", \"upload\", \"live_view\", "
                             "\"gps_decoder\", \"camera_callback\", \"console\", \"voice\" and "
                             "\"audio\")")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the device's and the centre's log (INFO) on stderr")
    args = parser.parse_args(argv)
    if args.presses < 1 or args.warmup < 0 or args.timeout <= 0:
        parser.error("need --presses >= 1, --warmup >= 0 and --timeout > 0")
    if args.evidence_mb < 1:
        parser.error("need --evidence-mb >= 1")
    if args.upload_mb < 8:
        parser.error("need --upload-mb >= 8 (one 8 MB segment)")
    if args.live_seconds <= 0 or args.upload_link_mbit < 0:
        parser.error("need --live-seconds > 0 and --upload-link-mbit >= 0")
    if args.voice_presses < 1:
        parser.error("need --voice-presses >= 1")
    if args.console_alerts < 1 or args.console_video_runs < 0:
        parser.error("need --console-alerts >= 1 and --console-video-runs >= 0")
    if (args.skip_sos and args.skip_evidence and args.skip_upload and args.skip_live
            and args.skip_gps and args.skip_callback and args.skip_console
            and args.skip_voice and args.skip_audio):
        parser.error("skipping every section leaves nothing to run")
    if args.hold <= 0.1:
        parser.error("--hold must be longer than the pillar's 0.1 s trigger hold")
    return args


def filesystem_of(path: Path) -> str:
    """The filesystem type holding `path` (from /proc/mounts), e.g. ext4 or tmpfs."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown filesystem"
    resolved = str(path.resolve())
    best = max((m for m in mounts if resolved == m[0] or resolved.startswith(m[0].rstrip("/")
                                                                              + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else "unknown filesystem"


def progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def measure(args: argparse.Namespace, tmp: Path, errors: list[str]) -> Report:
    """Run the three parts against one broker; failures are collected, not raised."""
    payload = sample_alert(DEVICE_ID).payload()
    floor = FloorSamples()
    with PrivateBroker(tmp / "broker") as broker:
        progress(f"floor: {args.warmup} + {args.presses} QoS 1 round trips")
        try:
            floor = run_floor(broker.identity("bench-floor-pub"), broker.centre, args.presses,
                              args.warmup, payload, args.timeout)
        except FloorError as exc:
            errors.append(f"floor: {exc}")
        progress(f"ours: {args.warmup} + {args.presses} presses (about "
                 f"{(args.warmup + args.presses) * 0.2:.0f} s)")
        sos = run_sos(tmp, broker, args.presses, args.warmup, hold_s=args.hold,
                      seed=args.seed, timeout_s=args.timeout)
        if sos.error:
            errors.append(f"ours: {sos.error}")
    progress("storage and decoding, measured alone")
    micro = run_micro(tmp / "micro", DEVICE_ID, args.presses)
    context = {
        "broker": f"{broker.centre.host}:{broker.port}",
        "presses": args.presses,
        "warmup": args.warmup,
        "hold_s": args.hold,
        "seed": args.seed,
        "tmpdir": str(tmp.parent),
        "filesystem": filesystem_of(tmp),
        "cpus": os.cpu_count(),
        "payload_bytes": len(payload),
    }
    return Report(
        context=context,
        floor=summarise("floor", "floor: publish -> subscriber on_message", floor.delivered_s),
        floor_puback=summarise("floor_puback", "floor: publish -> PUBACK", floor.puback_s),
        ours=summarise("ours", "ours:  trigger recognised -> alert stored", sos.stored_s),
        floor_reply=summarise("floor_reply", "floor: publish -> subscriber's reply back",
                              floor.reply_s),
        ours_receipt=summarise("ours_receipt", "ours:  trigger -> signed receipt, DELIVERED",
                               sos.receipt_s),
        breakdown=[
            summarise("device_sent", "  device: trigger -> in outbox, paho publish()",
                      sos.sent_s),
            summarise("transit", "  paho publish() -> stored at the centre", sos.transit_s),
            summarise("device_done", "  device: trigger -> runtime done (+LED/buzzer)",
                      sos.handled_s),
            summarise("outbox_append", "  outbox append (WAL, synchronous=FULL)",
                      micro.outbox_append_s),
            summarise("store_add_alert", "  centre Store.add_alert (WAL, FULL)",
                      micro.store_add_alert_s),
            summarise("decode", "  decode + schema + signature check", micro.decode_s),
        ],
        target_ms=args.target_ms,
        errors=errors,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    errors: list[str] = []
    report: Report | None = None
    broke = False
    if not args.skip_sos:
        try:
            with tempfile.TemporaryDirectory(prefix="sos-bench-", dir=args.tmpdir) as tmp:
                report = measure(args, Path(tmp), errors)
            report.context["elapsed_s"] = round(time.monotonic() - started, 1)
        except BrokerError as exc:
            print(f"bench: cannot start the broker: {exc}", file=sys.stderr)
            broke = True
    evidence = None if args.skip_evidence else _timed_section(
        "evidence-bench-", args.tmpdir, lambda tmp, context: run_evidence(
            tmp, args.evidence_mb, progress=progress, context=context))
    upload = None if args.skip_upload else _timed_section(
        "upload-bench-", args.tmpdir, lambda tmp, context: run_upload(
            tmp, segments=args.upload_mb // 8, segment_mb=8, link_mbit=args.upload_link_mbit,
            progress=progress, context=context))
    live = None if args.skip_live else _timed_section(
        "live-bench-", args.tmpdir, lambda tmp, context: run_live(
            tmp, args.live_seconds, progress=progress, context={"cpus": context["cpus"]}))
    gps = None if args.skip_gps else _timed_section(
        "gps-bench-", args.tmpdir, lambda tmp, context: run_gps(
            progress=progress, context={"cpus": context["cpus"]}))
    callback = None if args.skip_callback else _timed_section(
        "callback-bench-", args.tmpdir, lambda tmp, context: run_callback(
            tmp, progress=progress, context=context))
    console = None if args.skip_console else _timed_section(
        "console-bench-", args.tmpdir, lambda tmp, context: run_console(
            tmp, args.console_alerts, args.console_video_runs, progress=progress,
            context={"cpus": context["cpus"]},
            sos_stored=report.ours if report is not None else None))
    voice = None if args.skip_voice else _timed_section(
        "voice-bench-", args.tmpdir, lambda tmp, context: run_voice(
            tmp, args.voice_presses, progress=progress, context={"cpus": context["cpus"]}))
    audio = None if args.skip_audio else _timed_section(
        "audio-bench-", args.tmpdir, lambda tmp, context: AudioSection.run(progress))
    parts = (report, evidence, upload, live, gps, callback, console)
    if args.json:
        data = json.loads(combined_json(*parts))
        data.update({key: part.as_dict() for key, part in (("voice", voice), ("audio", audio))
                     if part is not None})
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        print("\n\n".join(part.as_table() for part in (*parts, voice, audio)
                           if part is not None))
    progress(f"done in {round(time.monotonic() - started, 1)} s")
    failed = any(part is not None and part.errors
                 for part in (evidence, upload, live, gps, callback, console, voice, audio))
    return 1 if broke or errors or failed else 0


class AudioSection:
    """bench/audio_bench.py's rows as a section: a table, a dict, errors and a context."""

    def __init__(self, rows: list[tuple[str, float]], errors: list[str]) -> None:
        self.rows, self.errors, self.context = rows, errors, {"cpus": os.cpu_count()}

    @classmethod
    def run(cls, progress: Callable[[str], None]) -> AudioSection:
        progress(f"audio: {audio_bench.SECONDS} s of sound through the recorder's path, "
                 "twice, beside the bare encoder")
        try:
            return cls(audio_bench.run(), [])
        except Exception as exc:  # PyAV without aac, say: reported, not raised
            return cls([], [f"audio: {type(exc).__name__}: {exc}"])

    def as_dict(self) -> dict[str, Any]:
        return {"context": self.context, "ms_cpu_per_s": dict(self.rows),
                "errors": self.errors}

    def as_table(self) -> str:
        out = ["audio in the evidence: CPU ms per second of sound, 64 kbit/s mono 48 kHz AAC, "
               "best of 2, one core of this machine (not the Pi's)", ""]
        out += [f"{name:70s} {value:8.2f}" for name, value in self.rows]
        if len(self.rows) == 2 and self.rows[0][1] > 0:
            floor, ours = self.rows[0][1], self.rows[1][1]
            out.append(f"sound costs {ours / 10:.2f}% of one core ({ours / floor:.2f}x the "
                       "bare encoder)")
        out += [f"ERROR: {e}" for e in self.errors]
        return "\n".join(out)


def _timed_section(prefix: str, tmpdir: Path | None,
                   run: Callable[[Path, dict[str, Any]], Any]) -> Any:
    """Run one section in its own temporary directory; its report gets `elapsed_s`."""
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=prefix, dir=tmpdir) as tmp:
        context = {"tmpdir": str(Path(tmp).parent), "filesystem": filesystem_of(Path(tmp)),
                   "cpus": os.cpu_count()}
        report = run(Path(tmp), context)
    report.context["elapsed_s"] = round(time.monotonic() - began, 1)
    return report


if __name__ == "__main__":
    sys.exit(main())
