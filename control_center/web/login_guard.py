"""Limits on log-ins: the console runs in the process that takes SOS alerts.

Each log-in costs an argon2id hash: 64 MiB and a core for about 0.2 s. Unlimited, anyone who can
reach the console could keep every core and gigabytes busy in `sos-center serve`. So at most
`at_once` hashes run at a time (the rest are told to retry, 429), and a name with
`MAX_FAILURES` failures within `WINDOW_S` is refused without a hash for `LOCKOUT_S` (guessing
one operator's password then takes years; the operator waits a minute).

Pure but for a lock: the caller passes the time.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator

MAX_FAILURES = 5
WINDOW_S = 15 * 60.0
LOCKOUT_S = 60.0
NAMES_REMEMBERED = 10_000  # names with recent failures (the oldest forgotten first)


class LoginGuard:
    def __init__(self, at_once: int) -> None:
        self._slots = threading.BoundedSemaphore(at_once)
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    @contextlib.contextmanager
    def slot(self) -> Iterator[bool]:
        """Inside: whether this log-in may hash now (False: too many at once)."""
        admitted = self._slots.acquire(blocking=False)
        try:
            yield admitted
        finally:
            if admitted:
                self._slots.release()

    def refusal(self, name: str, now: float) -> str | None:
        """Why `name` may not try now, or None."""
        with self._lock:
            recent = [t for t in self._failures.get(name, []) if now - t < WINDOW_S]
        if len(recent) >= MAX_FAILURES and now - recent[-1] < LOCKOUT_S:
            wait = LOCKOUT_S - (now - recent[-1])
            return (f"{MAX_FAILURES} wrong passwords for this name: try again in "
                    f"{wait:.0f} s")
        return None

    def failed(self, name: str, now: float) -> None:
        with self._lock:
            times = [t for t in self._failures.pop(name, []) if now - t < WINDOW_S]
            self._failures[name] = [*times[-MAX_FAILURES:], now]
            if len(self._failures) > NAMES_REMEMBERED:
                self._failures.popitem(last=False)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)
