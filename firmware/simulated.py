"""Simulated hardware: the real device runtime off a Pi.

`sos-device run --simulated-hardware` (an integrator's laptop, against their own broker) and the
simulator's virtual devices (`simulator/virtual_device.py`) build their runtime here: gpiozero's
`MockFactory` pins instead of the Pi's GPIO (lgpio), the synthetic camera
(`firmware/camera/synthetic.py`, real H.264 of a test pattern) instead of picamera2, and no
battery gauge unless the caller brings one. Everything else is the firmware as it runs on a
device: the config, the keys, the outbox, the broker link, the GPS port the config names.

Without the flag, `missing_hardware` says which of the Pi's libraries the SOS path needs and
cannot import (the GPIO pin factory's), so `sos-device run` can refuse in one line instead of
dying with a traceback half-way through its start. A missing camera library is not among them:
the device runs without its camera and reports the fault (docs/DESIGN.md).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from gpiozero.pins.mock import MockFactory

from firmware.audio.source import WavAudioSource
from firmware.battery import BatterySource, NoBattery
from firmware.camera.synthetic import SyntheticCamera
from firmware.config import DeviceConfig
from firmware.device import DeviceRuntime, Observer

log = logging.getLogger("sos.simulated")

VIRTUAL_CAMERA_FRAMES = 5  # a device simulated without [camera] still passes the camera check
SIM_MAX_PIXELS = 640 * 480  # larger camera modes are simulated at SIM_CAMERA_SIZE
SIM_CAMERA_SIZE = (320, 240)
SIM_MAX_BITRATE = 800_000
PRESS_MARGIN_S = 0.3  # a simulated press is held this much past the profile's threshold

# gpiozero pin factory name -> (the module it imports, the Debian/Raspberry Pi OS package)
PIN_FACTORY_LIBRARIES = {
    "lgpio": ("lgpio", "python3-lgpio"),
    "rpigpio": ("RPi.GPIO", "python3-rpi.gpio"),
    "pigpio": ("pigpio", "python3-pigpio"),
}


@dataclass(frozen=True)
class SimulatedDevice:
    """A runtime on mock pins; `pins` hands out the MockPins to drive (button, dock)."""

    runtime: DeviceRuntime
    pins: MockFactory

    def press_sos(self, wait: Callable[[float], object]) -> None:
        """Hold the SOS button just past the profile's threshold, without contact bounce:
        enough to raise an SOS on a token (1.5 s) or a pillar (0.1 s). `wait(seconds)` does the
        holding (a stop event's `wait`: the release still happens if it is set)."""
        button = self.runtime.config.button
        pin = self.pins.pin(button.pin)
        pressed, released = ((pin.drive_low, pin.drive_high) if button.pull_up
                             else (pin.drive_high, pin.drive_low))
        pressed()
        try:
            wait(button.trigger_hold_s + PRESS_MARGIN_S)
        finally:
            released()

    def set_door(self, is_open: bool) -> None:
        """Open or shut the kiosk's door: drive its tamper switch's pin to the level that means
        it (no contact chatter; test_tamper.py has that). ValueError on a device without one."""
        tamper = self.runtime.config.tamper
        if tamper is None:
            raise ValueError("this device has no door switch (the board profile's [tamper])")
        pin = self.pins.pin(tamper.pin)
        pin.drive_high() if is_open == tamper.open_when_high else pin.drive_low()


def synthetic_camera(config: DeviceConfig) -> SyntheticCamera | None:
    """The synthetic camera for `config.camera` (None without one). A Pi's camera mode larger
    than SIM_MAX_PIXELS is simulated at SIM_CAMERA_SIZE: a desktop encodes in software."""
    if config.camera is None:
        return None
    size, fps, bitrate = config.camera.size, config.camera.fps, config.camera.bitrate
    if size[0] * size[1] > SIM_MAX_PIXELS:
        log.warning("camera %dx%d simulated at %dx%d (the desktop encodes in software)",
                    size[0], size[1], *SIM_CAMERA_SIZE)
        size, bitrate = SIM_CAMERA_SIZE, min(bitrate, SIM_MAX_BITRATE)
    return SyntheticCamera(config.device_id, size=size, fps=fps, bitrate=bitrate)


def simulated_runtime(config: DeviceConfig, *, battery: BatterySource | None = None,
                      observer: Observer | None = None) -> SimulatedDevice:
    """The device runtime on mock pins, the synthetic camera and `battery` (default: none, so
    a token's `battery.sysfs` is not read). Raises ConfigError as `DeviceRuntime` does."""
    pins = MockFactory()
    camera = synthetic_camera(config)
    probe = None if camera else (lambda: VIRTUAL_CAMERA_FRAMES)  # a camera counts its frames
    runtime = DeviceRuntime(config, pin_factory=pins, battery=battery or NoBattery(),
                            observer=observer, camera_probe=probe, camera_source=camera,
                            audio_source=simulated_microphone(config), open_audio=False)
    device = SimulatedDevice(runtime, pins)
    if config.tamper is not None:
        device.set_door(False)  # a kiosk starts shut (its switch is read from run() on)
    return device


def simulated_microphone(config: DeviceConfig) -> WavAudioSource | None:
    """The microphone off a Pi: `audio.wav_file` played in a loop, whatever `audio.source`
    says (never ALSA); None without `[audio]` or without a file to play."""
    if config.audio is None or not config.audio.wav_file:
        if config.audio is not None:
            log.warning("simulated hardware: no audio.wav_file, so the device has no microphone")
        return None
    return WavAudioSource(config.audio.wav_file)


def missing_hardware(config: DeviceConfig) -> list[str]:
    """The Pi libraries the SOS path needs and cannot import, each as `module (what for; apt
    package)`; empty when nothing is missing: only the pin factory's GPIO library. picamera2 is
    not among them: without it the device runs, and reports the camera fault (the runtime names
    the module and the package, firmware/device.py `camera_error`)."""
    factory = os.environ.get("GPIOZERO_PIN_FACTORY") or config.pin_factory
    if factory not in PIN_FACTORY_LIBRARIES:
        return []
    module, package = PIN_FACTORY_LIBRARIES[factory]
    if _importable(module):
        return []
    return [f"{module} (GPIO pin factory '{factory}'; apt package {package})"]


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # off a Pi these fail in many ways (no libcamera, no GPIO chip)
        return False
    return True


def configured_camera(config: DeviceConfig) -> SyntheticCamera | None:
    """The camera `camera.source` names, for a device on real hardware: the synthetic one for
    "synthetic", otherwise None (the runtime opens picamera2 itself)."""
    if config.camera is not None and config.camera.source == "synthetic":
        return synthetic_camera(config)
    return None
