"""The run's operator console watched in headless Chromium, as an operator on duty has it open:
for each alert, the moment its row first appeared in the page (`sos-sim run`'s `console` figures:
press -> row visible, stored -> row visible).

The page keeps that moment itself (`window.sosConsole.rowShownAt[alert_id]`, epoch ms, taken
right after the row is in the document), so nothing here races the page: the watcher only reads
it, with Selenium's wait, after the centre has told us the alert is stored. The page is opened
and logged in before the scenario's timeline starts; a page opened later would draw old alerts
at load time, which says nothing about how fast a new SOS reaches an open console.

Chromium, chromedriver or Selenium missing is not an error: the run goes on and the result says
why there are no figures (`why_not`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROW_DEADLINE_S = 10.0  # a row not shown this long after the alert was stored: a run problem
USER = "watcher"  # the browser's own account, so the operator's stays free for a person
ROLE = "auditor"  # it only looks


def why_not_here() -> str | None:
    """None if a headless Chromium can be driven here, else what is missing."""
    try:
        from simulator import browser
    except ImportError as exc:  # selenium is a dev dependency
        return f"selenium is not installed ({exc.name}; pip install -e '.[dev]')"
    return browser.available()


class ConsoleWatcher:
    """One headless Chromium logged in to the console as `user`. `open()` once, `watch()` each
    new alert (any thread), `rows()` at the end, then `close()`.

    A single worker thread owns the browser after `open()`: WebDriver sessions are not meant to
    be driven from two threads at once, and alerts are few.
    """

    def __init__(self, url: str, cert_file: Path, profile_dir: Path, user: str, password: str,
                 *, on_row: Callable[[str, float | None], None] | None = None) -> None:
        """`on_row(alert_id, shown_at_ms or None)` is called from the worker thread as soon
        as a row was seen (or its deadline passed)."""
        self.url = url
        self.cert_file = cert_file
        self.profile_dir = profile_dir
        self.user = user
        self._password = password
        self._on_row = on_row
        self.browser: str | None = None  # Chromium's version once the page is open
        self.why_not: str | None = "not opened"
        self._driver: Any = None
        self._queue: queue.Queue[tuple[str, float] | None] = queue.Queue()
        self._rows: dict[str, float | None] = {}
        self._asked: set[str] = set()
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._driver is not None

    def open(self) -> None:
        """Start Chromium, log in and wait for the page to have loaded its state. Whatever
        fails is kept in `why_not` (the run goes on without figures)."""
        reason = why_not_here()
        if reason is not None:
            self.why_not = reason
            return
        from simulator.browser import chromium, log_in

        driver = None
        try:
            driver = chromium(self.cert_file, self.profile_dir)
            log_in(driver, self.url, self.user, self._password)
        except Exception as exc:  # WebDriverException, OSError, ...: a figure lost, not the run
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.why_not = f"the console did not open in Chromium: {first}"
            if driver is not None:
                with contextlib.suppress(Exception):
                    driver.quit()
            return
        self.browser = f"Chromium {driver.capabilities.get('browserVersion', '?')}"
        self.why_not = None
        self._driver = driver
        self._worker = threading.Thread(target=self._work, name="console-watcher", daemon=True)
        self._worker.start()

    def watch(self, alert_id: str, stored_at: float) -> None:
        """Look for this alert's row (called once the centre has stored it; any thread)."""
        with self._changed:
            if not self.active or alert_id in self._asked:
                return
            self._asked.add(alert_id)
        self._queue.put((alert_id, stored_at))

    def rows(self, stored: dict[str, float]) -> dict[str, float | None]:
        """alert id -> epoch ms its row first appeared (None: not within ROW_DEADLINE_S of
        being stored), for every alert in `stored` (alert id -> stored_at). Waits for the
        worker: at most until the latest of those deadlines, plus a margin for the browser."""
        if not self.active:
            return {}
        for alert_id, stored_at in stored.items():
            self.watch(alert_id, stored_at)  # any the centre's event did not bring
        latest = max(stored.values(), default=time.time()) + ROW_DEADLINE_S
        with self._changed:
            self._changed.wait_for(lambda: all(a in self._rows for a in stored),
                                   max(0.0, latest - time.time()) + 15.0)
            return {a: self._rows.get(a) for a in stored}

    def close(self) -> None:
        """Stop the worker (it gives up any wait at once) and quit the browser."""
        self._stopping.set()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(30)
        if self._driver is not None:
            with contextlib.suppress(Exception):
                self._driver.quit()
            self._driver = None

    # -- the worker thread -----------------------------------------------------------------------
    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            alert_id, stored_at = item
            shown = self._row_shown(alert_id, stored_at + ROW_DEADLINE_S)
            with self._changed:
                self._rows[alert_id] = shown
                self._changed.notify_all()
            if self._on_row is not None:
                self._on_row(alert_id, shown)

    def _row_shown(self, alert_id: str, deadline: float) -> float | None:
        """The page's rowShownAt for the alert, waiting with Selenium until `deadline` (epoch
        s); None if it never came (or the run is stopping)."""
        from selenium.common.exceptions import TimeoutException, WebDriverException

        from simulator.browser import wait_until

        def shown(driver: Any) -> float | bool | None:
            if self._stopping.is_set():
                return True  # ends the wait; not a time
            return driver.execute_script(
                "const c = window.sosConsole;"
                "return (c && c.rowShownAt && c.rowShownAt[arguments[0]]) || null;", alert_id)

        try:
            value = wait_until(self._driver, shown, timeout=max(0.0, deadline - time.time()),
                               what=f"the row of alert {alert_id[:8]}")
        except (TimeoutException, WebDriverException):
            return None
        return float(value) if isinstance(value, int | float) and value is not True else None
