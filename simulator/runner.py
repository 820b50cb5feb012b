"""Run a scenario end to end: private broker, control centre with an automatic operator and its
web console, GPS receivers on ptys, and virtual devices as real processes running the real
firmware; optionally the console open in headless Chromium, timing each alert's row.

Pillars and tokens have sound: their microphone plays the citizen's espeak-ng clip (a token's
hears the scene), made once per run in the work directory (simulator/voice_media.py). With the
browser, an operator on duty also answers each pillar's SOS by voice at once, in a second
headless Chromium whose fake microphone plays the operator's clip (simulator/voice_answerer.py),
and the run measures press -> voice connected and whether each side heard the other. The
automatic operator closes such an alert only once the call has been measured: a conversation,
like a button hold, is not compressed by `speed`.

Times in a scenario are scenario seconds; `speed` compresses them (speed 4: four times faster).
Physical things are not compressed: a button hold lasts as long as a thumb holds it, so a step
never starts before the press before it has finished.

A scenario with `[[routes]]` (or a `[webhook]`) routes and escalates its alerts as `sos-center
serve` does: the centre writes each alert's desks and rule, an AlertRouting beside it escalates
untaken alerts and sends the signed webhooks, to a receiver the run starts
(simulator/webhook_receiver.py). Its desks' `escalate_after_s` are scenario seconds like every
other time in a scenario, so the run divides them by `speed`.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control_center import pki
from control_center.alert_routing import AlertRouting
from control_center.audit import AuditLog
from control_center.config import ConsoleConfig, console_config, implicit_routes
from control_center.console import alert_line, event_line
from control_center.escalation import Step as EscalationStep
from control_center.ingest import DirectoryStore, IngestServer
from control_center.live import LiveReceiver
from control_center.routing import RouteTable
from control_center.service import CenterEvent, CenterService, CommandError, FleetTrust
from control_center.store import Store
from control_center.web.accounts import Accounts
from control_center.web.launch import RunningConsole, start_console
from control_center.webhook import Delivery, WebhookTarget
from protocol import utc_iso
from simulator import console_watch, voice_answerer
from simulator.broker import HOST, PrivateBroker
from simulator.console_watch import ROW_DEADLINE_S, ConsoleWatcher
from simulator.device_config import render_device_toml
from simulator.gps_receiver import PtyGps, RouteReceiver
from simulator.processes import DeviceProcess, Entry, Recorder
from simulator.recordings import recording_results
from simulator.scenario import DeviceSpec, Scenario, Step
from simulator.voice_answerer import VoiceAnswer, VoiceAnswerer
from simulator.voice_media import EspeakMissing, VoiceClip, citizen_wav, operator_wav
from simulator.webhook_receiver import Notification, WebhookReceiver

OPERATOR = "auto-operator"
CONSOLE_USER = "operator"  # the console account a person logs in with (password: per run)
PRESS_SETTLE_S = 0.2  # after a press is played, before the next step may start
# How often the escalation watch looks (wall seconds, not scaled): a step is announced at most
# this late, small against any scenario's escalate_after_s.
ESCALATION_INTERVAL_S = 0.2
WEBHOOK_NAME = "sim-receiver"
# After the last alert is closed: how long the webhooks still queued (its `closed`) may take to
# arrive before the run calls them undelivered (a delivery retried once waits 1 s).
WEBHOOK_DRAIN_S = 10.0
SPEAKER_WAV = "speaker.wav"  # a device with sound: its speaker plays into data_dir/speaker.wav
# (firmware/voice/setup.py), here read to check the caller heard the operator


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
    console: dict[str, Any] | None = None  # url, user, browser, why_not, alerts (row shown)
    webhook: dict[str, Any] | None = None  # received (by event), duplicates, bad_signatures

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "speed": self.speed,
            "ok": self.ok,
            "expected_alerts": self.expected_alerts,
            "alerts": self.alerts,
            "problems": self.problems,
            "workdir": self.workdir,
        } | (self.recordings or {}) | ({"console": self.console} if self.console else {}) \
            | ({"webhook": self.webhook} if self.webhook is not None else {})


class ConsoleStartError(RuntimeError):
    """The run's web console could not start (`--console-port` taken, say)."""


