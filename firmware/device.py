"""The device process: wires the pure SOS core to the button, GPS, feedback outputs and uplink.

Everything the outside world does (a button event, a receipt, a command, a lost link) is put on one
queue and handled in one thread, in order, by `AlertCore`; the actions it returns are carried out
here. The same runtime runs on the Pi and in the simulator: only the pin factory and the serial
port differ.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from firmware.alert_state import (
    Action,
    AlertCore,
    AppendToOutbox,
    CallChange,
    CallGesture,
    CancelGesture,
    CommandPayload,
    CoreEvent,
    DeviceIdentity,
    LinkDown,
    LinkUp,
    Log,
    MessageDelivered,
    Now,
    Persist,
    Readings,
    RecordSos,
    Show,
    Tick,
    Trigger,
    VoiceEnd,
    VoiceHangup,
    VoiceOffer,
)
from firmware.audio.source import AudioSource, open_audio_source
from firmware.battery import BatterySource, NoBattery, SysfsBattery
from firmware.camera.avfeed import AudioFeed
from firmware.camera.frames import EncodedFrame, FrameSource
from firmware.camera.health import (
    CameraHealth,
    CameraLimits,
    FaultChange,
    FaultCleared,
    FaultRaised,
)
from firmware.camera.live import LiveStreamer
from firmware.camera.picam import PicameraSource
from firmware.camera.recorder import SegmentRecorder
from firmware.camera.recording import RecordingPolicy
from firmware.camera.space import RecordMode, SpaceLimits, SpacePlan
from firmware.camera.space import plan as plan_space
from firmware.camera.store import SegmentStore
from firmware.config import DeviceConfig
from firmware.gps.fix import Fix
from firmware.gps.position import PositionProvider
from firmware.gps.reader import GpsReader
from firmware.selftest import (
    CheckResult,
    GpsProbe,
    SelftestSchedule,
    format_line,
    picamera2_probe,
    run_selftest,
    summary,
)
from firmware.sos_button.feedback import FeedbackOutputs, FeedbackState
from firmware.sos_button.gpio import SosButton
from firmware.sos_button.logic import (
    ButtonProfile,
    CallToggleRequested,
    CancelRequested,
    Triggered,
)
from firmware.systemd_notify import notify, watchdog_interval_s
from firmware.tamper.gpio import TamperSwitch
from firmware.tamper.logic import DoorChanged, DoorState
from firmware.uplink.docking import DockDetector, run_when_docked
from firmware.uplink.mqtt import (
    Accepted,
    BrokerRefused,
    CommandReceived,
    Connected,
    Delivered,
    Disconnected,
    MqttUplink,
)
from firmware.uplink.outbox import Outbox, OutboxFull
from firmware.uplink.outgoing import OutboxRow, Outgoing
from firmware.uplink.upload_plan import Progress
from firmware.uplink.uploader import Uploader, UploadSummary, uploader_from_config
from firmware.voice.device_voice import DeviceVoice
from firmware.voice.setup import VoiceNews, make_voice
from protocol import MessageKind, ProtocolError, Topics, encode, utc_iso
from protocol.signing import Signer, load_key, public_key_from_b64

log = logging.getLogger("sos.device")


TRACK_POINTS = 3600  # an hour of 1 Hz fixes for the manifests' GPS tracks
# How often the loop looks for a fault that began or cleared without an event (the GPS port
# gone or silent): the status is published at once on a change, not at the next heartbeat.
FAULT_CHECK_S = 1.0


@dataclass(frozen=True)
class SelftestDone:
    results: list[CheckResult]


@dataclass(frozen=True)
class SegmentCommitted:
    seq: int


@dataclass(frozen=True)
class CheckSpace:
    """Plan the card's space again: segments left it (upload), or a write failed."""


@dataclass(frozen=True)
class CameraStarted:
    """The camera thread's answer to a start: `error` says why it failed (None: running)."""

    error: str | None


@dataclass(frozen=True)
class CameraFrame:
    """The first frame after a start arrived: wakes the loop to clear a camera fault."""


# A missing camera library, by the module that failed to import: the apt package to install.
CAMERA_PACKAGES = {"picamera2": "python3-picamera2", "libcamera": "python3-libcamera"}


