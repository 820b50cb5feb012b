"""Ours: SOS trigger recognised on a real DeviceRuntime -> alert stored by a real CenterService.

Both run in this process against the private broker: the device on gpiozero mock pins with the
pillar profile (0.1 s hold) and its surveyed position (no GPS serial port), the centre with its
SQLite Store. Each press is closed by the "operator" and the device must show "closed" before
the next press, so every press raises a new alert.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpiozero.pins.mock import MockFactory

from control_center.service import CenterEvent, CenterService, CommandError
from control_center.store import Store
from firmware.config import DeviceConfig, load_device_config
from firmware.device import DeviceRuntime
from firmware.uplink.outgoing import OutboxRow
from protocol import MessageKind
from simulator.broker import PrivateBroker
from simulator.device_config import render_device_toml
from simulator.virtual_button import play, press_pattern

from .storage import SURVEYED

DEVICE_ID = "bench-pillar-1"
RELEASE_MARGIN_S = 0.02  # beyond the debounce time, before the next press may touch the button


class SosBenchError(RuntimeError):
    pass


@dataclass
class SosSamples:
    stored_s: list[float] = field(default_factory=list)  # trigger recognised -> centre stored
    receipt_s: list[float] = field(default_factory=list)  # trigger -> device shows DELIVERED
    sent_s: list[float] = field(default_factory=list)  # trigger -> alert durable, given to paho
    transit_s: list[float] = field(default_factory=list)  # given to paho -> centre stored
    handled_s: list[float] = field(default_factory=list)  # trigger -> device runtime done with it
    error: str | None = None  # why the run stopped early, if it did


class Recorder:
    """Collects what the device shows and what the centre stores, keyed by alert id.

    Everything is monotonic-clock seconds. The device's observer and the centre's callback come
    from different threads in either order, so both are recorded and the waiter checks both.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.trigger_ids: list[str] = []
        self.recognised: dict[str, float] = {}  # Triggered.at, the instant the hold qualified
        self.sent: dict[str, float] = {}  # when the runtime handed the stored alert to paho
        self.handled: dict[str, float] = {}  # when the runtime reported the trigger
        self.stored: dict[str, float] = {}  # when the centre had stored the new alert
        self.delivered: dict[str, float] = {}  # when the device showed DELIVERED (the receipt)
        self.closed_count = 0
        self.link_up = False

    # -- device observer (the runtime's thread) --------------------------------------------------
    def observe(self, name: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        wall_now = time.time()
        with self.cond:
            if name == "trigger" and fields.get("alert_id"):
                self._on_trigger(fields["alert_id"], fields["wall"], now, wall_now)
            elif name == "feedback" and fields.get("state") == "closed":
                self.closed_count += 1
            elif name == "feedback" and fields.get("state") == "delivered" and self.trigger_ids:
                self.delivered.setdefault(self.trigger_ids[-1], now)
            elif name == "link":
                self.link_up = bool(fields["up"])
            self.cond.notify_all()

    def _on_trigger(self, alert_id: str, wall: float, now: float, wall_now: float) -> None:
        # The runtime reports Triggered.at (a time.monotonic() instant: the moment the press had
        # been held trigger_hold_s, dated from its last make bounce) as wall time:
        #     wall = time.time() - (time.monotonic() - at)
        # Undoing that with a second pair of readings taken just now gives `at` back exactly,
        # up to the microsecond between each pair of clock reads (both clocks tick at the same
        # rate in between). The observer is called only after the runtime has stored and
        # published the alert, so the instant of this call itself would be too late.
        self.trigger_ids.append(alert_id)
        self.recognised[alert_id] = now - (wall_now - wall)
        self.handled[alert_id] = now

    # -- uplink tap (the runtime's thread) -------------------------------------------------------
    def on_sent(self, alert_id: str, at: float) -> None:
        with self.cond:
            self.sent[alert_id] = at
            self.cond.notify_all()

    # -- centre callback (paho's network thread of the centre) -----------------------------------
    def on_center_event(self, event: CenterEvent) -> None:
        # CenterService calls this right after Store.add_alert committed (fsync included).
        if event.kind != "alert" or not event.new:
            return
        now = time.monotonic()
        with self.cond:
            self.stored[event.message["alert_id"]] = now
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout_s):
                raise SosBenchError(f"timed out after {timeout_s} s waiting for {what}")


def device_config(workdir: Path, broker: PrivateBroker) -> DeviceConfig:
    """The pillar profile, a surveyed position and no GPS port, enrolled in the bench broker's
    fleet: written and loaded as the simulator does it."""
    path = workdir / "device.toml"
    path.write_text(render_device_toml(device_id=DEVICE_ID, profile="pillar",
                                       data_dir=workdir / "device", broker=broker,
                                       surveyed=dict(SURVEYED)))
    return load_device_config(path)


def tap_uplink(runtime: DeviceRuntime, recorder: Recorder) -> None:
    """Record when the runtime hands an alert row to paho: after the outbox append (fsync),
    just before paho's publish(), the point where the floor's clock starts.

    The runtime calls `self.uplink.send(rows)`, so an instance attribute wraps it. The alert id
    is parsed only after the publish, so the tap does not delay the alert.
    """
    send = runtime.uplink.send

    def timed_send(rows: list[OutboxRow]) -> None:
        at = time.monotonic()
        send(rows)
        for row in rows:
            if row.kind is MessageKind.ALERT:
                recorder.on_sent(json.loads(row.payload)["alert_id"], at)

    runtime.uplink.send = timed_send  # type: ignore[method-assign]