class AutoOperator:
    """Acknowledges every new alert after a delay, then closes it after another. An alert the
    scenario says to ignore is acknowledged only after `ignore`'s longer wait: untaken until
    then, it escalates, and acknowledged at last, it ends like any other so the run can end."""

    def __init__(self, service: CenterService, recorder: Recorder, ack_delay_s: float,
                 close_delay_s: float) -> None:
        self.service = service
        self.recorder = recorder
        self.ack_delay_s = ack_delay_s
        self.close_delay_s = close_delay_s
        self._timers: list[threading.Timer] = []
        self._stopped = threading.Event()
        self._holds: dict[str, threading.Event] = {}

    def hold_close(self, alert_id: str, until: threading.Event) -> None:
        """Close the alert no sooner than `until` is set (a voice call still being measured:
        closing the alert ends the call)."""
        self._holds[alert_id] = until

    def on_new_alert(self, alert_id: str) -> None:
        self._later(self.ack_delay_s, self._decide, alert_id, "ack")

    def ignore(self, alert_id: str, for_s: float) -> None:
        """Leave the alert untaken for `for_s` (wall seconds), then acknowledge it."""
        self._later(for_s, self._decide, alert_id, "ack")

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
        held = self._holds.get(alert_id)
        if decision == "close" and held is not None and not held.is_set():
            self._later(0.1, self._decide, alert_id, decision)  # the call is still on
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
                 port: int | None = None, provisioned: dict[str, Path] | None = None,
                 browser: bool = False, console_port: int = 0) -> None:
        """`provisioned`: device id -> the root a `sos-provision` wrote; that device
        runs from its own config and keys there (on `fleet_dir`'s broker at `port`).

        The centre always has its web console beside it (on `console_port`, 0: a free one),
        as `sos-center serve` with a `[console]` section has, so a person can watch a run.
        `browser`: also open it in headless Chromium and time each alert's row (press -> row
        visible); off by default, since starting a browser costs seconds."""
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
        self.routing: AlertRouting | None = None
        self.receiver: WebhookReceiver | None = None
        self._pressed_with: dict[str, str | None] = {}  # device -> its last press's `operator`
        self._ignored: set[str] = set()  # alerts the operator left untaken: they must escalate
        # What AlertRouting knew when it stopped (its connections close with it), for the result.
        self._steps: dict[str, list[dict[str, Any]]] = {}
        self._deliveries: list[Delivery] | None = None
        router: dict[str, Any] = {}
        if scenario.routed:
            routes = scaled_routes(scenario.routes or implicit_routes(), speed)
            self.routing = AlertRouting(self.store, routes, self._webhook_targets(),
                                        on_step=self._escalated,
                                        interval_s=ESCALATION_INTERVAL_S)
            router["router"] = routes.route_at
        self.center = self.broker.centre_service(self.store, on_event=self._center_event,
                                                 live=self.live, **router)
        self.console: RunningConsole | None = None
        self.console_password = secrets.token_urlsafe(12)  # 16 characters, new every run
        self.console_config = self._console_config(console_port)
        self.browser = browser
        self.watcher: ConsoleWatcher | None = None
        self._watcher_password = secrets.token_urlsafe(12)
        self.answerer: VoiceAnswerer | None = None
        self._answerer_password = secrets.token_urlsafe(12)
        self.citizen: VoiceClip | None = None  # the devices' microphones (None: no sound)
        self.operator_voice: VoiceClip | None = None  # the answering browser's microphone
        self.no_sound: str | None = None  # why the devices have no sound, if they have none
        self._speakers: dict[str, Path] = {}  # pillar with sound -> its speaker's WAV
        self._accounts(browser)
        self.operator = AutoOperator(self.center, self.recorder,
                                     scenario.operator_ack_delay_s / speed,
                                     scenario.operator_close_delay_s / speed)
        self.gps: dict[str, PtyGps] = {}
        self.devices: dict[str, DeviceProcess] = {}
        self._abort = threading.Event()
        self._rows: dict[str, float | None] = {}
        self._answers: dict[str, VoiceAnswer] = {}
        self._stopped = False

    # -- routing, escalation, the webhook receiver ---------------------------------------------
    def _webhook_targets(self) -> list[WebhookTarget]:
        """With `[webhook]`: a receiver on loopback (its certificate from the run's fleet CA,
        which the target trusts through `ca_file`) and the target that sends to it, signed
        with a secret new every run."""
        spec = self.scenario.webhook
        if spec is None:
            return []
        secret = secrets.token_hex(32).encode()  # as `openssl rand -hex 32` makes one
        self.receiver = WebhookReceiver(self.broker.fleet.ca, self.workdir / "webhook-tls",
                                        secret, host=HOST, on_notification=self._notified)
        return [WebhookTarget(name=WEBHOOK_NAME, url=self.receiver.url, secret=secret,
                              events=frozenset(spec.events),
                              desks=frozenset(spec.desks) if spec.desks is not None else None,
                              ca_file=self.ca_file)]

    def _escalated(self, step: EscalationStep) -> None:
        """AlertRouting's on_step: on the timeline, and the console's row of the alert."""
        record = self.store.alert(step.alert_id)
        waited = step.at - record.stored_at if record is not None else None
        untaken = ""
        if waited is not None:  # in scenario seconds, as the desks' escalate_after_s are
            untaken = f", untaken {waited * self.speed:.0f} s" + (
                f", {waited:.1f} s at speed {self.speed:g}" if self.speed != 1 else "")
        where = step.to_desk if step.to_desk is not None else "the supervisors only (end of " \
            "its chain)"
        offline = "; its device is OFFLINE" if step.device_offline else ""
        self.recorder.add("centre", "escalated", f"escalated {step.alert_id[:8]} to {where} "
                          f"(step {step.step}{untaken}){offline}", wall=time.time(),
                          alert_id=step.alert_id, step=step.step, to_desk=step.to_desk)
        if self.console is not None:
            self.console.console.publish_alert(step.alert_id)

    def _notified(self, notification: Notification, duplicate: bool) -> None:
        """The receiver kept (or saw again) a notification: on the timeline."""
        what = notification.event + (f" (step {notification.step})" if notification.step else "")
        self.recorder.add("webhook", "webhook", f"received {what} of "
                          f"{notification.alert_id[:8]}" + (" AGAIN (duplicate)" if duplicate
                                                            else ""),
                          alert_id=notification.alert_id, event=notification.event,
                          duplicate=duplicate)

    def _webhooks_settled(self) -> bool:
        """Every notification queued for the receiver has reached it (or was refused, which
        the result reports)."""
        if self.routing is None or self.receiver is None:
            return True
        queued = {d.event_id for d in self._webhook_deliveries() if d.state != "refused"}
        return queued <= self.receiver.event_ids()

    def _webhook_deliveries(self) -> list[Delivery]:
        """The outbox's deliveries to the receiver: live, or as kept when routing stopped."""
        if self._deliveries is not None or self.routing is None:
            return self._deliveries or []
        return [d for d in self.routing.webhooks.outbox.deliveries() if d.target == WEBHOOK_NAME]

    def _escalations(self, alert_id: str) -> list[dict[str, Any]]:
        """The alert's escalation steps: from the running AlertRouting, or as kept when it
        stopped."""
        if alert_id in self._steps or self.routing is None:
            steps = self._steps.get(alert_id, [])
        else:
            steps = self.routing.steps(alert_id)
        return [{"step": s["step"], "to_desk": s["to_desk"], "at": _iso(float(s["due_at"])),
                 "device_offline": s["device_offline"]} for s in steps]

    # -- the console -----------------------------------------------------------------------------
    def _console_config(self, port: int) -> ConsoleConfig:
        """The console as `sos-center serve` would run it, on loopback, with a certificate of
        its own from the run's fleet CA (in the run's directory, like the ingest's: never a
        deployment's). Its evidence browser reads the ingest's store when the run has one."""
        tls = pki.issue_server_cert(self.broker.fleet.ca, self.workdir / "console-tls",
                                    "console", [HOST, "localhost"])
        section = {"listen": HOST, "port": port, "cert_file": str(tls.cert_file),
                   "key_file": str(tls.key_file), "exports_dir": "console/exports",
                   "audit_log": "console/audit.jsonl"}
        if self.ingest is not None:
            section["evidence_dir"] = "evidence"
        return console_config(section, self.workdir)

    def _accounts(self, browser: bool) -> None:
        """The run's console accounts, in the centre's store file as `sos-center user add`
        puts them: `operator` for a person, and for the browsers `watcher` (auditor: it only
        looks) and `duty` (operator: it answers the pillars' calls). A work directory used
        before (--out) keeps them: new passwords then."""
        wanted = {CONSOLE_USER: ("operator", self.console_password)}
        if browser:
            wanted[console_watch.USER] = (console_watch.ROLE, self._watcher_password)
            wanted[voice_answerer.USER] = (voice_answerer.ROLE, self._answerer_password)
        with Accounts(self.workdir / "center.sqlite") as accounts:
            for name, (role, password) in wanted.items():
                user = accounts.user(name)
                if user is None:
                    accounts.add(name, role, password)
                    continue
                accounts.set_password(name, password)
                if user.disabled:
                    accounts.enable(name)

    @property
    def console_url(self) -> str:
        """The console's address; https://localhost:PORT/ (its certificate names both
        localhost and 127.0.0.1)."""
        assert self.console is not None, "the console starts with run()"
        return self.console.url

    @property
    def ca_file(self) -> Path:
        """The run's fleet CA: the console's certificate chains to it."""
        return Path(self.broker.fleet.ca.cert_file)

    def _start_console(self) -> None:
        config = self.console_config
        try:
            self.console = start_console(config, store=self.store,
                                         accounts_db=self.workdir / "center.sqlite",
                                         fleet=self.broker.fleet, commands=self.center,
                                         live_dir=self.workdir / "live" if self.live else None,
                                         routing=self.routing)
        except OSError as exc:  # the port is taken, say
            raise ConsoleStartError(f"cannot serve the operator console on {config.listen}:"
                                    f"{config.port}: {exc}") from exc
        self.recorder.add(
            "sim", "setup", f"operator console on {self.console_url} : log in as "
            f"'{CONSOLE_USER}', password '{self.console_password}' (its certificate is from "
            f"this run's fleet CA, {self.ca_file})", url=self.console_url, user=CONSOLE_USER,
            ca_file=str(self.ca_file))

    def _open_watcher(self) -> None:
        """Open the console in headless Chromium (blocking: seconds), before the timeline."""
        assert self.console is not None
        watcher = ConsoleWatcher(self.console.url.replace("localhost", HOST),
                                 self.console_config.cert_file, self.workdir / "browser",
                                 console_watch.USER, self._watcher_password,
                                 on_row=self._row_shown)
        self.watcher = watcher  # inactive until open() succeeds: watch() does nothing
        watcher.open()
        if watcher.active:
            self.recorder.add("sim", "setup", f"{watcher.browser} (headless) has the console "
                              f"open as '{watcher.user}' ({console_watch.ROLE})")
        else:
            self.recorder.add("sim", "setup", f"no browser watches the console: "
                              f"{watcher.why_not}")

    def _open_answerer(self) -> None:
        """Open the console in a second headless Chromium as the operator on duty, its
        microphone playing the operator's clip (blocking: seconds), before the timeline."""
        assert self.console is not None
        if self.citizen is None or self.operator_voice is None:
            self.answerer = None
            self.recorder.add("sim", "setup", f"nobody answers by voice: {self.no_sound}")
            return
        answerer = VoiceAnswerer(self.console.url.replace("localhost", HOST),
                                 self.console_config.cert_file, self.workdir / "browser-duty",
                                 voice_answerer.USER, self._answerer_password,
                                 operator_clip=self.operator_voice.path,
                                 caller_clip=self.citizen.path, keep_dir=self.workdir / "voices",
                                 on_step=self._voice_step)
        self.answerer = answerer
        answerer.open()
        if answerer.active:
            self.recorder.add("sim", "setup", f"{answerer.browser} (headless) has the console "
                              f"open as '{answerer.user}' ({voice_answerer.ROLE}), its "
                              f"microphone playing {self.operator_voice.path.name}: it answers "
                              "each pillar's SOS by voice at once")
        else:
            self.recorder.add("sim", "setup", f"nobody answers by voice: {answerer.why_not}")

    def _voice_step(self, alert_id: str, kind: str, data: dict[str, Any]) -> None:
        """The answering browser's progress with a call: on the timeline."""
        name = f"'{voice_answerer.USER}'"
        match kind:
            case "answered":
                text = f"{name} clicked \"{data['label']}\" on {alert_id[:8]}"
            case "connected":
                pressed = self._pressed_wall(alert_id)
                after = f", {data['connected_at_ms'] / 1000 - pressed:.1f} s after the press" \
                    if pressed is not None else ""
                text = f"voice call of {alert_id[:8]} connected{after}"
            case "heard":
                text = (f"voice call of {alert_id[:8]}: "
                        + heard("the operator", "the caller", data["operator_heard_caller_r"])
                        + ", " + heard("the caller", "the operator",
                                       data["caller_heard_operator_r"]))
            case _:
                text = f"voice call of {alert_id[:8]} FAILED: {data.get('error')}"
        at = data.get("connected_at_ms" if kind == "connected" else "clicked_at_ms")
        wall = at / 1000 if isinstance(at, int | float) else None
        self.recorder.add("console", "voice", text, wall=wall, alert_id=alert_id, step=kind,
                          **{k: v for k, v in data.items() if k != "label"})

    def _pressed_wall(self, alert_id: str) -> float | None:
        """When the press that raised the alert was played (the recorder's press entry)."""
        record = self.store.alert(alert_id)
        if record is None:
            return None
        presses = [e for e in self.recorder.find(kind="press", device=record.device_id)
                   if e.wall <= record.stored_at]
        return presses[-1].wall if presses else None

    def _make_voices(self) -> None:
        """The citizen's and the operator's clips, made with espeak-ng in the work directory
        (cached there by a hash of what shapes them). Without espeak-ng the devices have no
        sound and nobody answers by voice: the run goes on and says why."""
        try:
            self.citizen = citizen_wav(self.workdir / "voices")
            self.operator_voice = operator_wav(self.workdir / "voices")
        except (EspeakMissing, OSError, ValueError) as exc:  # a failing espeak-ng, say
            self.no_sound = f"no voice clips ({exc})"
            self.recorder.add("sim", "setup", f"the devices have no sound: {self.no_sound}")
            return
        self.recorder.add("sim", "setup", f"sound: the devices' microphones play "
                          f"{self.citizen.path.name} (the caller, espeak-ng)",
                          clip=str(self.citizen.path))

    def _row_shown(self, alert_id: str, shown_ms: float | None) -> None:
        """The watcher saw (or gave up on) an alert's row: on the timeline at that moment."""
        if shown_ms is None:
            return  # a problem, reported with the result
        record = self.store.alert(alert_id)
        after = f", {shown_ms - record.stored_at * 1000:.0f} ms after it was stored" \
            if record is not None else ""
        self.recorder.add("console", "row", f"row of {alert_id[:8]} visible in the browser"
                          + after, wall=shown_ms / 1000, alert_id=alert_id)

    # -- the run ---------------------------------------------------------------------------------
    def run(self, *, keep_running: bool = False) -> RunResult:
        """Play the scenario and return its result. `keep_running`: leave the broker, centre,
        console and devices running afterwards (the automatic operator and the browser stop),
        until `stop()`: `sos-sim run --console`, for a person to look around."""
        rec = self.recorder
        held = False
        opener: threading.Thread | None = None
        try:
            self.broker.start()
            if self.ingest is not None:
                self.ingest.start()
                rec.add("sim", "setup", f"evidence ingest on {self.ingest.url}/files/ "
                        "(tus, mutual TLS)")
            self._start_console()  # before the centre subscribes: it sees every event
            self._make_voices()
            if self.browser:  # Chromium starts while the devices connect
                opener = threading.Thread(target=self._open_browsers, name="console-opener",
                                          daemon=True)
                opener.start()
            self._start_routing()  # before the centre: it notifies of the first alert
            self.center.start()
            rec.add("sim", "setup", f"broker on {self.broker.centre.host}:{self.broker.port} "
                    "(mutual TLS, each identity confined), control centre subscribed")
            for spec in self.scenario.devices:
                self._start_device(spec)
            for device_id in self.devices:
                if not rec.wait_for(lambda es, d=device_id: any(
                        e.source == d and e.kind == "link" and e.data["up"] for e in es), 30):
                    rec.add("sim", "problem", f"{device_id} never connected")
            if opener is not None:
                opener.join()
            self._play_timeline()
            rec.wait_for(lambda es: self._finished(), self._remaining())
            if self.answerer is not None and not self._finished():
                # A call still being measured holds its alert's close: give it its time.
                self.answerer.answers(voice_answerer.ALLOWANCE_S)
                rec.wait_for(lambda es: self._finished(), self._close_margin())
            rec.wait_for(lambda es: self._webhooks_settled(), WEBHOOK_DRAIN_S)
            self._rows = self._console_rows()
            self._answers = self.answerer.answers(voice_answerer.ALLOWANCE_S) \
                if self.answerer is not None else {}
            held = keep_running
        finally:
            if opener is not None:
                opener.join()
            if held:
                self._hold()
            else:
                self._shutdown()
        result = self._result()
        if not held:
            self.store.close()
        return result

    def _open_browsers(self) -> None:
        """The watcher's and (for a scenario with a pillar of ours) the answerer's Chromium,
        started side by side."""
        answering = None
        if any(d.profile == "pillar" and d.id not in self.provisioned
               for d in self.scenario.devices):
            answering = threading.Thread(target=self._open_answerer, name="voice-opener",
                                         daemon=True)
            answering.start()
        self._open_watcher()
        if answering is not None:
            answering.join()

    def _close_margin(self) -> float:
        """After the calls were measured: the automatic operator's close, applied on the
        device and shown there (wall seconds)."""
        return self.scenario.operator_close_delay_s / self.speed + 10.0

    def _start_routing(self) -> None:
        if self.routing is None:
            return
        if self.receiver is not None:
            self.receiver.start()
            self.recorder.add("sim", "setup", f"webhook receiver on {self.receiver.url} "
                              "(checks each signature; counts each event id once)",
                              url=self.receiver.url)
        self.routing.start()
        routes = self.routing.routes
        self.recorder.add("sim", "setup", f"routing: {len(routes.desks)} desk(s), "
                          f"{len(routes.rules)} rule(s); untaken alerts escalate (desks' "
                          f"escalate_after_s / speed {self.speed:g})")

    def stop(self) -> None:
        """After `run(keep_running=True)`: stop everything it left running."""
        self._shutdown()
        self.store.close()

    def _hold(self) -> None:
        """What stops when a run is kept for a person: nothing acts on its own any more."""
        self._abort.set()
        self.operator.stop()
        if self.watcher is not None:
            self.watcher.close()
        if self.answerer is not None:
            self.answerer.close()

    def _console_rows(self) -> dict[str, float | None]:
        """Alert id -> when its row appeared in the watcher's page (epoch ms, None: never)."""
        if self.watcher is None or not self.watcher.active:
            return {}
        stored = {a.alert_id: a.stored_at for a in self.store.alerts(open_only=False)}
        return self.watcher.rows(stored)

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
            if self.citizen is not None and spec.profile == "pillar":
                self._speakers[spec.id] = directory / "data" / SPEAKER_WAV
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
            upload_url=self.ingest.url if self.ingest and spec.camera else None,
            microphone_wav=self.citizen.path.resolve() if self.citizen else None)

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
                self._pressed_with[step.device] = step.operator  # before its alert can arrive
                self.devices[step.device].send({"op": "press", "hold_s": step.hold_s,
                                                "seed": self.seed * 1000 + number})
                rec.add("sim", "press", f"{step.device}: press for {step.hold_s} s"
                        + (" (the operator will ignore it)" if step.operator == "ignore" else ""),
                        device=step.device, hold_s=step.hold_s, expect_alert=step.expect_alert,
                        operator=step.operator)
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
        if self.routing is not None:  # first, as in `serve`: a new alert's incident is
            self.routing.on_center_event(event)  # joined before the pages are told of it
        if self.console is not None:
            self.console.console.on_center_event(event)
        m = event.message
        if event.kind == "alert":
            if event.new:
                if self.watcher is not None:
                    self.watcher.watch(m["alert_id"], time.time())  # just stored
                self.recorder.add("centre", "alert", alert_line(m) + self._routed_to(m),
                                  alert_id=m["alert_id"])
                self._answer_by_voice(m["alert_id"], event.device_id)
                self._operator_takes(m["alert_id"], event.device_id)
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

    def _routed_to(self, alert: dict[str, Any]) -> str:
        """ ` -> desks (rule)` for the timeline, when the centre routes."""
        record = self.store.alert(alert["alert_id"]) if self.routing is not None else None
        if record is None:
            return ""
        return f" -> {', '.join(record.desks) or '(no desk)'} (rule '{record.route_rule}')"

    def _answer_by_voice(self, alert_id: str, device_id: str) -> None:
        """A pillar with sound: the operator on duty answers its call at once, and the
        automatic operator closes the alert only once the call has been measured."""
        speaker = self._speakers.get(device_id)
        if self.answerer is None or not self.answerer.active or speaker is None \
                or self._pressed_with.get(device_id) == "ignore":  # nobody may take that one
            return
        self.operator.hold_close(alert_id, self.answerer.answer(alert_id, speaker))

    def _operator_takes(self, alert_id: str, device_id: str) -> None:
        """The automatic operator's answer to a new alert: at once (after its delay), or, for
        a press the scenario marks `operator = "ignore"`, only after operator_ignore_s."""
        if self._pressed_with.get(device_id) != "ignore":
            self.operator.on_new_alert(alert_id)
            return
        self._pressed_with[device_id] = None  # one press, one ignored alert
        self._ignored.add(alert_id)
        ignore_s = self.scenario.operator_ignore_s
        self.recorder.add("operator", "ignore", f"nobody takes {alert_id[:8]} for {ignore_s:g} s "
                          "(scenario time): it should escalate", alert_id=alert_id)
        self.operator.ignore(alert_id, ignore_s / self.speed)

    def _shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._hold()
        for device in self.devices.values():
            device.stop()
        for gps in self.gps.values():
            gps.stop()
        if self.console is not None:
            self.console.stop()
        self.center.stop()
        if self.routing is not None:
            self._steps = {a.alert_id: self.routing.steps(a.alert_id)
                           for a in self.store.alerts(open_only=False)}
            self._deliveries = self._webhook_deliveries()
            self.routing.stop()
        if self.receiver is not None:
            self.receiver.stop()
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
        walls: dict[str, tuple[float | None, float]] = {}  # alert id -> (pressed, stored)
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
            walls[record.alert_id] = (presses[-1].wall if presses else None, record.stored_at)
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
                # The routing decision written with the alert, and the steps it climbed.
                "desks": list(record.desks),
                "route_rule": record.route_rule,
                "escalations": self._escalations(record.alert_id),
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
            if a["alert_id"] in self._ignored and not a["escalations"]:
                problems.append(f"alert {a['alert_id'][:8]}: nobody took it for "
                                f"{self.scenario.operator_ignore_s:g} s, yet it never escalated")
        webhook = self._webhook_result()
        if webhook is not None:
            problems += webhook.pop("problems")
        recordings = None
        if self.scenario.records:
            recordings = recording_results(self, alerts)
            problems += recordings.pop("problems")
        console = self._console_result(walls)
        problems += console.pop("problems")
        return RunResult(self.scenario.name, self.speed, not problems, alerts, expected, problems,
                         str(self.workdir), list(self.recorder.entries), recordings, console,
                         webhook)

    def _webhook_result(self) -> dict[str, Any] | None:
        """The `webhook` object (what the receiver got) and its "problems": an alert the target
        wanted without exactly one `alert` notification, a notification queued and never
        received, a duplicate or a bad signature (nothing in a run should cause either)."""
        if self.receiver is None or self.routing is None:
            return None
        receiver, routing = self.receiver, self.routing
        summary = receiver.summary()
        problems = []
        target = routing.webhooks.targets[WEBHOOK_NAME]
        for record in self.store.alerts(open_only=False):
            got = len(receiver.of_alert(record.alert_id, "alert"))
            wanted = int(target.wants("alert", routing.desks_of(record)))
            if got != wanted:
                problems.append(f"webhook: alert {record.alert_id[:8]}: received {got} `alert` "
                                f"notification(s), expected {wanted}")
        received = receiver.event_ids()
        for delivery in self._webhook_deliveries():
            if delivery.event_id in received:
                continue
            problems.append(f"webhook: {delivery.event_id} was {delivery.state}, never received"
                            + (f" ({delivery.last_error})" if delivery.last_error else ""))
        if summary["duplicates"]:
            problems.append(f"webhook: {summary['duplicates']} notification(s) received twice")
        if summary["bad_signatures"] or summary["bad_requests"]:
            problems.append(f"webhook: {summary['bad_signatures']} POST(s) with a bad "
                            f"signature, {summary['bad_requests']} unreadable")
        return summary | {"problems": problems}

    def _console_result(self, walls: dict[str, tuple[float | None, float]]) -> dict[str, Any]:
        """The `console` object: where it was, who may log in, and per alert (alert id ->
        (pressed, stored) epoch s: the recorder's press entry, as for `pressed_at`, and the
        store's stored_at) how long after each its row appeared in the watcher's page, and
        for a pillar's the `voice` call the operator on duty answered (`voice_why_not`: why
        there are none); plus "problems": a row not seen within ROW_DEADLINE_S of the alert
        being stored, a call that did not connect."""
        watcher = self.watcher
        why_not = "not asked for (sos-sim run --no-browser)" if watcher is None \
            else watcher.why_not
        rows, problems = [], []
        for alert_id, (pressed, stored) in walls.items() if why_not is None else ():
            shown = self._rows.get(alert_id)
            if shown is None or shown - stored * 1000 > ROW_DEADLINE_S * 1000:
                problems.append(f"alert {alert_id[:8]}: its row did not appear in the "
                                f"operator console's page within {ROW_DEADLINE_S:g} s of being "
                                "stored")
            row = {
                "alert_id": alert_id,
                "pressed_to_row_ms": _ms((shown / 1000) - pressed)
                if shown is not None and pressed is not None else None,
                "stored_to_row_ms": _ms(shown / 1000 - stored) if shown is not None else None,
            }
            answer = self._answers.get(alert_id)
            if answer is not None:
                row["voice"] = voice_figures(answer, pressed)
                problems += voice_problems(alert_id, row["voice"])
            rows.append(row)
        return {"url": self.console.url if self.console else None, "user": CONSOLE_USER,
                "browser": watcher.browser if watcher is not None else None,
                "why_not": why_not, "alerts": rows, "voice_why_not": self._voice_why_not(),
                "problems": problems}

    def _voice_why_not(self) -> str | None:
        """Why no pillar's call was answered by voice (None: the answerer was there, or the
        scenario has no pillar of its own to answer)."""
        if not self.browser:
            return "not asked for (sos-sim run --no-browser)"
        if self.no_sound is not None:
            return self.no_sound
        return self.answerer.why_not if self.answerer is not None else None


