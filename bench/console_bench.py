"""Operator console: how soon an open console page shows a new alert, and plays its live video.

`python -m bench.console_bench [ALERTS [VIDEO_RUNS]]` (default 30 and 3) starts a private
Mosquitto (mutual TLS, the fleet's ACL), the centre with its live view and its web console over
HTTPS (simulator.console_rig: as `sos-center serve` runs them), and Debian's headless Chromium
logged in to the console as an operator, the page loaded before anything is sent. Then:

  stored -> row visible     ALERTS alerts, one at a time, from a few enrolled devices, each
                            published as a device does (signed with the device's key, MQTT QoS
                            1 with its own certificate): from the centre's `stored_at` (after
                            the store's commit) to the page's own `rowShownAt` (the row is in
                            the document); also from the moment just before the publish
  stored -> video playing   VIDEO_RUNS SOS presses on a virtual pillar process with its
                            synthetic camera (the real firmware: live chunks, age, signatures).
                            The page is loaded afresh before each press with nothing selected;
                            it selects a new SOS by itself and plays its live view (no click).
                            To the page's `videoPlayingAt` (the first 'playing' event)

Browser, centre and devices share one machine and one clock (the page's times are epoch ms from
performance.timeOrigin + performance.now()). Targets: a row within 250 ms of the alert being
stored (p99), the video playing within 2 s.

`run_console(tmpdir)` returns a `bench.report.ConsoleReport` (the section of `python -m bench`);
without chromium, chromedriver or selenium the report carries the reason instead of numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocol import MessageKind, Topics, encode, new_id, utc_iso
from protocol.mqtt import BrokerConfig, make_client
from protocol.signing import Signer, load_or_make_key
from simulator.broker import PrivateBroker
from simulator.device_config import render_device_toml
from simulator.processes import DeviceProcess, Recorder

from .report import ConsoleReport
from .stats import Summary, summarise

ROW_TARGET_MS = 250.0
VIDEO_TARGET_MS = 2000.0
DEVICES = 5
WARMUP = 3  # uncounted alerts first: the page's first render, the centre's first insert
PILLAR = "bench-pil-01"
SURVEYED = {"lat": 52.37888, "lon": 4.90030, "accuracy_m": 1.0}
NO_POSITION = {"source": "none", "lat": None, "lon": None, "alt_m": None, "accuracy_m": None,
               "fix_time": None, "age_s": None}
TIMEOUT_S = 20.0


class ConsoleBenchError(RuntimeError):
    pass


class DevicePublisher:
    """One enrolled device's MQTT connection (its own certificate) and signing key: publishes
    alerts exactly as the firmware's uplink does, without the firmware's button and outbox."""

    def __init__(self, broker: PrivateBroker, device_id: str) -> None:
        self.device_id = device_id
        config: BrokerConfig = broker.identity(device_id)
        self.signer = Signer(load_or_make_key(broker.signing_key_file(device_id)))
        self.topic = Topics(device_id).alert
        self.seq = 0
        connected = threading.Event()
        self.client = make_client(device_id, config)
        self.client.on_connect = lambda *args: connected.set()
        self.client.connect(config.host, config.port)
        self.client.loop_start()
        if not connected.wait(TIMEOUT_S):
            raise ConsoleBenchError(f"{device_id} could not connect to the broker")

    def publish_alert(self) -> tuple[str, float]:
        """Send one new alert; (its id, epoch s just before the publish)."""
        self.seq += 1
        message = self.signer.sign({
            "v": 1, "alert_id": new_id(), "device_id": self.device_id, "device_kind": "token",
            "seq": self.seq, "trigger": "button_hold", "created_at": utc_iso(datetime.now(UTC)),
            "position": NO_POSITION, "battery": {"percent": 80.0, "charging": False}})
        payload = encode(MessageKind.ALERT, message)
        sent = time.time()
        self.client.publish(self.topic, payload, qos=1)
        return message["alert_id"], sent

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def page_time(driver: Any, table: str, alert_id: str, timeout_s: float) -> float:
    """window.sosConsole[table][alert_id] (epoch ms), waiting for it with Selenium's wait."""
    from simulator.browser import wait_until

    return float(wait_until(driver, lambda d: d.execute_script(
        "const c = window.sosConsole; return (c && c[arguments[0]][arguments[1]]) || null;",
        table, alert_id), timeout=timeout_s, what=f"{table} of alert {alert_id[:8]}"))


