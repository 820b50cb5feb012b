"""Stub `Picamera2` (see the package docstring)."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from .encoders.encoder import Encoder

SENSOR_BASE_NS = 5_000_000_000_123  # sensor timestamps start anywhere, like a real boot clock

# The pixel formats a main or lores stream may have: picamera2/formats.py (0.3.36) YUV_FORMATS
# and RGB_FORMATS, plus "MJPEG" (Picamera2.check_stream_config in picamera2/picamera2.py allows
# it for USB cameras). The value is bytes per pixel of the first plane, for the stub's stride.
YUV_FORMATS = {"NV21": 1, "NV12": 1, "YUV420": 1, "YVU420": 1,
               "YVYU": 2, "YUYV": 2, "UYVY": 2, "VYUY": 2}
RGB_FORMATS = {"BGR888": 3, "RGB888": 3, "XBGR8888": 4, "XRGB8888": 4,
               "RGB161616": 6, "BGR161616": 6}
STREAM_FORMATS = {**YUV_FORMATS, **RGB_FORMATS, "MJPEG": 1}


def check_stream_format(stream: dict[str, Any], name: str) -> None:
    """Picamera2.check_stream_config (picamera2/picamera2.py, 0.3.36): the format must be a
    string and, for main and lores, one of formats.is_YUV / formats.is_RGB or "MJPEG", with the
    library's own words."""
    fmt = stream["format"]
    if type(fmt) is not str:
        raise RuntimeError("format in " + name + " stream should be a string")
    if fmt not in STREAM_FORMATS:
        raise RuntimeError("Bad format " + fmt + " in stream " + name)


def _stride(stream: dict[str, Any]) -> int:
    return stream["size"][0] * STREAM_FORMATS.get(stream["format"], 4)


class _Request:
    """What an encoder reads from a completed request: its metadata."""

    def __init__(self, timestamp_ns: int) -> None:
        self.metadata = {"SensorTimestamp": timestamp_ns}


