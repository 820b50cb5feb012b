"""Run a scenario end to end: private broker, control centre with an automatic operator, GPS
receivers on ptys, and virtual devices as real processes running the real firmware.

Times in a scenario are scenario seconds; `speed` compresses them (speed 4: four times faster).
Physical things are not compressed: a button hold lasts as long as a thumb holds it, so a step
never starts before the press before it has finished.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control_center import pki
from control_center.audit import AuditLog
from control_center.console import alert_line, event_line
from control_center.ingest import DirectoryStore, IngestServer
from control_center.live import LiveReceiver
from control_center.service import CenterEvent, CenterService, CommandError, FleetTrust
from control_center.store import Store
from protocol import utc_iso
from simulator.broker import HOST, PrivateBroker
from simulator.device_config import render_device_toml
from simulator.gps_receiver import PtyGps, RouteReceiver
from simulator.processes import DeviceProcess, Entry, Recorder
from simulator.recordings import recording_results
from simulator.scenario import DeviceSpec, Scenario, Step

OPERATOR = "auto-operator"
PRESS_SETTLE_S = 0.2  # after a press is played, before the next step may start


@dataclass
class RunResult:
    scenario: str
    speed: float
    ok: bool
    alerts: list[dict[str, Any]]
    expected_alerts: int
    problems: list[str]
    workdir: str
    entries: list[Entry] = field(repr=False, default_factory=list)
    recordings: dict[str, Any] | None = None  # recording, upload, live (scenarios with a camera)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "speed": self.speed,
            "ok": self.ok,
            "expected_alerts": self.expected_alerts,
            "alerts": self.alerts,
            "problems": self.problems,
            "workdir": self.workdir,
        } | (self.recordings or {})


class AutoOperator:
    """Acknowledges every new alert after a delay, then closes it after another."""

    def __init__(self, service: CenterService, recorder: Recorder, ack_delay_s: float,
                 close_delay_s: float) -> None:
        self.service = service
        self.recorder = recorder
        self.ack_delay_s = ack_delay_s
        self.close_delay_s = close_delay_s
        self._timers: list[threading.Timer] = []
        self._stopped = threading.Event()

    def on_new_alert(self, alert_id: str) -> None:
        self._later(self.ack_delay_s, self._decide, alert_id, "ack")

    def _later(self, delay: float, fn, *args: Any) -> None:
        if self._stopped.is_set():
            return
        timer = threading.Timer(delay, fn, args=args)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _decide(self, alert_id: str, decision: str) -> None:
        if self._stopped.is_set():
            return
        issued = time.time()
        try:
            self.service.send_command(alert_id, decision, OPERATOR)
        except CommandError as exc:
            self.recorder.add("operator", "error", f"{decision} {alert_id[:8]} failed: {exc}; "
                              "retrying in 1 s", alert_id=alert_id)
            self._later(1.0, self._decide, alert_id, decision)
            return
        verb = "acknowledged" if decision == "ack" else "closed"
        self.recorder.add("operator", decision, f"{verb} {alert_id[:8]}", wall=issued,
                          alert_id=alert_id)
        if decision == "ack":
            self._later(self.close_delay_s, self._decide, alert_id, "close")

    def stop(self) -> None:
        self._stopped.set()
        for timer in self._timers:
            timer.cancel()


class ScenarioRun:
    def __init__(self, scenario: Scenario, workdir: Path, *, speed: float = 1.0, seed: int = 1,
                 recorder: Recorder | None = None, fleet_dir: Path | None = None,
                 port: int | None = None, provisioned: dict[str, Path] | None = None) -> None:
        """`provisioned`: device id -> the root a `sos-provision` wrote; that device
        runs from its own config and keys there (on `fleet_dir`'s broker at `port`)."""
        self.scenario = scenario
        self.workdir = workdir
        self.speed = speed
        self.seed = seed
        self.recorder = recorder or Recorder()
        self.broker = PrivateBroker(workdir / "broker", port=port, fleet_dir=fleet_dir)
        self.provisioned = provisioned or {}
        self.store = Store(workdir / "center.sqlite")
        self.ingest: IngestServer | None = None
        self.live: LiveReceiver | None = None
        if scenario.records:  # evidence comes home by upload; the live view during an SOS
            fleet = self.broker.fleet
            # Its own loopback certificate, in the run's directory: never over a deployment's
            # ingest certificate in a fleet passed with --fleet.
            server = pki.issue_server_cert(fleet.ca, workdir / "server", "ingest",
                                           [HOST, "localhost"])
            self.ingest = IngestServer(
                fleet, DirectoryStore(workdir / "evidence"), AuditLog(workdir / "audit.jsonl"),
                workdir=workdir / "ingest", cert_file=server.cert_file,
                key_file=server.key_file, host=HOST, on_event=self._ingest_event)
            self.live = LiveReceiver(fleet.live_identity_file, workdir / "live",
                                     FleetTrust(fleet))
        self.center = self.broker.centre_service(self.store, on_event=self._center_event,
                                                 live=self.live)
        self.operator = AutoOperator(self.center, self.recorder,
                                     scenario.operator_ack_delay_s / speed,
                                     scenario.operator_close_delay_s / speed)
        self.gps: dict[str, PtyGps] = {}
        self.devices: dict[str, DeviceProcess] = {}
        self._abort = threading.Event()

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> RunResult:
        rec = self.recorder
        try:
            self.broker.start()
            if self.ingest is not None:
                self.ingest.start()
                rec.add("sim", "setup", f"evidence ingest on {self.ingest.url}/files/ "
                        "(tus, mutual TLS)")
            self.center.start()
            rec.add("sim", "setup", f"broker on {self.broker.centre.host}:{self.broker.port} "
                    "(mutual TLS, each identity confined), control centre subscribed")
            for spec in self.scenario.devices:
                self._start_device(spec)
            for device_id in self.devices:
                if not rec.wait_for(lambda es, d=device_id: any(
                        e.source == d and e.kind == "link" and e.data["up"] for e in es), 30):
                    rec.add("sim", "problem", f"{device_id} never connected")
            self._play_timeline()
            rec.wait_for(lambda es: self._finished(), self._remaining())
        finally:
            self._shutdown()
        return self._result()

    def _start_device(self, spec: DeviceSpec) -> None:
        port = None
        if spec.gps:
            g = spec.gps
            receiver = RouteReceiver(
                [tuple(p) for p in g["route"]], speed_mps=g.get("speed_mps", 12.0),
                start_utc=datetime.now(UTC), seed=self.seed, noise_m=g.get("noise_m", 3.0),
                dropouts=[tuple(d) for d in g.get("dropouts", [])],
            )
            self.gps[spec.id] = PtyGps(receiver, speed=self.speed,
                                       drift_ppm=g.get("drift_ppm", 0.0))
            self.gps[spec.id].start()
            port = self.gps[spec.id].port
        directory = self.workdir / "devices" / spec.id
        directory.mkdir(parents=True, exist_ok=True)
        if spec.id in self.provisioned:
            config = self.provisioned[spec.id] / "etc" / "sos-device" / "device.toml"
        else:
            config = directory / "device.toml"
            config.write_text(self._device_config(spec, directory, port))
        process = DeviceProcess(spec.id, config, directory / "device.log", self.recorder,
                                spec.battery, gps_port=port)
        self.devices[spec.id] = process
        process.start()

    def _device_config(self, spec: DeviceSpec, directory: Path, gps_port: str | None) -> str:
        return render_device_toml(
            device_id=spec.id, profile=spec.profile, data_dir=directory / "data",
            broker=self.broker, gps_port=gps_port, surveyed=spec.surveyed,
            position_interval_s=max(1.0, 5.0 / self.speed), camera=spec.camera,
            segment_s=spec.segment_s / self.speed, preroll_s=min(30.0, 10.0 / self.speed),
            upload_url=self.ingest.url if self.ingest and spec.camera else None)

    def _play_timeline(self) -> None:
        self._t0 = time.monotonic()
        free_at = self._t0
        for number, step in enumerate(self.scenario.timeline):
            due = max(self._t0 + step.at_s / self.speed, free_at)
            if self._abort.wait(max(0.0, due - time.monotonic())):
                return
            try:
                free_at = self._perform(step, number)
            except RuntimeError as exc:  # e.g. a device process that died: a finding, not a crash
                self.recorder.add("sim", "problem", f"step at {step.at_s} s ({step.action}): {exc}")
                free_at = time.monotonic()

    def _perform(self, step: Step, number: int) -> float:
        """Carry out one step; return when the next one may start at the earliest."""
        rec, now = self.recorder, time.monotonic()
        match step.action:
            case "press":
                self.devices[step.device].send({"op": "press", "hold_s": step.hold_s,
                                                "seed": self.seed * 1000 + number})
                rec.add("sim", "press", f"{step.device}: press for {step.hold_s} s",
                        device=step.device, hold_s=step.hold_s, expect_alert=step.expect_alert)
                return now + (step.hold_s or 0) + PRESS_SETTLE_S
            case "cancel":
                self.devices[step.device].send({"op": "cancel", "seed": number})
                return now + 5.0
            case "kill":
                self.devices[step.device].kill()
                rec.add("sim", "kill", f"{step.device}: process killed with SIGKILL")
            case "start":
                self.devices[step.device].start()
                rec.add("sim", "start", f"{step.device}: process started again")
            case "broker_stop":
                self.broker.stop()
                rec.add("sim", "broker", "broker STOPPED")
            case "broker_start":
                self.broker.start()
                rec.add("sim", "broker", "broker started again")
            case "call_start" | "call_end":
                try:
                    self.center.send_call(step.device, step.action, "dispatch", step.call_id)
                except CommandError as exc:
                    rec.add("sim", "problem", f"{step.action} to {step.device} failed: {exc}")
                else:
                    what = f"call {step.call_id} started" if step.call_id else "call ended"
                    rec.add("dispatch", step.action, f"{step.device}: {what}",
                            device=step.device, call_id=step.call_id)
            case "dock" | "undock":
                self.devices[step.device].send({"op": step.action})
                rec.add("sim", step.action, f"{step.device}: "
                        + ("put on its dock at the station" if step.action == "dock"
                           else "taken off its dock"), device=step.device)
        return now

    def _remaining(self) -> float:
        return max(0.0, self._t0 + self.scenario.duration_s / self.speed - time.monotonic())

    def _finished(self) -> bool:
        alerts = self.store.alerts(open_only=False)
        return (len(alerts) >= self.scenario.expected_alerts
                and all(self._uploaded(s.device) for s in self.scenario.timeline
                        if s.action == "dock")
                and all(a.status == "closed" for a in alerts)
                and all(self._feedback_after(a.alert_id)[-1:] == ["idle"] for a in alerts))

    def _uploaded(self, device_id: str | None) -> bool:
        """The device finished an upload pass after its last docking, with nothing left."""
        docked = self.recorder.find(kind="dock", device=device_id)
        if not docked:
            return False
        return any(e.data.get("remaining") == 0 and not e.data.get("deferred")
                   for e in self.recorder.find(source=device_id, kind="upload")
                   if e.wall >= docked[-1].wall)

    def _ingest_event(self, entry: dict[str, Any]) -> None:
        event = entry.get("event")
        if event in ("segment_stored", "segment_refused"):
            what = "stored and receipted" if event == "segment_stored" else "REFUSED"
            self.recorder.add("ingest", event, f"{entry.get('device_id')} segment "
                              f"{entry.get('seq', 0):06d} {what}"
                              + (f": {entry['reason']}" if entry.get("reason") else ""),
                              device=entry.get("device_id"), seq=entry.get("seq"))

    def _center_event(self, event: CenterEvent) -> None:
        m = event.message
        if event.kind == "alert":
            if event.new:
                self.recorder.add("centre", "alert", alert_line(m), alert_id=m["alert_id"])
                self.operator.on_new_alert(m["alert_id"])
            else:
                self.recorder.add("centre", "duplicate", f"duplicate of {m['alert_id'][:8]} "
                                  "dropped", alert_id=m["alert_id"])
        elif event.kind == "position" and event.new:
            p = m["position"]
            where = f"{p['lat']:.5f},{p['lon']:.5f}" if p["lat"] is not None else "unknown"
            self.recorder.add("centre", "position", f"position of {m['alert_id'][:8]}: {where} "
                              f"({p['source']})", alert_id=m["alert_id"])
        elif event.kind == "live":
            if not event.new:
                self.recorder.add("centre", "problem", f"live chunk from {event.device_id} "
                                  f"refused: {m.get('reason')}")
                return
            if m["seq"] == 0:
                behind = m["latency_newest_ms"] or 0
                self.recorder.add("centre", "live", f"live view of {str(m['alert_id'])[:8]} is "
                                  f"playing ({behind:.0f} ms behind the camera)",
                                  alert_id=m["alert_id"])
            self.recorder.add("centre", "live_chunk", f"live chunk {m['seq']}",
                              alert_id=m["alert_id"], latency_ms=m["latency_newest_ms"])
        elif event.kind == "event" and event.new:
            self.recorder.add("centre", "event", event_line(m).strip(),
                              alert_id=m.get("alert_id"))

    def _shutdown(self) -> None:
        self._abort.set()
        self.operator.stop()
        for device in self.devices.values():
            device.stop()
        for gps in self.gps.values():
            gps.stop()
        self.center.stop()
        if self.ingest is not None:
            self.ingest.stop()
        self.broker.stop()

    # -- results ---------------------------------------------------------------------------------
    def _feedback_after(self, alert_id: str) -> list[str]:
        """The feedback states the alert's device showed from its trigger on, in order."""
        triggers = self.recorder.find(kind="trigger", alert_id=alert_id)
        if not triggers:
            return []
        start = triggers[0]
        states = [e.data["state"] for e in self.recorder.find(source=start.source, kind="feedback")
                  if e.wall >= start.wall]
        # A restarted process starts idle before it restores the alert (not something a person
        # sees), and shows the restored state again: keep each run of one state once.
        shown = [s for i, s in enumerate(states) if not (s == "idle" and i + 1 < len(states))]
        return [s for i, s in enumerate(shown) if i == 0 or s != shown[i - 1]]

    def _result(self) -> RunResult:
        problems = [e.text for e in self.recorder.find(kind="problem")]
        alerts = []
        for record in self.store.alerts(open_only=False):
            trigger = next(iter(self.recorder.find(kind="trigger", alert_id=record.alert_id)), None)
            presses = [e for e in self.recorder.find(kind="press", device=record.device_id)
                       if trigger is None or e.wall <= trigger.wall]
            ack = next(iter(self.recorder.find(kind="ack", alert_id=record.alert_id)), None)
            shown_ack = None
            if ack is not None:
                shown_ack = next((e for e in self.recorder.find(source=record.device_id,
                                                                kind="feedback")
                                  if e.wall >= ack.wall and e.data["state"] == "acknowledged"),
                                 None)
            stores = self.recorder.find(kind="alert", alert_id=record.alert_id)
            feedback = self._feedback_after(record.alert_id)
            alerts.append({
                "alert_id": record.alert_id,
                "device_id": record.device_id,
                "device_kind": record.device_kind,
                "pressed_at": _iso(presses[-1].wall) if presses else None,
                "triggered_at": _iso(trigger.wall) if trigger else None,
                "stored_at": _iso(record.stored_at),
                "acked_at": _iso(ack.wall) if ack else None,
                "latency_ms": _ms(record.stored_at - trigger.wall) if trigger else None,
                "ack_latency_ms": _ms(shown_ack.wall - ack.wall) if shown_ack and ack else None,
                # Times the centre stored it: 1 by construction (the store de-duplicates by
                # alert id); exactly-once per press is checked by the expected-alerts count.
                "deliveries": len(stores),
                "duplicates_dropped": record.duplicates,
                "position_source": record.position["source"],
                "position_updates": sum(1 for u in self.store.updates(record.alert_id)
                                        if u["kind"] == "position"),
                "device_restarts": max(0, self.devices[record.device_id].starts - 1),
                "feedback": feedback,
                "decisions": decision_outcomes(self.store.commands(record.alert_id)),
            })
        expected = self.scenario.expected_alerts
        if len(alerts) != expected:
            problems.append(f"expected {expected} alert(s), the centre stored {len(alerts)}")
        for a in alerts:
            if a["acked_at"] is None:
                problems.append(f"alert {a['alert_id'][:8]} was never acknowledged")
            elif "acknowledged" not in a["feedback"]:
                problems.append(f"alert {a['alert_id'][:8]}: the device never showed "
                                "acknowledged")
            problems += decision_problems(a["alert_id"], a["decisions"])
        recordings = None
        if self.scenario.records:
            recordings = recording_results(self, alerts)
            problems += recordings.pop("problems")
        self.store.close()
        return RunResult(self.scenario.name, self.speed, not problems, alerts, expected, problems,
                         str(self.workdir), list(self.recorder.entries), recordings)


def decision_outcomes(commands: list[dict[str, Any]]) -> dict[str, str]:
    """What became of each operator decision on an alert (Store.commands), by type: `applied`
    once any of its commands (a re-send included) was applied on the device; otherwise what
    its latest command got: `rejected: <reason_code>`, or `no answer`."""
    outcomes: dict[str, str] = {}
    for command in commands:
        kind = command["type"]
        if outcomes.get(kind) == "applied":
            continue
        if command["status"] == "applied":
            outcomes[kind] = "applied"
        elif command["status"] == "rejected":
            outcomes[kind] = f"rejected: {command['reason_code'] or 'no reason code'}"
        else:
            outcomes[kind] = "no answer"
    return outcomes


def decision_problems(alert_id: str, outcomes: dict[str, str]) -> list[str]:
    """A run is ok only if every decision the operator made was applied on the device."""
    return [f"alert {alert_id[:8]}: the operator's {kind} was not applied on the device "
            f"({outcome})" for kind, outcome in outcomes.items() if outcome != "applied"]


def _iso(wall: float) -> str:
    return utc_iso(datetime.fromtimestamp(wall, UTC))


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def dumps(result: RunResult) -> str:
    return json.dumps(result.to_json(), indent=2)