def measure_rows(rig: Any, driver: Any, broker: PrivateBroker, alerts: int,
                 warmup: int = WARMUP) -> tuple[list[float], list[float]]:
    """(stored -> row visible, publish -> row visible) in s, one alert at a time, round robin
    over DEVICES devices."""
    publishers = [DevicePublisher(broker, f"bench-tok-{i:02d}") for i in range(DEVICES)]
    stored_to_row: list[float] = []
    sent_to_row: list[float] = []
    try:
        for i in range(warmup + alerts):
            alert_id, sent = publishers[i % DEVICES].publish_alert()
            shown_ms = page_time(driver, "rowShownAt", alert_id, TIMEOUT_S)
            rig.wait_for(lambda a=alert_id: rig.store.alert(a) is not None, TIMEOUT_S)
            stored = rig.store.alert(alert_id).stored_at
            if i >= warmup:
                stored_to_row.append(shown_ms / 1000 - stored)
                sent_to_row.append(shown_ms / 1000 - sent)
    finally:
        for publisher in publishers:
            publisher.close()
    return stored_to_row, sent_to_row


@contextlib.contextmanager
def pillar_process(broker: PrivateBroker, workdir: Path) -> Iterator[tuple[DeviceProcess,
                                                                           Recorder]]:
    """The virtual pillar as a real process with its synthetic camera, connected."""
    directory = workdir / PILLAR
    directory.mkdir(parents=True)
    config = directory / "device.toml"
    config.write_text(render_device_toml(
        device_id=PILLAR, profile="pillar", data_dir=directory / "data", broker=broker,
        surveyed=dict(SURVEYED), camera=True, segment_s=2.0, preroll_s=2.0))
    recorder = Recorder()
    process = DeviceProcess(PILLAR, config, directory / "device.log", recorder, battery=None)
    process.start()
    try:
        if not recorder.wait_for(lambda es: any(e.kind == "link" and e.data["up"]
                                                for e in es), TIMEOUT_S):
            raise ConsoleBenchError(f"the pillar process never connected (log: "
                                    f"{directory / 'device.log'})")
        yield process, recorder
    finally:
        process.stop()


def measure_video(rig: Any, driver: Any, broker: PrivateBroker, workdir: Path,
                  runs: int) -> list[float]:
    """stored -> live video playing in the page, in s: the page selects the new SOS itself."""
    from simulator.browser import wait_until

    samples: list[float] = []
    with pillar_process(broker, workdir) as (process, recorder):
        for run in range(runs):
            driver.refresh()  # nothing selected: the page takes the new SOS by itself
            wait_until(driver, lambda d: d.execute_script(
                "return !!(window.sosConsole && window.sosConsole.ready) && "
                "window.sosConsole.selected() == null"), what="a fresh page")
            before = len(recorder.find(kind="trigger"))
            process.send({"op": "press", "hold_s": 0.3, "seed": run + 1})
            if not recorder.wait_for(lambda es, n=before: sum(e.kind == "trigger"
                                                              for e in es) > n, TIMEOUT_S):
                raise ConsoleBenchError(f"press {run}: the pillar raised no alert")
            alert_id = recorder.find(kind="trigger")[-1].data["alert_id"]
            playing_ms = page_time(driver, "videoPlayingAt", alert_id, TIMEOUT_S)
            stored = rig.store.alert(alert_id).stored_at
            samples.append(playing_ms / 1000 - stored)
            closed = len(recorder.find(kind="feedback", state="closed"))
            rig.service.send_command(alert_id, "close", "bench")
            if not recorder.wait_for(lambda es, n=closed: sum(
                    e.kind == "feedback" and e.data.get("state") == "closed"
                    for e in es) > n, TIMEOUT_S):
                raise ConsoleBenchError(f"press {run}: the pillar never showed 'closed'")
    return samples