class Picamera2:
    instances: ClassVar[list[Picamera2]] = []
    cameras: ClassVar[list[dict[str, Any]]] = [
        {"Model": "imx708", "Location": 2, "Rotation": 180, "Id": "/base/stub/imx708@1a",
         "Num": 0},
    ]

    def __init__(self, camera_num: int = 0, tuning: Any = None) -> None:
        if camera_num >= len(self.cameras):
            raise IndexError("list index out of range")
        self.camera_num = camera_num
        self.camera_config: dict[str, Any] | None = None
        self.started = False
        self.is_open = True
        self.frames_emitted = 0
        self._encoders: set[Encoder] = set()
        self.started_encoders: list[Encoder] = []  # every encoder ever started, for tests
        self._stop_sensor = threading.Event()
        self._sensor: threading.Thread | None = None
        Picamera2.instances.append(self)

    @staticmethod
    def global_camera_info() -> list[dict[str, Any]]:
        return list(Picamera2.cameras)

    # -- configuration --------------------------------------------------------------------------

    def create_video_configuration(self, main={}, lores=None, raw={}, transform=None,  # noqa: B006
                                   colour_space=None, buffer_count=6, controls={},  # noqa: B006
                                   display="main", encode="main", queue=True, sensor={},  # noqa: B006
                                   use_case="video") -> dict[str, Any]:
        main = {"format": "XBGR8888", "size": (1280, 720), **main}  # picamera2's default
        main["stride"] = _stride(main)
        if lores is not None:
            lores = {"format": "YUV420", "size": (320, 240), **lores}
            lores["stride"] = _stride(lores)
        controls = {"FrameDurationLimits": (33333, 33333), **controls}
        return {"use_case": use_case, "transform": transform, "colour_space": colour_space,
                "buffer_count": buffer_count, "queue": queue, "main": main, "lores": lores,
                "raw": raw, "controls": controls, "sensor": sensor, "display": display,
                "encode": encode}

    def configure(self, camera_config="preview") -> None:
        if not isinstance(camera_config, dict):
            raise RuntimeError("the stub only understands configuration dicts")
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        check_stream_format(camera_config["main"], "main")
        lores = camera_config.get("lores")
        if lores is not None:
            check_stream_format(lores, "lores")
        if lores is not None:  # picamera2's own checks (Picamera2.check_camera_config)
            (main_w, main_h), (lores_w, lores_h) = camera_config["main"]["size"], lores["size"]
            if lores_w > main_w or lores_h > main_h:
                raise RuntimeError("lores stream dimensions may not exceed main stream")
            if not str(lores["format"]).startswith(("YUV", "YVU", "NV")):  # the VC4 rule
                raise RuntimeError("lores stream must be YUV")
        self.camera_config = camera_config

    def camera_configuration(self) -> dict[str, Any] | None:
        return self.camera_config

    @property
    def encode_stream_name(self) -> str:
        return self.camera_config["encode"] if self.camera_config else "main"

    # -- running --------------------------------------------------------------------------------

    def start(self, config=None, show_preview=False) -> None:
        if config is not None:
            self.configure(config)
        if self.camera_config is None:
            raise RuntimeError("Camera has not been configured")
        if self.started:
            return
        self.started = True
        self._stop_sensor.clear()
        self._sensor = threading.Thread(target=self._sensor_loop, name="stub-sensor",
                                        daemon=True)
        self._sensor.start()

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        self._stop_sensor.set()
        if self._sensor is not None:
            self._sensor.join()

    def close(self) -> None:
        # As strict as the real one: close() stops the camera and releases it, but leaves every
        # encoder running, with its thread (Picamera2.close in picamera2/picamera2.py, 0.3.36:
        # `self.stop()`, `self.camera.release()`, no stop_encoder). Only stop_encoder() or
        # stop_recording() stop them; a caller that forgets leaks an encoder thread.
        self.stop()
        self.is_open = False

    def start_encoder(self, encoder=None, output=None, pts=None, quality=None,
                      name=None) -> None:
        if encoder is None:
            raise RuntimeError("No encoder specified")
        if output is not None:
            encoder.output = output
        streams = self.camera_configuration() or {}
        name = name or self.encode_stream_name
        if streams.get(name) is None:
            raise RuntimeError(f"Encode stream {name} was not defined")
        encoder.name = name
        encoder.width, encoder.height = streams[name]["size"]
        encoder.format = streams[name]["format"]
        encoder.stride = streams[name]["stride"]
        encoder.start(quality=quality)
        self._encoders.add(encoder)
        self.started_encoders.append(encoder)

    def stop_encoder(self, encoders=None) -> None:
        chosen = set(self._encoders) if encoders is None else (
            {encoders} if isinstance(encoders, Encoder) else set(encoders))
        for encoder in chosen:
            encoder.stop()
            self._encoders.discard(encoder)

    @property
    def encoders(self) -> set[Encoder]:
        return self._encoders

    def start_recording(self, encoder, output, pts=None, config=None, quality=None,
                        name=None) -> None:
        if self.camera_config is None and config is None:
            raise RuntimeError("the stub needs a configuration dict")
        if config is not None:
            self.configure(config)
        self.start_encoder(encoder, output, pts=pts, quality=quality, name=name)
        self.start()

    def stop_recording(self) -> None:
        self.stop()
        self.stop_encoder()

    def _sensor_loop(self) -> None:
        frame_us = self.camera_config["controls"]["FrameDurationLimits"][0]
        n = 0
        while not self._stop_sensor.wait(frame_us / 1e6):  # paced like a sensor
            request = _Request(SENSOR_BASE_NS + n * frame_us * 1000)
            for encoder in list(self._encoders):
                encoder.encode(encoder.name, request)
            n += 1
            self.frames_emitted = n
