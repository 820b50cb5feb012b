"""Stub `Picamera2` (see the package docstring).

Every refusal below names the picamera2 0.3.36 function it copies (picamera2/picamera2.py unless
said otherwise), with the library's own exception type and words, so a test that passes here
does not pass only because the stub is kinder than the Pi.
"""

from __future__ import annotations

import operator
import threading
from typing import Any, ClassVar

from . import formats
from .encoders.encoder import Encoder
from .platform import Platform, get_platform

SENSOR_BASE_NS = 5_000_000_000_123  # sensor timestamps start anywhere, like a real boot clock
SENSOR_FORMAT = "SRGGB10_CSI2P"  # the imx708's raw format: the default raw stream's

# Bytes per pixel of a stream's first plane, for the stride libcamera reports at configure.
_BYTES_PER_PIXEL = {"NV21": 1, "NV12": 1, "YUV420": 1, "YVU420": 1,
                    "YVYU": 2, "YUYV": 2, "UYVY": 2, "VYUY": 2,
                    "BGR888": 3, "RGB888": 3, "XBGR8888": 4, "XRGB8888": 4,
                    "RGB161616": 6, "BGR161616": 6, "MJPEG": 1}

# The controls libcamera advertises for the stub's camera (a subset of the imx708's): configure
# refuses any other name, as picamera2/controls.py Controls.__setattr__ does.
CAMERA_CONTROLS = frozenset({
    "AeEnable", "AnalogueGain", "AwbEnable", "Brightness", "ColourGains", "Contrast",
    "ExposureTime", "ExposureValue", "FrameDurationLimits", "NoiseReductionMode", "Saturation",
    "ScalerCrop", "Sharpness",
})
NOISE_REDUCTION_FAST = 1  # libcamera.controls.draft.NoiseReductionModeEnum.Fast


class Transform:
    """Stands in for libcamera.Transform: check_camera_config insists on the type."""

    def __init__(self, hflip: int = 0, vflip: int = 0) -> None:
        self.hflip, self.vflip = hflip, vflip