def voice_figures(answer: VoiceAnswer, pressed: float | None) -> dict[str, Any]:
    """A console row's `voice`: press -> voice connected (ms; the press as for
    pressed_to_row_ms), the click -> connected, and how well each side's received sound
    followed what the other sent (simulator/audio_compare.py); `error` if the call failed."""
    connected = answer.connected_at_ms
    return {
        "pressed_to_connected_ms": round(connected - pressed * 1000, 1)
        if connected is not None and pressed is not None else None,
        "answered_to_connected_ms": round(connected - answer.clicked_at_ms, 1)
        if connected is not None and answer.clicked_at_ms is not None else None,
        "operator_heard_caller_r": answer.operator_heard_caller_r,
        "caller_heard_operator_r": answer.caller_heard_operator_r,
        # the page's jitter buffer while the operator listened: concealed, removed (to catch
        # up) and inserted (to slow down) sound, ms; each time-warps what the operator heard
        "operator_receive": answer.operator_receive,
        "error": answer.error,
    }


def voice_problems(alert_id: str, voice: dict[str, Any]) -> list[str]:
    """A call the operator on duty answered must connect. How well each side heard the other
    is reported, not judged here: on a busy desktop (two cores running browsers, the device's
    camera and its aiortc) the received sound is sometimes time-warped by late packets and
    scores below voice_answerer.HEARD; tests/test_sim_voice.py holds the run to that bar."""
    if voice["pressed_to_connected_ms"] is None:
        return [f"alert {alert_id[:8]}: the operator's voice call did not connect"
                + (f" ({voice['error']})" if voice["error"] else "")]
    return []


def heard(listener: str, speaker: str, r: float | None) -> str:
    """"the operator heard the caller (r=0.93)", for the timeline and the summary."""
    if r is None:
        return f"whether {listener} heard {speaker} was not measured"
    verb = "heard" if r >= voice_answerer.HEARD else "did NOT hear"
    return f"{listener} {verb} {speaker} (r={r:.2f})"


def scaled_routes(routes: RouteTable, speed: float) -> RouteTable:
    """`routes` with each desk's escalate_after_s in wall seconds: a scenario's are scenario
    seconds, like all its times, so a run at speed 4 escalates four times sooner."""
    if speed == 1:
        return routes
    return dataclasses.replace(routes, desks=tuple(
        dataclasses.replace(d, escalate_after_s=d.escalate_after_s / speed)
        for d in routes.desks))


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