@contextlib.contextmanager
def running_device(config: DeviceConfig, recorder: Recorder,
                   timeout_s: float) -> Iterator[tuple[DeviceRuntime, Any]]:
    """A DeviceRuntime running in a thread; yields it and its mock button pin."""
    factory = MockFactory()
    runtime = DeviceRuntime(config, pin_factory=factory, observer=recorder.observe)
    tap_uplink(runtime, recorder)
    pin = factory.pin(config.button.pin)
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            runtime.run(stop)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="bench-device", daemon=True)
    thread.start()
    try:
        recorder.wait(lambda: recorder.link_up or bool(failure), timeout_s,
                      "the device to connect to the broker")
        if failure:
            raise SosBenchError(f"device runtime failed: {failure[0]!r}")
        yield runtime, pin
    finally:
        stop.set()
        thread.join(timeout_s)
    if thread.is_alive():
        raise SosBenchError("device runtime did not stop")
    if failure:
        raise SosBenchError(f"device runtime failed: {failure[0]!r}")


@contextlib.contextmanager
def running_center(workdir: Path, broker: PrivateBroker, recorder: Recorder,
                   timeout_s: float) -> Iterator[CenterService]:
    store = Store(workdir / "center" / "center.sqlite")
    service = broker.centre_service(store, client_id="bench-center",
                                    on_event=recorder.on_center_event)
    try:
        service.start(wait_s=timeout_s)  # returns once the subscriptions are in place
        try:
            yield service
        finally:
            service.stop()
    finally:
        store.close()


class PressLoop:
    """Drives presses one after another and collects one sample per press."""

    def __init__(self, runtime: DeviceRuntime, pin: Any, service: CenterService,
                 recorder: Recorder, *, hold_s: float, seed: int, timeout_s: float) -> None:
        self.runtime, self.pin, self.service, self.recorder = runtime, pin, service, recorder
        self.hold_s, self.timeout_s = hold_s, timeout_s
        self.rng = random.Random(seed)
        self.button = runtime.config.button
        self._free_at = 0.0  # monotonic instant from which the button may be pressed again

    def press(self, index: int) -> tuple[float, float, float]:
        """Press, wait for the alert to be stored, close it, wait for "closed" on the device.

        Returns (trigger -> handed to paho, trigger -> stored, trigger -> runtime done,
        trigger -> DELIVERED on the device) in s.
        """
        rec = self.recorder
        closed_before = rec.closed_count
        self._play_press()
        rec.wait(lambda: len(rec.trigger_ids) > index, self.timeout_s, f"press {index}'s trigger")
        alert_id = rec.trigger_ids[index]
        if alert_id in rec.trigger_ids[:index]:
            raise SosBenchError(f"press {index} raised no new alert (still {alert_id})")
        rec.wait(lambda: alert_id in rec.stored and alert_id in rec.sent
                 and alert_id in rec.delivered, self.timeout_s,
                 f"alert {alert_id} stored and receipted")
        self.service.send_command(alert_id, "close", "bench", timeout_s=self.timeout_s)
        rec.wait(lambda: rec.closed_count > closed_before, self.timeout_s,
                 f"the device to show 'closed' for {alert_id}")
        with rec.cond:
            at = rec.recognised[alert_id]
            return (rec.sent[alert_id] - at, rec.stored[alert_id] - at,
                    rec.handled[alert_id] - at, rec.delivered[alert_id] - at)

    def _play_press(self) -> None:
        """One bouncy press; its first contact not before the last release has debounced.

        The debouncer dates a release from its last raw edge and commits it debounce_s later;
        a new contact before then would extend the previous press and raise nothing. Delaying
        the first toggle is part of the stimulus (a person does not press again within 50 ms),
        not thread synchronisation: the logic decides from edge timestamps alone.
        """
        delay = max(0.0, self._free_at - time.monotonic())
        pattern = [(t + delay, level) for t, level in press_pattern(self.rng, self.hold_s)]
        play(self.pin, pattern, pull_up=self.button.pull_up)
        self._free_at = time.monotonic() + self.button.debounce_s + RELEASE_MARGIN_S


def run_sos(workdir: Path, broker: PrivateBroker, presses: int, warmup: int,
            *, hold_s: float, seed: int, timeout_s: float) -> SosSamples:
    """Start the centre and the device (each with its own identity), press `warmup + presses`
    times, stop both.

    A failure is returned in `error` with whatever was measured before it, not raised.
    """
    recorder = Recorder()
    result = SosSamples()
    try:
        with running_center(workdir, broker, recorder, timeout_s) as service, \
                running_device(device_config(workdir, broker), recorder, timeout_s) as (rt, pin):
            loop = PressLoop(rt, pin, service, recorder, hold_s=hold_s, seed=seed,
                             timeout_s=timeout_s)
            _press_all(loop, presses, warmup, result)
    except (SosBenchError, CommandError) as exc:
        result.error = result.error or f"set-up or shut-down: {exc}"
    return result


def _press_all(loop: PressLoop, presses: int, warmup: int, result: SosSamples) -> None:
    for i in range(warmup + presses):
        try:
            sent, stored, handled, receipted = loop.press(i)
        except (SosBenchError, CommandError) as exc:
            # Keep what was measured; the report says the run broke and where.
            result.error = f"press {i}: {exc}"
            return
        if i >= warmup:
            result.stored_s.append(stored)
            result.receipt_s.append(receipted)
            result.sent_s.append(sent)
            result.transit_s.append(stored - sent)
            result.handled_s.append(handled)
