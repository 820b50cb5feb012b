"""Shared fixtures: a real Mosquitto over TLS on a free loopback port, and a centre on it."""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from control_center.service import CenterEvent, CenterService
from control_center.store import Store
from simulator.broker import PrivateBroker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    with PrivateBroker(tmp_path / "broker") as running:
        yield running


RECHECK_S = 0.2


class CenterProbe:
    """A running control centre plus a way to wait for what it stores."""

    def __init__(self, service: CenterService, store: Store) -> None:
        self.service = service
        self.store = store
        self.events: list[CenterEvent] = []
        self._changed = threading.Condition()

    def record(self, event: CenterEvent) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], object], timeout: float = 15.0) -> object:
        """Wait until predicate() is truthy: re-checked whenever the centre learns something,
        and every RECHECK_S for what it does not announce (a log line, say)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            result = predicate()
            while not result and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(min(RECHECK_S, left))
                result = predicate()
        assert result, f"timed out after {timeout} s waiting for {predicate}"
        return result


@pytest.fixture
def center(broker: PrivateBroker, tmp_path: Path) -> Iterator[CenterProbe]:
    store = Store(tmp_path / "center.sqlite")
    probe: CenterProbe
    service = broker.centre_service(store, on_event=lambda e: probe.record(e))
    probe = CenterProbe(service, store)
    service.start()
    yield probe
    service.stop()
    store.close()


# -- picamera2 off the Pi: stub modules that follow its real signatures (docs/FIELD-NOTES.md) --
STUBS = Path(__file__).parent / "stubs"


def _drop_picamera2_modules() -> None:
    for name in [n for n in sys.modules if n == "picamera2" or n.startswith("picamera2.")]:
        del sys.modules[name]


@pytest.fixture
def picamera2(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """Install the stub package as `picamera2` for this test only."""
    _drop_picamera2_modules()
    monkeypatch.syspath_prepend(str(STUBS))
    module = importlib.import_module("picamera2")
    assert Path(module.__file__).is_relative_to(STUBS)
    module.Picamera2.instances.clear()
    yield module
    _drop_picamera2_modules()