class ColorSpace:
    """Stands in for libcamera.ColorSpace (Smpte170m, Rec709, ...), by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    @staticmethod
    def Smpte170m() -> ColorSpace:
        return ColorSpace("Smpte170m")

    @staticmethod
    def Rec709() -> ColorSpace:
        return ColorSpace("Rec709")


_IDENTITY = Transform()  # create_video_configuration's default transform=libcamera.Transform()


def _libcamera_uint(value: Any, what: str) -> int:
    """libcamera.Size(w, h) and StreamConfiguration.stride are pybind11 unsigned ints: a float
    (even 640.0) or a string raises TypeError (Picamera2._update_libcamera_stream_config)."""
    if isinstance(value, float):
        raise TypeError(f"{what}: incompatible function arguments ({value!r} is not an int)")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what}: incompatible function arguments ({value!r} is not an int)"
                        ) from None


class _Request:
    """What an encoder and capture_metadata read from a completed request."""

    def __init__(self, timestamp_ns: int, frame_us: int) -> None:
        self.metadata = {"SensorTimestamp": timestamp_ns, "FrameDuration": frame_us,
                         "ExposureTime": frame_us // 2}

    def get_metadata(self) -> dict[str, Any]:
        return dict(self.metadata)


class Picamera2:
    # Picamera2.platform = Platform.get_platform(), a class attribute fixed at import.
    platform: ClassVar[Platform] = get_platform()
    instances: ClassVar[list[Picamera2]] = []
    cameras: ClassVar[list[dict[str, Any]]] = [
        {"Model": "imx708", "Location": 2, "Rotation": 180, "Id": "/base/stub/imx708@1a",
         "Num": 0},
    ]

    def __init__(self, camera_num: int = 0, verbose_console: Any = None, tuning: Any = None,
                 allocator: Any = None) -> None:
        if camera_num >= len(self.cameras):
            raise IndexError("list index out of range")
        self.camera_num = camera_num
        self.camera_config: dict[str, Any] | None = None
        self.encode_stream_name: str | None = "main"
        self.started = False
        self.is_open = True
        self.frames = 0  # requests completed, as Picamera2.frames
        self.completed_requests: list[_Request] = []
        self._max_queue_len = 1
        # Picamera2.lock: process_requests holds it while it runs the encoders.
        self.lock = threading.Lock()
        self._frame_arrived = threading.Condition(self.lock)
        self._latest: _Request | None = None
        self._encoders: set[Encoder] = set()
        self.started_encoders: list[Encoder] = []  # every encoder ever started, for tests
        self._stop_sensor = threading.Event()
        self._sensor: threading.Thread | None = None
        Picamera2.instances.append(self)

    @staticmethod
    def global_camera_info() -> list[dict[str, Any]]:
        return list(Picamera2.cameras)

    # -- configuration --------------------------------------------------------------------------

    @staticmethod
    def _make_initial_stream_config(stream_config: dict[str, Any],
                                    updates: dict[str, Any] | None,
                                    ignore_list: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """Picamera2._make_initial_stream_config: only these keys, else ValueError."""
        if updates is None:
            return None
        valid = ("format", "size", "stride", "preserve_ar")
        for key, value in updates.items():
            if key in valid:
                stream_config[key] = value
            elif key not in ignore_list:
                raise ValueError(f"Bad key {key!r}: valid stream configuration keys are {valid}")
        return stream_config

    @staticmethod
    def align_stream(stream_config: dict[str, Any], optimal: bool = True) -> None:
        """Picamera2.align_stream: create_*_configuration calls it with optimal=False (align 2),
        so an odd size is rounded down to even there, and a list size becomes a tuple. With
        optimal=True the width goes to 32 bytes a plane on VC4, 64 on PiSP."""
        if optimal:
            align = 32 if Picamera2.platform == Platform.VC4 else 64
            if stream_config["format"] in ("YUV420", "YVU420"):
                align *= 2
            elif stream_config["format"] in ("XBGR8888", "XRGB8888", "RGB161616", "BGR161616"):
                align //= 2
        else:
            align = 2
        size = stream_config["size"]
        stream_config["size"] = (size[0] - size[0] % align, size[1] - size[1] % 2)

    def create_video_configuration(self, main={}, lores=None, raw={},  # noqa: B006
                                   transform=_IDENTITY, colour_space=None, buffer_count=6,
                                   controls={}, display="main", encode="main",  # noqa: B006
                                   queue=True, sensor={}, use_case="video",  # noqa: B006
                                   ) -> dict[str, Any]:
        """Picamera2.create_video_configuration, step by step (its signature, so an unknown
        keyword argument is a TypeError)."""
        if not self.is_open:
            raise RuntimeError("Camera not opened")
        main = self._make_initial_stream_config(
            {"format": "XBGR8888", "size": (1280, 720), "preserve_ar": True}, main)
        self.align_stream(main, optimal=False)
        lores = self._make_initial_stream_config(
            {"format": "YUV420", "size": main["size"], "preserve_ar": False}, lores)
        if lores is not None:
            self.align_stream(lores, optimal=False)
        raw = self._make_initial_stream_config(
            {"format": SENSOR_FORMAT, "size": main["size"]}, raw,
            ("bit_depth", "crop_limits", "exposure_limits", "fps", "unpacked"))
        if colour_space is None:
            small = main["size"][0] < 1280 or main["size"][1] < 720
            colour_space = ColorSpace.Smpte170m() if small else ColorSpace.Rec709()
        controls = {"NoiseReductionMode": NOISE_REDUCTION_FAST,
                    "FrameDurationLimits": (33333, 33333)} | controls
        config = {"use_case": use_case, "transform": transform, "colour_space": colour_space,
                  "buffer_count": buffer_count, "queue": queue, "main": main, "lores": lores,
                  "raw": raw, "controls": controls, "sensor": sensor}
        # Picamera2._add_display_and_encode
        if display is not None and config.get(display) is None:
            raise RuntimeError(f"Display stream {display} was not defined")
        if encode is not None and config.get(encode) is None:
            raise RuntimeError(f"Encode stream {encode} was not defined")
        config["display"], config["encode"] = display, encode
        return config

    @staticmethod
    def check_stream_config(stream_config: Any, name: str) -> None:
        """Picamera2.check_stream_config, in its order and words."""
        if type(stream_config) is not dict:
            raise RuntimeError(name + " stream should be a dictionary")
        if "format" not in stream_config:
            raise RuntimeError("format not found in " + name + " stream")
        if "size" not in stream_config:
            raise RuntimeError("size not found in " + name + " stream")
        fmt = stream_config["format"]
        if type(fmt) is not str:
            raise RuntimeError("format in " + name + " stream should be a string")
        if name == "raw":
            if not formats.is_raw(fmt):
                raise RuntimeError("Unrecognised raw format " + fmt)
        elif not formats.is_YUV(fmt) and not formats.is_RGB(fmt) and fmt != "MJPEG":
            raise RuntimeError("Bad format " + fmt + " in stream " + name)
        size = stream_config["size"]
        if type(size) is not tuple or len(size) != 2:
            raise RuntimeError("size in " + name + " stream should be (width, height)")
        if size[0] % 2 or size[1] % 2:
            raise RuntimeError("width and height should be even")

    def check_camera_config(self, camera_config: dict[str, Any]) -> None:
        """Picamera2.check_camera_config: required keys, types, sensor keys, the streams, and
        the lores rules (no larger than main; YUV on VC4 only, PiSP takes RGB too)."""
        for name in ("colour_space", "transform", "main", "lores", "raw"):
            if name not in camera_config:
                raise RuntimeError(f"{name!r} key expected in camera configuration")
        if not isinstance(camera_config["colour_space"], ColorSpace):
            raise RuntimeError("Colour space has incorrect type")
        if not isinstance(camera_config["transform"], Transform):
            raise RuntimeError("Transform has incorrect type")
        if camera_config.get("sensor") is not None:
            bad_keys = set(camera_config["sensor"]).difference({"bit_depth", "output_size"})
            if bad_keys:
                raise RuntimeError(f"Unexpected keys {bad_keys} in sensor configuration")
        self.check_stream_config(camera_config["main"], "main")
        if camera_config["lores"] is not None:
            self.check_stream_config(camera_config["lores"], "lores")
            main_w, main_h = camera_config["main"]["size"]
            lores_w, lores_h = camera_config["lores"]["size"]
            if lores_w > main_w or lores_h > main_h:
                raise RuntimeError("lores stream dimensions may not exceed main stream")
            if (Picamera2.platform == Platform.VC4
                    and not formats.is_YUV(camera_config["lores"]["format"])):
                raise RuntimeError("lores stream must be YUV")
        if camera_config["raw"] is not None:
            self.check_stream_config(camera_config["raw"], "raw")

    @staticmethod
    def _libcamera_stream(stream_config: dict[str, Any]) -> None:
        """Picamera2._make_libcamera_config / _update_libcamera_stream_config, then libcamera's
        answer written back by _update_stream_config: integer size (libcamera.Size), integer
        or None stride, and the stride and framesize libcamera chose."""
        width = _libcamera_uint(stream_config["size"][0], "Size.__init__()")
        height = _libcamera_uint(stream_config["size"][1], "Size.__init__()")
        if stream_config.get("stride") is not None:
            _libcamera_uint(stream_config["stride"], "StreamConfiguration.stride")
        stride = width * _BYTES_PER_PIXEL.get(stream_config["format"], 1)
        stream_config["size"] = (width, height)
        stream_config["stride"] = stride
        stream_config["framesize"] = stride * height * (3 if stream_config["format"] in (
            "YUV420", "YVU420", "NV12", "NV21") else 2) // 2

    def configure(self, camera_config: Any = None) -> None:
        """Picamera2.configure_ for a dict (the only kind the stub knows)."""
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        if not isinstance(camera_config, dict):
            raise TypeError("Invalid type for `camera_config` given")
        camera_config = camera_config.copy()  # shallow, as configure_ does
        self.camera_config = None
        self.check_camera_config(camera_config)
        for name in ("main", "lores"):
            if camera_config[name] is not None:
                self._libcamera_stream(camera_config[name])
        self.encode_stream_name = camera_config["encode"]
        if self.encode_stream_name is not None and self.encode_stream_name not in camera_config:
            raise RuntimeError(f"Encode stream {self.encode_stream_name} was not defined")
        self._max_queue_len = 1 if camera_config["queue"] and camera_config["buffer_count"] > 1 \
            else 0
        self.camera_config = camera_config
        # Controls(self, controls=...) -> picamera2/controls.py Controls.__setattr__
        for name in camera_config["controls"]:
            if name not in CAMERA_CONTROLS and name != "FrameRate":
                raise RuntimeError(f"Control {name} is not advertised by libcamera")

    def camera_configuration(self) -> dict[str, Any] | None:
        return self.camera_config

    # -- running --------------------------------------------------------------------------------

    def start(self, config: Any = None, show_preview: Any = False) -> None:
        if config is not None:
            self.configure(config)
        if not self.camera_config:
            raise RuntimeError("Camera has not been configured")
        if self.started:
            return
        self.started = True
        self._stop_sensor.clear()
        self._sensor = threading.Thread(target=self._sensor_loop, name="stub-camera",
                                        daemon=True)
        self._sensor.start()

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        self._stop_sensor.set()
        if self._sensor is not None:
            self._sensor.join()
        with self._frame_arrived:
            self.completed_requests = []
            self._frame_arrived.notify_all()  # a capture_metadata waiting gives up

    def close(self) -> None:
        # As strict as the real one: close() stops the camera and releases it, but leaves every
        # encoder running, with its thread (Picamera2.close in picamera2/picamera2.py, 0.3.36:
        # `self.stop()`, `self.camera.release()`, no stop_encoder). Only stop_encoder() or
        # stop_recording() stop them; a caller that forgets leaks an encoder thread.
        self.stop()
        self.is_open = False

    def capture_metadata(self, wait: Any = None, signal_function: Any = None) -> dict[str, Any]:
        """Picamera2.capture_metadata_: the oldest completed request kept (queue=True keeps
        one), else the next to complete. The real one waits for ever on a stopped camera; the
        stub refuses instead, so a test cannot hang."""
        with self._frame_arrived:
            if self.completed_requests:
                return self.completed_requests.pop(0).get_metadata()
            if not self.started:
                raise RuntimeError("stub: capture_metadata on a stopped camera waits for ever")
            seen = self.frames
            self._frame_arrived.wait_for(lambda: self.frames > seen or not self.started)
            request = self._latest
            if request is None or not self.started:
                raise RuntimeError("stub: the camera stopped while capture_metadata waited")
            if request in self.completed_requests:
                self.completed_requests.remove(request)
            return request.get_metadata()

    def start_encoder(self, encoder: Encoder | None = None, output: Any = None, pts: Any = None,
                      quality: Any = None, name: str | None = None) -> None:
        """Picamera2.start_encoder: the encoder takes the stream's size, format and stride
        through its checking setters (encoders/encoder.py), then starts."""
        chosen = encoder
        if chosen is None:
            if len(self._encoders) > 1:
                raise RuntimeError("Multiple possible encoders, need to pass encoder")
            if len(self._encoders) == 1:
                chosen = next(iter(self._encoders))
        if chosen is None:
            raise RuntimeError("No encoder specified")
        if output is not None:
            chosen.output = output
        streams = self.camera_configuration()
        if not streams:
            raise RuntimeError("Camera has not been configured")
        if name is None:
            name = self.encode_stream_name
        if streams.get(name) is None:
            raise RuntimeError(f"Encode stream {name} was not defined")
        chosen.name = name
        chosen.width, chosen.height = streams[name]["size"]
        chosen.format = streams[name]["format"]
        chosen.stride = streams[name]["stride"]
        # "a nominal framerate, which we'll peg at 30fps max"
        if getattr(chosen, "framerate", 0) is None:
            chosen.framerate = 1_000_000 / 33333
        chosen.start(quality=quality)
        with self.lock:
            self._encoders.add(chosen)
        self.started_encoders.append(chosen)

    def stop_encoder(self, encoders: Any = None) -> None:
        """Picamera2.stop_encoder: each encoder stopped outside the camera lock, then removed
        (a KeyError for one this camera was not running)."""
        remove: list[Encoder] = []
        if encoders is None:
            for encoder in self._encoders:
                encoder.stop()
                remove.append(encoder)
        elif isinstance(encoders, Encoder):
            encoders.stop()
            remove.append(encoders)
        elif isinstance(encoders, list | set):
            for encoder in encoders:
                encoder.stop()
                remove.append(encoder)
        with self.lock:
            for encoder in remove:
                self._encoders.remove(encoder)

    @property
    def encoders(self) -> set[Encoder]:
        return self._encoders

    def start_recording(self, encoder: Encoder, output: Any, pts: Any = None, config: Any = None,
                        quality: Any = None, name: str | None = None) -> None:
        if not self.camera_config and config is None:
            raise RuntimeError("the stub needs a configuration dict")
        if config is not None:
            self.configure(config)
        self.start_encoder(encoder, output, pts=pts, quality=quality, name=name)
        self.start()

    def stop_recording(self) -> None:
        self.stop()
        self.stop_encoder()

    def _sensor_loop(self) -> None:
        """The camera thread. Like Picamera2.process_requests it holds `self.lock` while it
        hands each request to every running encoder (`encoder.encode(encoder.name, req)`):
        on a Pi 5 that encode is the whole encode and `outputframe`, in this thread."""
        frame_us = self.camera_config["controls"]["FrameDurationLimits"][0]
        n = 0
        while not self._stop_sensor.wait(frame_us / 1e6):  # paced like a sensor
            request = _Request(SENSOR_BASE_NS + n * frame_us * 1000, frame_us)
            with self._frame_arrived:
                self.completed_requests.append(request)
                for encoder in self._encoders:
                    if self.camera_config.get(encoder.name) is not None:
                        encoder.encode(encoder.name, request)
                n += 1
                self.frames = n
                self._latest = request
                self._frame_arrived.notify_all()
                while len(self.completed_requests) > self._max_queue_len:
                    self.completed_requests.pop(0)