class CameraControl:
    """Starts and stops the camera on a thread of its own, in the order asked: a camera that
    hangs in start() or stop() (a wedged driver) holds this thread, never the device's, so the
    SOS path never waits for it. Each start is answered with `CameraStarted` on `report`."""

    def __init__(self, camera: FrameSource, on_frame: Callable[[EncodedFrame], None],
                 on_lores: Callable[[EncodedFrame], None] | None,
                 report: Callable[[object], None],
                 cut: Callable[[], None] | None = None) -> None:
        """`cut` closes the recording's open segment as cut (before a stop for a stall): on
        this thread, since it waits for the recorder, which may be stuck in the card's I/O."""
        self._camera = camera
        self._on_frame, self._on_lores = on_frame, on_lores
        self._report = report
        self._cut = cut
        self._ops: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="camera-control", daemon=True)
        self._thread.start()

    def start(self) -> None:
        self._ops.put("start")

    def stop(self) -> None:
        self._ops.put("stop")

    def cut_and_stop(self) -> None:
        """A stalled camera: close the open segment as cut, then stop the camera."""
        self._ops.put("cut")
        self._ops.put("stop")

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the camera and end the thread (waits at most `timeout_s`)."""
        self._ops.put("stop")
        self._ops.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("camera: did not stop within %g s; leaving it", timeout_s)

    def _run(self) -> None:
        while (op := self._ops.get()) is not None:
            if op == "start":
                try:
                    self._camera.start(self._on_frame, self._on_lores)
                except Exception as exc:  # whatever the library raises: a fault, reported
                    self._report(CameraStarted(camera_error(exc)))
                else:
                    self._report(CameraStarted(None))
            elif op == "cut":
                if self._cut is not None:
                    self._cut()
            else:
                try:
                    self._camera.stop()
                except Exception:
                    log.exception("camera: stop failed")


def camera_error(exc: BaseException) -> str:
    """One line for the log and the centre: what failed and, for a missing library, what to
    install."""
    if isinstance(exc, ImportError):
        named = [m for m in CAMERA_PACKAGES if f"'{m}" in str(exc)]  # a raise without name=
        module = (exc.name or "").split(".")[0] or (named[0] if named else "the camera library")
        package = CAMERA_PACKAGES.get(module)
        install = f"; install the apt package {package}" if package else ""
        return f"{module} cannot be imported ({exc}){install}"[:200]
    return f"{type(exc).__name__}: {exc}"[:200]


FIRMWARE_VERSION = "0.1.0"

# An observer sees what a person near the device would: the trigger and every feedback change.
# The simulator records these; on the Pi it is unused.
Observer = Callable[[str, dict[str, Any]], None]


class DeviceRuntime:
    def __init__(
        self,
        config: DeviceConfig,
        *,
        pin_factory: Any = None,
        battery: BatterySource | None = None,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        utc_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        camera_probe: Callable[[], int] | None = None,
        camera_source: FrameSource | None = None,
        space_limits: SpaceLimits | None = None,
        camera_limits: CameraLimits | None = None,
        audio_source: AudioSource | None = None,
        open_audio: bool = True,
    ) -> None:
        """`camera_source` delivers encoded frames (the simulator passes its own; on the Pi it is
        picamera2). `camera_probe` counts frames for the self-test; by default the frames the
        running camera delivers (opening the camera a second time would fail), or picamera2's
        own probe on a device that does not record. `camera_limits`: the camera's retry backoff
        and frame watchdog (firmware/camera/health.py)."""
        self.config = config
        self._pin_factory = pin_factory
        self._camera_probe = camera_probe or self._count_camera_frames
        self._frames_seen = 0
        self._frame_arrived = threading.Condition()
        # Help points test themselves on a schedule (EN 81-28: at least every 3 days).
        self._selftest = SelftestSchedule() if config.kind == "pillar" else None
        self._selftest_thread: threading.Thread | None = None
        self.selftest_summary: dict[str, Any] | None = None
        self._clock = clock
        self._utc = utc_clock
        self._observe = observer or (lambda name, fields: None)
        self.voice: DeviceVoice | None = None  # made last in __init__ (docs/VOICE.md)
        self._events: queue.Queue[object] = queue.Queue()
        self._battery = battery or (
            SysfsBattery(config.battery_sysfs) if config.battery_sysfs else NoBattery()
        )
        signing_key = load_key(config.signing_key)  # never made here: provisioning enrols it
        signer = Signer(signing_key)
        self.outbox = Outbox(config.data_dir / "outbox.sqlite", signer=signer)
        centre_keys = [public_key_from_b64(k) for k in config.centre_keys]
        self.core = AlertCore(
            DeviceIdentity(config.device_id, config.kind, config.position_interval_s,
                           voice=config.voice is not None),
            command_keys=centre_keys,
        )
        self._track: deque[tuple[float, dict[str, Any]]] = deque(maxlen=TRACK_POINTS)
        self.gps = (GpsReader(config.gps.port, config.gps.baudrate, clock=clock,
                              on_fix=self._remember_fix) if config.gps.port else None)
        self.position = PositionProvider(
            self.gps.latest if self.gps else lambda: None, clock=clock,
            live_max_age_s=config.gps.live_max_age_s,
            surveyed=config.gps.surveyed,
        )
        self.feedback = FeedbackOutputs(
            config.feedback.led_pin, config.feedback.buzzer_pin, config.feedback.vibration_pin,
            pin_factory=pin_factory, on_change=self._feedback_changed,
        )
        self.button = SosButton(
            config.button.pin,
            ButtonProfile(
                debounce_s=config.button.debounce_s,
                trigger_hold_s=config.button.trigger_hold_s,
                cancellable=config.button.cancellable,
            ),
            self._events.put,
            pull_up=config.button.pull_up,
            pin_factory=pin_factory,
            clock=clock,
        )
        # The kiosk door's switch (docs/VOICE.md, "Tamper switch"): an event, never an SOS.
        tamper = config.tamper
        self.tamper: TamperSwitch | None = None
        self._optional_problems: dict[str, str] = {}  # parts that could not be set up at all
        if tamper is not None:
            try:
                self.tamper = TamperSwitch(
                    tamper.pin, self._events.put, debounce_s=tamper.debounce_s,
                    pull_up=tamper.pull_up, open_when_high=tamper.open_when_high,
                    pin_factory=pin_factory, clock=clock)
            except Exception as exc:  # a busy or missing pin: the SOS path runs without it
                self._optional_problems["tamper"] = f"door switch on pin {tamper.pin}: {exc}"
                log.error("tamper: %s; running without the door switch",
                          self._optional_problems["tamper"])
        # The microphone (docs/EVIDENCE.md "Sound"): opened once, shared by the recorder, the
        # live view and the voice call. `open_audio=False` (simulated hardware) never opens ALSA.
        self.audio_source: AudioSource | None = audio_source
        if audio_source is None and open_audio and config.audio is not None:
            self.audio_source = open_audio_source(config.audio, clock=clock, utc_clock=utc_clock)
        record_sound = (self.audio_source is not None and config.audio is not None
                        and config.audio.record)
        self.recorder: SegmentRecorder | None = None
        self._camera = camera_source
        self._camera_limits = camera_limits or CameraLimits()
        self._camera_health: CameraHealth | None = None  # from run(): the camera is watched
        self._faults_published: dict[str, str] = {}
        self._upload_problem: str | None = None  # from the last upload pass (upload thread)
        self._camera_control: CameraControl | None = None
        self._last_frame_at: float | None = None  # frame thread: when the last frame came
        self._wake_on_frame = False  # frame thread: wake the loop at the next frame
        self._space_limits = space_limits or _space_limits_for(config)
        self._write_failed = False  # the card refused a frame; cleared by the next commit
        self._storage_mode = RecordMode.NORMAL
        if config.camera is not None:
            self.recorder = SegmentRecorder(
                SegmentStore(config.data_dir / "recordings"), device_id=config.device_id,
                recipients=list(config.evidence_recipients), signing_key=signing_key,
                fps=config.camera.fps, size=config.camera.size,
                policy=RecordingPolicy(preroll_s=config.camera.preroll_s),
                segment_s=config.camera.segment_s, gps_track=self._gps_track,
                sync_interval_s=config.camera.sync_interval_s,
                audio=AudioFeed() if record_sound else None,
                on_commit=lambda seq: self._events.put(SegmentCommitted(seq)))
            if self._camera is None:
                self._camera = PicameraSource(size=config.camera.size, fps=config.camera.fps,
                                              bitrate=config.camera.bitrate)
        # Live view during an SOS: the camera's low-resolution stream, to the centre's live key.
        self.live: LiveStreamer | None = None
        if self._camera is not None and config.camera is not None and config.live_recipients:
            live_topic = Topics(config.device_id).live
            self.live = LiveStreamer(
                config.device_id, list(config.live_recipients), signer,
                lambda payload, header: self.uplink.publish_live(live_topic, payload, header),
                fps=config.camera.fps, size=self._camera.lores_size,
                audio=AudioFeed() if record_sound else None)
        if record_sound and self.audio_source is not None:
            for consumer in (self.recorder, self.live):
                if consumer is not None:
                    self.audio_source.subscribe(consumer.on_audio)
        # Shift-end upload: when docked (GPIO or station network) or asked to.
        self.uploader: Uploader | None = None
        self.dock: DockDetector | None = None
        self._upload_thread: threading.Thread | None = None
        if config.upload is not None and self.recorder is not None:
            self.uploader = uploader_from_config(config, config.upload,
                                                 store=self.recorder.store,
                                                 on_progress=self._upload_progress)
            self.dock = DockDetector.from_settings(config.upload, pin_factory=pin_factory)
        offline = {"v": 1, "device_id": config.device_id, "device_kind": config.kind,
                   "state": "offline"}
        self.uplink = MqttUplink(
            config.device_id, config.broker, self.outbox, self._events.put,
            will_payload=encode(MessageKind.STATUS, offline),
            status_payload=self._status_payload, receipt_keys=centre_keys,
        )
        # The voice call with the operator during an SOS: None without one.
        try:
            self.voice = make_voice(config, self.audio_source, self._events.put,
                                    pin_factory=pin_factory, utc=utc_clock)
        except Exception as exc:  # lamps' pins busy, no speaker: the SOS path runs without voice
            self._optional_problems["voice"] = f"the voice call could not be set up: {exc}"
            log.error("voice: %s; running without it (offers are refused as unsupported)",
                      self._optional_problems["voice"])
            self.core.identity = replace(self.core.identity, voice=False)

    # -- main loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Run until `stop` is set."""
        log.info("device %s (%s) starting; firmware %s; %d message(s) pending in the outbox",
                 self.config.device_id, self.config.kind, FIRMWARE_VERSION, self.outbox.count())
        if self.recorder is not None:
            closed = self.recorder.recover(now_mono=self._clock())
            if closed:
                log.warning("closed %d segment(s) interrupted by a crash: %s", len(closed), closed)
        self._execute(self.core.restore(self.outbox.load_state(), self._now()))
        self._sync_button()
        if self.recorder is not None:
            self._check_space()
        if self.uploader is not None and self.dock is not None:
            dock = self.dock
            self._upload_thread = threading.Thread(
                target=run_when_docked, args=(dock, self._upload_pass), name="upload",
                daemon=True)
            self._upload_thread.start()
        if self.gps:
            self.gps.start()
        if self.tamper is not None:
            self.tamper.start()
        self.uplink.start()
        if self.audio_source is not None:
            self.audio_source.start()  # its own thread; a failing microphone is only reported
        next_heartbeat = self._clock() + self.config.heartbeat_s
        watchdog_s = watchdog_interval_s()
        next_watchdog = self._clock() + watchdog_s if watchdog_s else None
        next_fault_check = self._clock() + FAULT_CHECK_S
        notify("READY=1")  # the SOS path is up; the camera starts below and may fail on its own
        if self.recorder is not None and self._camera is not None:
            self._camera_health = CameraHealth(self._clock(), self._camera_limits)
            self._camera_control = CameraControl(
                self._camera, self._on_frame, self.live.on_lores if self.live else None,
                self._events.put, cut=self._cut_for_camera_fault)
        stopper = threading.Thread(target=lambda: (stop.wait(), self._events.put(None)),
                                   daemon=True)
        stopper.start()
        try:
            while not stop.is_set():
                deadline = min(d for d in (self.core.next_deadline(), next_heartbeat,
                                           self._selftest_deadline(), next_watchdog,
                                           self._camera_deadline(), next_fault_check,
                                           self.voice and self.voice.next_deadline())
                               if d is not None)
                try:
                    item = self._events.get(timeout=max(0.0, deadline - self._clock()))
                except queue.Empty:
                    item = None
                if item is not None:
                    self._dispatch(item)
                now = self._clock()
                core_deadline = self.core.next_deadline()
                if core_deadline is not None and now >= core_deadline:
                    self._handle(Tick())
                if now >= next_heartbeat:
                    next_heartbeat = now + self.config.heartbeat_s
                    if self.uplink.connected:
                        self.uplink.publish_status()
                    self._check_space()
                self._maybe_selftest(now)
                self._watch_camera(now)
                if self.voice is not None:
                    self.voice.tick(now)
                if now >= next_fault_check:
                    next_fault_check = now + FAULT_CHECK_S
                    self._publish_faults_if_changed()
                if next_watchdog is not None and now >= next_watchdog:
                    notify("WATCHDOG=1")  # only this loop feeds it: a hung loop is restarted
                    next_watchdog = now + watchdog_s
        finally:
            self.close()

    def close(self) -> None:
        if self.dock is not None:
            self.dock.close()  # ends a running pass between two chunks; it resumes next boot
        if self._upload_thread is not None:
            self._upload_thread.join(timeout=30)
        if self.uploader is not None:
            self.uploader.close()
        if self._camera_control is not None:
            self._camera_control.close()
        if self.audio_source is not None:
            self.audio_source.stop()
        if self._camera is not None and self.recorder is not None:
            self.recorder.close()  # the open segment is committed, not left for recovery
            self.recorder.store.close()
        if self.live is not None:
            self.live.close()
        self.button.close()
        if self.tamper is not None:
            self.tamper.close()
        if self.voice is not None:  # the call ends (and the microphone is let go) first
            self.voice.close()
        self.uplink.stop()
        if self.gps:
            self.gps.stop()
        self.feedback.close()
        self.outbox.close()

    # -- inputs ----------------------------------------------------------------------------------
    def _dispatch(self, item: object) -> None:
        match item:
            case Triggered(at):
                self._handle(Trigger("button_hold" if self.config.kind == "token"
                                     else "button_press"))
                recognised = time.time() - (self._clock() - at)
                active = self.core.active.alert_id if self.core.active else None
                self._observe("trigger", {"wall": recognised, "at": at, "alert_id": active})
            case CancelRequested():
                self._handle(CancelGesture())
            case CallToggleRequested():
                self._handle(CallGesture())
            case Connected():
                self._observe("link", {"up": True, "wall": time.time()})
                self._handle(LinkUp())
            case Disconnected():
                self._observe("link", {"up": False, "wall": time.time()})
                self._handle(LinkDown())
            case Delivered(row):
                self._handle(MessageDelivered(row.kind, _alert_id_of(row)))
            case BrokerRefused() | Accepted():
                pass  # the broker's word: feedback waits for the centre's receipt
            case SegmentCommitted(seq):
                self._write_failed = False
                self._observe("segment", {"seq": seq, "wall": time.time()})
                self._check_space()
            case CheckSpace():
                self._check_space()
            case CameraStarted(error):
                self._camera_started(error)
            case CameraFrame():
                pass  # the loop's camera watch reads the frame's time
            case SelftestDone(results):
                self._selftest_thread = None
                self.selftest_summary = summary(results, self._utc())
                for result in results:
                    if not result.ok:
                        log.error("self-test: %s", format_line(result))
                log.info("self-test %s", "passed" if self.selftest_summary["ok"] else "FAILED")
                if self.uplink.connected:
                    self.uplink.publish_status()
            case VoiceNews() | DoorChanged():
                try:  # optional parts: nothing they do may end the device's loop
                    self._voice_news(item) if isinstance(item, VoiceNews) \
                        else self._door_changed(item)
                except Exception:
                    log.exception("internal: %s could not be handled; ignored",
                                  type(item).__name__)
            case CommandReceived(payload):
                try:
                    self._handle(CommandPayload(payload))
                except Exception:  # untrusted bytes: nothing they do may end the device
                    log.exception("internal: a command of %d bytes could not be handled; "
                                  "ignored, nothing changed", len(payload))
            case _:
                log.error("internal: unexpected event %r ignored", item)

    def _handle(self, event: CoreEvent) -> None:
        actions = self.core.handle(event, self._now(), self._readings())
        # The button learns first: the actions publish (a close's command_applied), and a press
        # right after the centre saw the close must count as a new SOS, not as a cancel gesture.
        self._sync_button()
        self._execute(actions)
        if self.voice is not None:
            active = self.core.active
            self.voice.stage_changed(active.stage.value if active else None, self._clock())

    # -- outputs ---------------------------------------------------------------------------------
    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case AppendToOutbox(items, state):
                    self._store(items, state)
                case Persist(state):
                    try:
                        self.outbox.save_state(state)
                    except OutboxFull as exc:
                        log.error("storage full, device state not saved: %s; free space in %s",
                                  exc, self.config.data_dir)
                case Show(state):
                    self.feedback.show(state)
                    self._publish_stage(state)
                case Log(level, text):
                    getattr(log, level)(text)
                case CallChange(call_id):
                    self._record_call(call_id)
                case RecordSos(alert_id, active):
                    self._record_sos(alert_id, active)
                case VoiceOffer() | VoiceHangup() | VoiceEnd() if self.voice:
                    self._voice_action(action)

    def _store(self, items: list[Outgoing], state: dict[str, Any]) -> None:
        try:
            rows = self.outbox.append(items, state=state)
        except ProtocolError as exc:
            # A reading the schema refuses must never cost the alert: send it without readings.
            log.error("%s; sending it with position and battery unknown", exc)
            rows = self.outbox.append([_without_readings(item) for item in items], state=state)
        except OutboxFull as exc:
            # Still send it: the message lives in memory and paho retries while we run.
            log.error("storage full, %d message(s) sent WITHOUT crash safety: %s; free space in "
                      "%s", len(items), exc, self.config.data_dir)
            rows = self.outbox.volatile_rows(items)
        self.uplink.send(rows)

    def _feedback_changed(self, state: FeedbackState) -> None:
        self._observe("feedback", {"state": state.value, "wall": time.time()})
        if self.voice is not None:
            self.voice.shown(state.value)

    def _publish_stage(self, shown: FeedbackState) -> None:
        """The retained status at once when what the device shows changes (the centre's receipt,
        an ack, a close, back to idle), not at the next heartbeat: the centre re-sends a
        decision the device missed on the stage the status reports (docs/PROTOCOL.md). Not for
        sending/retrying: the alert itself says that, and a status right behind it would only
        delay the alert's receipt (`make bench`)."""
        if shown not in (FeedbackState.SENDING, FeedbackState.RETRYING) and self.uplink.connected:
            self.uplink.publish_status()

    # -- recordings ------------------------------------------------------------------------------
    def _remember_fix(self, fix: Fix) -> None:
        """GPS thread: keep recent fixes for the manifests' tracks."""
        if fix.time is not None:
            self._track.append((fix.received_at, {"lat": fix.lat, "lon": fix.lon,
                                                  "utc": utc_iso(fix.time)}))

    def _on_frame(self, frame: EncodedFrame) -> None:
        """The recorder's handoff thread (never the camera's own: camera/handoff.py): record
        the frame, and count it for the self-test and the frame watchdog, which therefore also
        sees a recorder stuck for longer than its limit."""
        self._last_frame_at = self._clock()
        if self._wake_on_frame:
            self._wake_on_frame = False
            self._events.put(CameraFrame())
        if self.recorder is not None:
            try:
                self.recorder.on_frame(frame)
            except OSError as exc:  # the card is full or failing: say so once, plan the space
                if not self._write_failed:
                    self._write_failed = True
                    log.error("recording: the card refused a write (%s); checking its space", exc)
                    self._events.put(CheckSpace())
        with self._frame_arrived:
            self._frames_seen += 1
            self._frame_arrived.notify_all()

    # -- the camera's health: retried with backoff, watched for frames, never on the SOS path --
    def _camera_deadline(self) -> float | None:
        return self._camera_health.next_deadline() if self._camera_health else None

    def _watch_camera(self, now: float) -> None:
        """Start a camera that is due to start; stop, cut and retry one that sent no frame for
        `frame_timeout_s` (the sensor stalled, or the encoder's thread died)."""
        health, control = self._camera_health, self._camera_control
        if health is None or control is None:
            return
        last = self._last_frame_at
        if last is not None:
            self._camera_fault(health.frame(last))
        if health.stalled(now):
            reason = f"no frame for {health.limits.frame_timeout_s:g} s; camera restarted"
            control.cut_and_stop()  # on the control thread: the recorder may be stuck in I/O
            self._camera_failed(now, reason)
        self._camera_fault(health.start_hung(now))
        if health.start_due(now):
            health.starting(now)
            self._last_frame_at = None
            self._wake_on_frame = True
            control.start()

    def _cut_for_camera_fault(self) -> None:
        """Camera control thread: close the open segment as cut (`camera-fault`)."""
        if self.recorder is None:
            return
        try:
            cut = self.recorder.cut("camera-fault")
        except OSError:
            self._events.put(CheckSpace())
            return
        except Exception:  # must not end the control thread: the camera is still restarted
            log.exception("camera: closing the open segment as cut failed")
            return
        if cut is not None:
            log.error("camera: segment %06d closed as cut (camera-fault)", cut)

    def _camera_started(self, error: str | None) -> None:
        health = self._camera_health
        if health is None:
            return
        now = self._clock()
        if error is None:
            health.started(now)
            return
        self._camera_failed(now, error)

    def _camera_failed(self, now: float, reason: str) -> None:
        health = self._camera_health
        assert health is not None
        before = health.fault
        change = health.failed(now, reason)
        if change is None and before != reason:  # a fault going on, for another reason
            log.warning("camera: still not running (%s); retrying in %g s", reason,
                        health.retry_delay_s)
        elif change is None:
            log.debug("camera: retry %d failed (%s); next in %g s", health.failures, reason,
                      health.retry_delay_s)
        self._camera_fault(change)

    def _camera_fault(self, change: FaultChange | None) -> None:
        """Report a camera fault as it begins and as it clears: one log line, an event to the
        centre, and the retained status (its `faults`)."""
        match change:
            case FaultRaised(reason):
                assert self._camera_health is not None
                log.error("camera fault: %s; the SOS button, GPS and uplink work without it; "
                          "retrying in %g s (then up to every %g s)", reason,
                          self._camera_health.retry_delay_s,
                          self._camera_health.limits.max_retry_s)
                event = self._fault_event("camera_fault", reason)
            case FaultCleared(was):
                log.warning("camera: recording again (the fault was: %s)", was)
                event = self._fault_event("camera_restored", f"was: {was}")
            case _:
                return
        self._observe("camera_fault" if isinstance(change, FaultRaised) else "camera_restored",
                      {"reason": event.message["reason"], "wall": time.time()})
        self._store([event], self.core.state())
        if self.uplink.connected:
            self.uplink.publish_status()

    def _voice_action(self, action: VoiceOffer | VoiceHangup | VoiceEnd) -> None:
        """Hand an offer, a hang-up or the alert's end to the voice call; its failure is
        logged and changes nothing else (the SOS path never depends on voice)."""
        assert self.voice is not None
        try:
            match action:
                case VoiceOffer(alert_id, session, sdp, ice_servers):
                    self.voice.offer(alert_id, session, sdp, ice_servers)
                case VoiceHangup(session):
                    self.voice.hangup(session)
                case VoiceEnd():
                    self.voice.alert_ended()
        except Exception:
            log.exception("internal: voice could not take %s; ignored", type(action).__name__)

    def _voice_news(self, item: VoiceNews) -> None:
        """The voice engine's answer, a call's state, a TURN fault: to the centre as events;
        a fault also goes into the status at once."""
        assert self.voice is not None
        events = self.voice.news(item, self._clock())
        if events:
            self._store([Outgoing(*self.voice.event(kind, fields)) for kind, fields in events],
                        self.core.state())
        if any(kind in ("voice_fault", "voice_restored") for kind, _ in events) \
                and self.uplink.connected:
            self.uplink.publish_status()

    def _door_changed(self, change: DoorChanged) -> None:
        """The kiosk door opened or closed: an event to the centre and the status at once. Not
        an SOS: no alert, no feedback, the recording unchanged. A door found closed at start-up
        is no news (the status says it); one found open is reported, since the device cannot
        know what happened while it was off."""
        opened = change.state is DoorState.OPEN
        if change.initial and not opened:
            log.info("tamper: door closed")
        else:
            reason = ("door open at start-up" if change.initial
                      else "door opened" if opened else "door closed")
            log.log(logging.WARNING if opened else logging.INFO, "tamper: %s", reason)
            kind = "tamper_opened" if opened else "tamper_closed"
            self._store([self._fault_event(kind, reason)], self.core.state())
        self._observe("tamper", {"state": change.state.value, "initial": change.initial,
                                 "wall": time.time()})
        if self.uplink.connected:
            self.uplink.publish_status()

    def _fault_event(self, kind: str, reason: str) -> Outgoing:
        message = {"v": 1, "device_id": self.config.device_id,
                   "created_at": utc_iso(self._utc()), "type": kind, "reason": reason[:200]}
        return Outgoing(MessageKind.EVENT, Topics(self.config.device_id).event, message)

    def _publish_faults_if_changed(self) -> None:
        """Publish the status when its faults are not the ones the last status carried (a
        status built for any reason records them: `_status`)."""
        if self.faults() != self._faults_published and self.uplink.connected:
            self.uplink.publish_status()

    def faults(self) -> dict[str, str]:
        """What does not work now, by part, with the reason (the status's `faults`). A change
        is published at once (checked every `FAULT_CHECK_S`)."""
        health = self._camera_health
        found = {"camera": health.fault if health is not None else None,
                 "gps": self.gps.problem() if self.gps else None,
                 "upload": self._upload_problem,
                 "voice": self.voice.fault if self.voice is not None else None,
                 "microphone": self.audio_source.error if self.audio_source else None,
                 **self._optional_problems}
        return {part: reason[:200] for part, reason in found.items() if reason}

    def _count_camera_frames(self, wanted: int = 5, timeout_s: float = 5.0) -> int:
        """Self-test probe: frames the running camera delivers within `timeout_s`."""
        if self._camera is None:
            return picamera2_probe()
        with self._frame_arrived:
            start = self._frames_seen
            self._frame_arrived.wait_for(lambda: self._frames_seen - start >= wanted, timeout_s)
            return self._frames_seen - start

    def _gps_track(self, start: float, end: float) -> list[dict[str, Any]]:
        return [point for at, point in list(self._track) if start <= at <= end]

    def _record_call(self, call_id: str | None) -> None:
        def edit(policy: RecordingPolicy) -> None:
            if call_id is None:
                policy.call_end()
            else:
                policy.call_start(call_id)

        self._change_recording(edit)

    def _record_sos(self, alert_id: str, active: bool) -> None:
        now = self._clock()
        if self.live is not None:  # the operator sees the camera for as long as the SOS lasts
            if active:
                self.live.start(alert_id)
            else:
                self.live.stop()

        def edit(policy: RecordingPolicy) -> None:
            if active:
                policy.sos_start(alert_id, now)
            else:
                policy.sos_end(alert_id, now)

        self._change_recording(edit)

    def _change_recording(self, edit: Callable[[RecordingPolicy], object]) -> None:
        """The recorder follows a call, an SOS or the storage mode. A write that fails on the
        way (a full card, when a segment closes) is the recorder's to handle: it keeps what
        was written as a cut segment and logs it; here the space is planned again."""
        if self.recorder is None:
            return
        try:
            self.recorder.change(edit)
        except OSError:
            self._events.put(CheckSpace())

    def _check_space(self) -> None:
        """Free space by the rules in camera/space.py; report a change of mode to the centre."""
        if self.recorder is None:
            return
        store = self.recorder.store
        plan = plan_space(store.segments(), store.free_bytes(),
                          sos_active=self.recorder.policy.sos_active, limits=self._space_limits)
        for seq in plan.delete:
            store.delete(seq)
        if plan.deleted_unuploaded_ordinary:
            log.error("storage: deleted ordinary segments %s (not uploaded) to keep recording "
                      "SOS evidence", plan.deleted_unuploaded_ordinary)
        if plan.mode is not self._storage_mode or plan.deleted_unuploaded_ordinary:
            self._storage_mode = plan.mode
            self._change_recording(lambda p, m=plan.mode: p.set_mode(m))
            if plan.alert:  # sent even when the card just failed
                log.error("%s", plan.alert)
                self._store([self._storage_event(plan, store.free_bytes())], self.core.state())

    def _storage_event(self, plan: SpacePlan, free: int) -> Outgoing:
        message = {
            "v": 1, "device_id": self.config.device_id, "created_at": utc_iso(self._utc()),
            "type": "storage_alert", "reason": (plan.alert or "")[:200],
            "storage": {"free_mb": round(free / 2**20, 1), "mode": plan.mode.value,
                        "deleted_unuploaded": len(plan.deleted_unuploaded_ordinary)},
        }
        return Outgoing(MessageKind.EVENT, Topics(self.config.device_id).event, message)

    # -- shift-end upload ------------------------------------------------------------------------
    def request_upload(self) -> None:
        """Upload now, docked or not (an explicit request)."""
        if self.dock is not None:
            self.dock.request()

    def _upload_pass(self, stop: threading.Event) -> UploadSummary:
        """Upload thread: one pass; what it did goes to the log and the observer."""
        assert self.uploader is not None
        self._observe("upload_started", {"wall": time.time()})
        summary = self.uploader.run_once(stop)
        if not summary.busy:
            self._upload_problem = summary.problem()  # cleared by a pass that left nothing
        log.info("upload pass: %d segment(s) uploaded, %d byte(s) sent (%d resent), "
                 "%d refused, %d left for later", summary.segments_uploaded, summary.bytes_sent,
                 summary.bytes_resent, len(summary.refused), len(summary.deferred))
        self._observe("upload", {
            "wall": time.time(), "uploaded": summary.uploaded, "bytes_sent": summary.bytes_sent,
            "bytes_resent": summary.bytes_resent, "receipts": len(summary.receipts),
            "refused": {str(k): v for k, v in summary.refused.items()},
            "deferred": {str(k): v for k, v in summary.deferred.items()},
            "busy": summary.busy, "elapsed_s": round(summary.elapsed_s, 3),
            "remaining": len(self.uploader.pending())})  # recorded meanwhile, or deferred
        self._events.put(CheckSpace())
        return summary

    def _upload_progress(self, progress: Progress) -> None:
        self._observe("upload_progress", {"wall": time.time(),
                                          "segments_done": progress.segments_done,
                                          "segments_total": progress.segments_total,
                                          "bytes_done": progress.bytes_done,
                                          "bytes_total": progress.bytes_total})

    # -- scheduled self-test -------------------------------------------------------------------
    def _selftest_deadline(self) -> float | None:
        """When the loop must wake for the self-test; None while it cannot start anyway."""
        if self._selftest is None or self._selftest_thread is not None or self.core.active:
            return None
        return self._selftest.next_due if self._selftest.next_due is not None else 0.0

    def _maybe_selftest(self, now: float) -> None:
        """Start a due self-test, but never during an SOS (it switches the LED)."""
        schedule = self._selftest
        if schedule is None or self._selftest_thread is not None or self.core.active is not None:
            return
        if not schedule.due(now):
            return
        schedule.done(now)
        self._selftest_thread = threading.Thread(target=self._run_selftest, name="selftest",
                                                 daemon=True)
        self._selftest_thread.start()

    def _run_selftest(self) -> None:
        """Worker thread: the checks take seconds (camera, broker); the result is queued."""
        results = run_selftest(
            self.config, pin_factory=self._pin_factory, camera_probe=self._camera_probe,
            utc_clock=self._utc, clock=self._clock, button=self.button.button,
            led=self.feedback.led, gps_probe=self._gps_probe if self.gps else None,
            broker_probe=self._broker_probe)
        self._events.put(SelftestDone(results))

    def _broker_probe(self) -> CheckResult:
        """Judge the running link rather than connect a second time as this device."""
        target = f"{self.config.broker.host}:{self.config.broker.port}"
        if self.uplink.connected:
            return CheckResult("broker", True, f"{target}: connected (this device's own link)")
        return CheckResult("broker", False, f"{target}: not connected",
                           "check the network and this device's certificate (docs/SELFTEST.md)")

    def _gps_probe(self) -> GpsProbe:
        """Judge the running reader's data rather than open the port a second time."""
        fix = self.gps.latest() if self.gps else None
        if fix is not None and fix.age(self._clock()) <= 5.0:
            return GpsProbe(CheckResult("gps", True, f"{self.config.gps.port}: fix "
                                        f"{fix.age(self._clock()):.1f} s old"), fix)
        return GpsProbe(CheckResult(
            "gps", False, f"no fix from {self.config.gps.port} in the last 5 s",
            "check the receiver's antenna and wiring (docs/SELFTEST.md)"), fix)

    # -- helpers ---------------------------------------------------------------------------------
    def _sync_button(self) -> None:
        self.button.set_alert_active(self.core.active is not None)

    def _now(self) -> Now:
        return Now(self._clock(), self._utc())

    def _readings(self) -> Readings:
        return Readings(self.position.current(), self._battery.read())

    def _status_payload(self) -> bytes:
        """Called from paho's thread (on connect): reads the core once, never raises."""
        active = self.core.active  # one read: the runtime thread may close it meanwhile
        try:
            return encode(MessageKind.STATUS, self._status(active))
        except Exception:  # an exception here would end paho's network thread
            log.exception("could not build the status; sending a minimal one")
            return encode(MessageKind.STATUS, {"v": 1, "device_id": self.config.device_id,
                                               "state": "online"})

    def _status(self, active: Any) -> dict[str, Any]:
        closed = None if active else self.core.showing_closed()
        status = {
            "v": 1,
            "device_id": self.config.device_id,
            "device_kind": self.config.kind,
            "state": "online",
            "at": utc_iso(self._utc()),
            "heartbeat_s": self.config.heartbeat_s,
            "active_alert_id": active.alert_id if active else closed,
            "active_alert_stage": active.stage.value if active else closed and "closed",
            "outbox_pending": self.outbox.count(),
            "gps": self.position.current()["source"],
            "battery": self._battery.read(),
            "firmware": FIRMWARE_VERSION,
        }
        if self.recorder is not None:
            status["recordings_waiting"] = self.recorder.store.waiting_for_upload()
        if self.voice is not None:
            status["voice"] = self.voice.engine.mode
        if self.selftest_summary is not None:
            status["selftest"] = self.selftest_summary
        door = self.tamper.state if self.tamper is not None else None
        if door is not None:
            status["tamper"] = door.value
        faults = self.faults()
        if faults:
            status["faults"] = faults
        self._faults_published = faults  # what the centre will have (_publish_faults_if_changed)
        return status


def _space_limits_for(config: DeviceConfig) -> SpaceLimits:
    """The default limits, with room for two whole segments at the camera's bitrate before
    nothing can be written (the card is only checked at commits and heartbeats)."""
    limits = SpaceLimits()
    if config.camera is None:
        return limits
    segment = int(config.camera.bitrate / 8 * config.camera.segment_s)
    min_write = max(limits.min_write, 2 * segment)
    reserve = max(limits.reserve, min_write)
    low = max(limits.low_water, reserve)
    return SpaceLimits(low_water=low, high_water=max(limits.high_water, low), reserve=reserve,
                       min_write=min_write)


def _alert_id_of(row: OutboxRow) -> str | None:
    if row.kind is not MessageKind.ALERT:
        return None
    return json.loads(row.payload)["alert_id"]


def _without_readings(item: Outgoing) -> Outgoing:
    message = dict(item.message)
    if "position" in message:
        message["position"] = {**dict.fromkeys(message["position"]), "source": "none"}
    if "battery" in message:
        message["battery"] = None
    return Outgoing(item.kind, item.topic, message)