def console_rows(tmpdir: Path, alerts: int = 30, video_runs: int = 3, *,
                 progress: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Measure both parts (see the module docstring): {"browser", "rows": [Summary],
    "video": Summary | None, "errors": [...]}; raises if the set-up fails."""
    from simulator.browser import chromium, log_in
    from simulator.console_rig import PASSWORD, ConsoleRig

    found: dict[str, Any] = {"browser": None, "rows": [], "video": None, "errors": []}
    with PrivateBroker(tmpdir / "broker") as broker:
        rig = ConsoleRig(tmpdir / "centre", broker)
        rig.start()
        driver = None
        try:
            driver = chromium(rig.cert_file, tmpdir / "profile")
            found["browser"] = f"Chromium {driver.capabilities.get('browserVersion', '?')}"
            log_in(driver, rig.url, "alice", PASSWORD)
            progress(f"console: {WARMUP} + {alerts} alerts into the open page")
            try:
                stored, sent = measure_rows(rig, driver, broker, alerts)
                found["rows"] = [
                    summarise("console_stored_row",
                              "console: alert stored -> row visible in the browser", stored),
                    summarise("console_publish_row",
                              "console: device publish -> row visible in the browser", sent)]
            except Exception as exc:  # timeouts, a broken page: reported, then the video
                found["errors"].append(f"rows: {type(exc).__name__}: {exc}")
            if video_runs:
                progress(f"console: {video_runs} presses on a pillar with a camera, until its "
                         "live video plays in the page")
                try:
                    video = measure_video(rig, driver, broker, tmpdir / "devices", video_runs)
                    found["video"] = summarise(
                        "console_video", "console: alert stored -> live video playing",
                        video)
                except Exception as exc:
                    found["errors"].append(f"video: {type(exc).__name__}: {exc}")
        finally:
            if driver is not None:
                with contextlib.suppress(Exception):
                    driver.quit()
            rig.stop()
    return found


def run_console(tmpdir: Path, alerts: int = 30, video_runs: int = 3, *,
                progress: Callable[[str], None] = lambda text: None,
                context: dict[str, Any] | None = None,
                sos_stored: Summary | None = None) -> ConsoleReport:
    """`console_rows` as the operator console section of `python -m bench`; `sos_stored`: the
    SOS section's trigger -> stored line, shown above this section's own (when it ran)."""
    from simulator.console_watch import why_not_here

    if sos_stored is not None:
        sos_stored = dataclasses.replace(
            sos_stored, label="SOS:   trigger recognised -> alert stored (the SOS section)")
    report = ConsoleReport(row_target_ms=ROW_TARGET_MS, video_target_ms=VIDEO_TARGET_MS,
                           alerts=alerts, devices=DEVICES, video_runs=video_runs,
                           sos_stored=sos_stored, context=dict(context or {}))
    report.why_not = why_not_here()
    if report.why_not:
        progress(f"console: skipped ({report.why_not})")
        return report
    try:
        found = console_rows(Path(tmpdir), alerts, video_runs, progress=progress)
    except Exception as exc:  # broker, browser, log-in: report them and go on
        report.errors.append(f"console: {type(exc).__name__}: {exc}")
        return report
    report.context["browser"] = found["browser"]
    report.rows, report.video = found["rows"], found["video"]
    report.errors += found["errors"]
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    alerts = int(args[0]) if args else 30
    video_runs = int(args[1]) if len(args) > 1 else 3
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        report = run_console(Path(tmp), alerts, video_runs,
                             progress=lambda text: print(f"bench: {text}", file=sys.stderr),
                             context={"cpus": os.cpu_count()})
    print(report.as_table())
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
