"""The picamera2 stub refuses what picamera2 0.3.36 refuses (each test names the library function
it follows), plays both a Pi 4 (VC4) and a Pi 5 (PiSP), and the project's own picamera2 callers
(the self-test's probe) pass on both. The adapter's tests run on both too
(tests/test_camera_picam.py, tests/test_live_picam.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from firmware.selftest import check_camera, picamera2_probe

PLATFORM_ENV = "PICAMERA2_STUB_PLATFORM"


@pytest.fixture(params=["vc4", "pisp"])
def pi(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The stub playing a Pi 4 (VC4) or a Pi 5 (PiSP): chosen before it is imported."""
    monkeypatch.setenv(PLATFORM_ENV, request.param)
    return request.getfixturevalue("picamera2")


def _platform(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
              name: str) -> ModuleType:
    monkeypatch.setenv(PLATFORM_ENV, name)
    return request.getfixturevalue("picamera2")


@pytest.fixture
def vc4(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return _platform(request, monkeypatch, "vc4")


@pytest.fixture
def pisp(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return _platform(request, monkeypatch, "pisp")


@pytest.fixture
def camera(pi: ModuleType) -> Iterator[Any]:
    camera = pi.Picamera2()
    yield camera
    camera.stop_encoder(list(camera.encoders))
    camera.close()


def _small(camera: Any, **kwargs: Any) -> dict[str, Any]:
    return camera.create_video_configuration(main={"size": (320, 240), "format": "YUV420"},
                                             **kwargs)


class Recorder:
    """An Output that notes how and where picamera2 called outputframe."""

    def __init__(self, output_base: type, camera: Any, enough: int = 3) -> None:
        recorder = self

        class Out(output_base):  # type: ignore[misc, valid-type]
            def outputframe(self, *args: Any, **kwargs: Any) -> None:
                recorder.calls.append((len(args), sorted(kwargs), threading.current_thread(),
                                       camera.lock.locked()))
                if len(recorder.calls) >= enough:
                    recorder.done.set()

        self.output = Out()
        self.calls: list[tuple[int, list[str], threading.Thread, bool]] = []
        self.done = threading.Event()


# -- the platform choice -----------------------------------------------------------------------


def test_the_default_platform_is_a_pi_4(picamera2: ModuleType) -> None:
    """The existing tests were written for a Pi 4: without the variable the stub is VC4."""
    from picamera2.platform import Platform

    assert picamera2.Picamera2.platform is Platform.VC4


def test_an_unknown_platform_name_is_refused(monkeypatch: pytest.MonkeyPatch,
                                             request: pytest.FixtureRequest) -> None:
    monkeypatch.setenv(PLATFORM_ENV, "pi6")
    with pytest.raises(RuntimeError, match="'vc4' or 'pisp'"):
        request.getfixturevalue("picamera2")


def test_h264encoder_is_the_v4l2_encoder_on_vc4(vc4: ModuleType) -> None:
    """picamera2/encoders/__init__.py: the hardware H264Encoder where the platform is VC4."""
    assert vc4.encoders.H264Encoder is not vc4.encoders.LibavH264Encoder
    vc4.encoders.H264Encoder(enable_sps_framerate=True)  # a V4L2-only argument


def test_h264encoder_is_the_libav_encoder_on_pisp(pisp: ModuleType) -> None:
    """picamera2/encoders/__init__.py: `LibavH264Encoder as H264Encoder` without VC4; its
    signature has no enable_sps_framerate."""
    assert pisp.encoders.H264Encoder is pisp.encoders.LibavH264Encoder
    with pytest.raises(TypeError):
        pisp.encoders.H264Encoder(enable_sps_framerate=True)


# -- create_video_configuration ----------------------------------------------------------------


def test_an_unknown_stream_key_is_refused(camera: Any) -> None:
    """Picamera2._make_initial_stream_config: only format, size, stride, preserve_ar."""
    with pytest.raises(ValueError, match="Bad key 'fps'"):
        camera.create_video_configuration(main={"size": (640, 480), "fps": 30})


def test_an_unknown_argument_is_refused(camera: Any) -> None:
    """create_video_configuration's signature: no catch-all keyword arguments."""
    with pytest.raises(TypeError):
        camera.create_video_configuration(main={"size": (640, 480)}, framerate=30)


def test_an_odd_size_is_rounded_down_by_create_video_configuration(camera: Any) -> None:
    """Picamera2.align_stream(optimal=False): alignment 2, a list becomes a tuple."""
    config = camera.create_video_configuration(main={"size": [641, 481]},
                                               lores={"size": (161, 121)})
    assert (config["main"]["size"], config["lores"]["size"]) == ((640, 480), (160, 120))


def test_an_undefined_encode_stream_is_refused(camera: Any) -> None:
    """Picamera2._add_display_and_encode."""
    with pytest.raises(RuntimeError, match="Encode stream lores was not defined"):
        camera.create_video_configuration(encode="lores")


# -- configure: check_camera_config / check_stream_config / libcamera ---------------------------


def test_configure_refuses_an_odd_size(camera: Any) -> None:
    """Picamera2.check_stream_config: "width and height should be even"."""
    config = _small(camera)
    config["main"]["size"] = (321, 240)
    with pytest.raises(RuntimeError, match="width and height should be even"):
        camera.configure(config)


def test_configure_refuses_a_size_that_is_not_a_tuple_of_two(camera: Any) -> None:
    """Picamera2.check_stream_config: `type(size) is not tuple or len(size) != 2`."""
    config = _small(camera)
    config["main"]["size"] = [320, 240]
    with pytest.raises(RuntimeError, match=r"size in main stream should be \(width, height\)"):
        camera.configure(config)


def test_configure_refuses_a_float_size(camera: Any) -> None:
    """Picamera2._update_libcamera_stream_config: libcamera.Size takes ints only."""
    config = _small(camera)
    config["main"]["size"] = (320.0, 240.0)
    with pytest.raises(TypeError):
        camera.configure(config)


def test_configure_refuses_a_stride_that_is_not_an_int(camera: Any) -> None:
    """Picamera2._update_libcamera_stream_config: the stride goes to libcamera as an int."""
    config = _small(camera)
    config["main"]["stride"] = "320"
    with pytest.raises(TypeError):
        camera.configure(config)


def test_configure_reports_the_stride_and_integer_size(camera: Any) -> None:
    """Picamera2._update_stream_config: libcamera's stride and framesize are written back."""
    camera.configure(_small(camera))
    main = camera.camera_configuration()["main"]
    assert (main["size"], main["stride"], main["framesize"]) == ((320, 240), 320, 115_200)


def test_configure_refuses_an_unknown_format(camera: Any) -> None:
    """Picamera2.check_stream_config with formats.is_YUV / is_RGB."""
    config = camera.create_video_configuration(main={"size": (320, 240), "format": "I420"})
    with pytest.raises(RuntimeError, match="Bad format I420 in stream main"):
        camera.configure(config)


def test_configure_refuses_an_unknown_control(camera: Any) -> None:
    """picamera2/controls.py Controls.__setattr__: only controls libcamera advertises."""
    with pytest.raises(RuntimeError, match="Control FrameRates is not advertised"):
        camera.configure(_small(camera, controls={"FrameRates": 30}))


def test_configure_refuses_an_unknown_sensor_key(camera: Any) -> None:
    """Picamera2.check_camera_config: sensor takes bit_depth and output_size only."""
    with pytest.raises(RuntimeError, match="Unexpected keys"):
        camera.configure(_small(camera, sensor={"fps": 30}))


def test_configure_refuses_a_transform_of_the_wrong_type(camera: Any) -> None:
    """Picamera2.check_camera_config: a libcamera.Transform or nothing."""
    with pytest.raises(RuntimeError, match="Transform has incorrect type"):
        camera.configure(_small(camera, transform=None))


def test_configure_refuses_a_missing_key(camera: Any) -> None:
    """Picamera2.check_camera_config: colour_space, transform, main, lores, raw expected."""
    config = _small(camera)
    del config["raw"]
    with pytest.raises(RuntimeError, match="'raw' key expected"):
        camera.configure(config)


def test_a_lores_larger_than_main_is_refused_on_both(camera: Any) -> None:
    """Picamera2.check_camera_config, on every platform."""
    config = _small(camera, lores={"size": (320, 240)})
    config["lores"]["size"] = (640, 480)
    with pytest.raises(RuntimeError, match="lores stream dimensions may not exceed main"):
        camera.configure(config)


def test_an_rgb_lores_is_refused_on_vc4(vc4: ModuleType) -> None:
    """Picamera2.check_camera_config: `platform == VC4 and not formats.is_YUV(lores)`."""
    camera = vc4.Picamera2()
    with pytest.raises(RuntimeError, match="lores stream must be YUV"):
        camera.configure(_small(camera, lores={"size": (160, 120), "format": "RGB888"}))


def test_an_rgb_lores_is_taken_on_pisp(pisp: ModuleType) -> None:
    """Picamera2.check_camera_config: the YUV rule is VC4's only; a Pi 5 gives RGB lores."""
    camera = pisp.Picamera2()
    camera.configure(_small(camera, lores={"size": (160, 120), "format": "RGB888"}))
    assert camera.camera_configuration()["lores"]["format"] == "RGB888"


# -- encoders ----------------------------------------------------------------------------------


def test_an_encoder_refuses_a_width_that_is_not_an_int(pi: ModuleType) -> None:
    """Encoder.width setter (encoders/encoder.py): `isinstance(value, int)`."""
    with pytest.raises(RuntimeError, match="Width must be integer"):
        pi.encoders.H264Encoder().width = 320.0


def test_an_encoder_refuses_a_stride_that_is_not_an_int(pi: ModuleType) -> None:
    """Encoder.stride setter (encoders/encoder.py)."""
    with pytest.raises(RuntimeError, match="Stride must be integer"):
        pi.encoders.H264Encoder().stride = "320"


def test_an_encoder_refuses_an_unknown_format(pi: ModuleType) -> None:
    """Encoder.format setter: formats.assert_format_valid."""
    with pytest.raises(ValueError, match="Invalid format: I420"):
        pi.encoders.H264Encoder().format = "I420"


def test_an_encoder_refuses_an_output_that_is_not_an_output(pi: ModuleType) -> None:
    """Encoder.output setter: an Output or a list of them."""
    with pytest.raises(RuntimeError, match="Must pass Output"):
        pi.encoders.H264Encoder().output = object()


def test_start_encoder_refuses_a_stream_that_was_not_configured(camera: Any,
                                                                pi: ModuleType) -> None:
    """Picamera2.start_encoder: the named stream must be in the configuration."""
    camera.configure(_small(camera))
    with pytest.raises(RuntimeError, match="Encode stream lores was not defined"):
        camera.start_encoder(pi.encoders.H264Encoder(), pi.outputs.Output(), name="lores")


def test_the_v4l2_encoder_refuses_an_input_format_it_cannot_take(vc4: ModuleType) -> None:
    """V4L2Encoder._v4l2_format: YUV420 and four RGB formats only, at start."""
    camera = vc4.Picamera2()
    camera.configure(camera.create_video_configuration(main={"size": (320, 240),
                                                             "format": "NV12"}))
    with pytest.raises(RuntimeError, match="Unrecognised format"):
        camera.start_encoder(vc4.encoders.H264Encoder(), vc4.outputs.Output())


def test_the_libav_encoder_refuses_an_input_format_it_cannot_take(pisp: ModuleType) -> None:
    """LibavH264Encoder._start: FORMAT_TABLE[self._format], a KeyError."""
    camera = pisp.Picamera2()
    camera.configure(camera.create_video_configuration(main={"size": (320, 240),
                                                             "format": "NV12"}))
    with pytest.raises(KeyError):
        camera.start_encoder(pisp.encoders.H264Encoder(), pisp.outputs.Output())


def test_close_leaves_encoders_running_on_both(camera: Any, pi: ModuleType) -> None:
    """Picamera2.close: stop() and release, no stop_encoder."""
    camera.configure(_small(camera))
    encoder = pi.encoders.H264Encoder()
    camera.start_encoder(encoder, pi.outputs.Output())
    camera.close()
    assert encoder.running


# -- who calls outputframe, and how ------------------------------------------------------------


def _record(module: ModuleType) -> Recorder:
    camera = module.Picamera2()
    recorder = Recorder(module.outputs.Output, camera)
    camera.configure(_small(camera, controls={"FrameDurationLimits": (10_000, 10_000)}))
    camera.start_recording(module.encoders.H264Encoder(), recorder.output)
    try:
        assert recorder.done.wait(15)
    finally:
        camera.stop_recording()
        camera.close()
    return recorder


def test_outputframe_gets_five_positional_arguments_on_both(pi: ModuleType) -> None:
    """Encoder.outputframe: `out.outputframe(frame, keyframe, timestamp, packet, audio)`."""
    recorder = _record(pi)
    assert {(nargs, tuple(kwargs)) for nargs, kwargs, _, _ in recorder.calls} == {(5, ())}


def test_on_vc4_outputframe_comes_from_the_encoders_own_thread(vc4: ModuleType) -> None:
    """V4L2Encoder.thread_poll: a thread of the encoder's, not the camera's."""
    recorder = _record(vc4)
    assert {thread.name for _, _, thread, _ in recorder.calls} == {"stub-v4l2-encoder"}


def test_on_pisp_outputframe_runs_in_the_camera_thread_with_its_lock_held(
        pisp: ModuleType) -> None:
    """LibavH264Encoder._encode inside Picamera2.process_requests' `with self.lock`."""
    recorder = _record(pisp)
    first = recorder.calls[:3]
    assert {thread.name for _, _, thread, _ in first} == {"stub-camera"}
    assert all(locked for *_, locked in first)


# -- the self-test's probe ---------------------------------------------------------------------


def test_capture_metadata_gives_a_new_frame_each_call(camera: Any) -> None:
    """Picamera2.capture_metadata_: pops a completed request, or waits for the next."""
    camera.configure(_small(camera, controls={"FrameDurationLimits": (10_000, 10_000)}))
    camera.start()
    stamps = [camera.capture_metadata()["SensorTimestamp"] for _ in range(3)]
    assert stamps == sorted(set(stamps))


def test_the_selftest_probe_counts_frames_on_both(pi: ModuleType) -> None:
    assert picamera2_probe(frames=3) == 3
    assert not pi.Picamera2.instances[-1].is_open


def test_the_selftest_camera_check_passes_on_both(pi: ModuleType) -> None:
    result = check_camera(lambda: picamera2_probe(frames=3), timeout_s=15)
    assert result.ok, result
