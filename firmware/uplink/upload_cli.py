"""`sos-device upload --now`: one upload pass in the foreground, with a progress bar.

To a terminal the bar is redrawn in place (carriage return); otherwise (a log, a pipe) one line
is printed per finished segment. Then a summary: what was uploaded, refused and left for later.

Exit status: 0 when everything pending was uploaded and nothing is refused; 1 when a segment
was refused (now or before), something was left for later, or another upload (the daemon's)
is running; 2 when the configuration cannot work. Ctrl-C ends the pass after the chunk in
flight; what was sent is kept and the next pass resumes it.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from firmware.uplink.upload_plan import Progress, render_bar
from firmware.uplink.upload_settings import UploadSettings
from firmware.uplink.uploader import UploadSummary, uploader_from_config
from protocol.configfile import ConfigError


class ProgressPrinter:
    """`on_progress` for the uploader: redraws on a TTY, one line per segment otherwise."""

    def __init__(self, out: TextIO, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self._segments_done = -1
        self._drawn = False

    def __call__(self, progress: Progress) -> None:
        if self.tty:
            self.out.write("\r" + render_bar(progress))
            self._drawn = True
            self.out.flush()
        elif progress.segments_done != self._segments_done:
            self._segments_done = progress.segments_done
            if progress.segments_total:
                self.out.write(render_bar(progress) + "\n")
                self.out.flush()

    def end(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self.out.flush()


def summary_lines(summary: UploadSummary) -> list[str]:
    if summary.busy:
        return ["another upload is running on this device (the daemon's?); try again when it "
                "has finished"]
    mb = summary.bytes_sent / 1e6
    rate = f" ({mb / summary.elapsed_s:.1f} MB/s)" if summary.elapsed_s > 0 and mb else ""
    lines = [f"uploaded {summary.segments_uploaded} segment(s), sent {mb:.1f} MB in "
             f"{summary.elapsed_s:.1f} s{rate}, resent {summary.bytes_resent} bytes"]
    for seq, reason in sorted(summary.refused.items()):
        lines.append(f"REFUSED segment {seq:06d}: {reason} (kept on the device)")
    for seq, reason in sorted(summary.deferred.items()):
        lines.append(f"left for later: segment {seq:06d}: {reason}")
    if not summary.refused and not summary.deferred:
        lines.append("nothing left to upload")
    return lines


def _run_pass(uploader: Any, stop: threading.Event, outcome: dict[str, Any]) -> None:
    try:
        outcome["summary"] = uploader.run_once(stop)
    except BaseException as exc:  # handed to the main thread, which reports it
        outcome["error"] = exc


def upload_now(config_path: str | Path, *, retry_refused: bool = False,
               load_config: Callable[[str | Path], Any] | None = None,
               out: TextIO | None = None,
               uploader_options: dict[str, Any] | None = None) -> int:
    """`sos-device --config CONFIG upload --now [--retry-refused]` (firmware/cli.py parses
    it). The other keyword arguments are for tests: another config loader (it must give a
    DeviceConfig-like object with `upload: UploadSettings`), the output stream, and extra
    Uploader arguments (e.g. `client_factory`)."""
    out = out or sys.stdout
    if load_config is None:
        from firmware.config import load_device_config as load_config
    try:
        config = load_config(config_path)
        settings = getattr(config, "upload", None)
        if not isinstance(settings, UploadSettings):
            raise ConfigError(f"{config_path}: missing section '[upload]' (url = "
                              "\"https://ingest.example:8443\")")
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    printer = ProgressPrinter(out)
    try:
        uploader = uploader_from_config(config, settings, on_progress=printer,
                                        **(uploader_options or {}))
    except (OSError, sqlite3.Error) as exc:  # a TLS file, the data directory
        print(f"upload: cannot set up: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if retry_refused:
            again = uploader.retry_refused()
            if again:
                print(f"offering {len(again)} refused segment(s) again", file=out)
        # The pass runs on a worker: the Ctrl-C handler runs on this thread and sets `stop`,
        # which this thread must therefore never be waiting on (a handler interrupting a wait
        # on the same Event can deadlock); it waits in join() instead.
        outcome: dict[str, Any] = {}
        worker = threading.Thread(target=_run_pass, args=(uploader, stop, outcome),
                                  name="upload-pass")
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
        if "error" in outcome:
            raise outcome["error"]
        summary = outcome["summary"]
    except (OSError, sqlite3.Error) as exc:  # the card or the upload state, not the network
        print(f"upload: cannot run on this device's storage: {exc}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        printer.end()
        uploader.close()
        uploader.store.close()
    for line in summary_lines(summary):
        print(line, file=out)
    return 0 if summary.complete and not summary.refused else 1
