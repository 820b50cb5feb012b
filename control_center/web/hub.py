"""Fan-out of the centre's changes to every open console page (Server-Sent Events).

The centre learns of a change on paho's network thread (an alert stored, a status, a device's
answer) or on a request's worker thread (a claim); pages listen on the web server's event loop.
`publish` may be called from any thread: it hands the event to the loop, which puts it in each
listener's queue. A listener that does not keep up (a stalled browser tab) is dropped when its
queue is full: the page's EventSource reconnects and reloads the whole state, which is better
than holding events in memory for it without bound or slowing the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

_Item = tuple[str, str, dict[str, Any]]  # (the frame, its event kind, its data)
QUEUE_LIMIT = 1000  # events a listener may fall behind before it is dropped
PING_S = 5.0  # a comment line this often keeps proxies from closing an idle stream
RECHECK_S = 1.0  # a stream's session is looked up again at most this often while it flows


class EventHub:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: set[asyncio.Queue[_Item | None]] = set()
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the listeners live on (the web server's), set when it starts."""
        with self._lock:
            self._loop = loop

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Send `event: kind` with `data` (JSON) to every listener; from any thread."""
        frame = f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
        with self._lock:
            loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between check and call
            loop.call_soon_threadsafe(self._deliver, (frame, kind, data))

    def _deliver(self, item: _Item) -> None:
        for queue in list(self._listeners):
            try:
                queue.put_nowait(item)
            except asyncio.QueueFull:  # it ends; its page reconnects and reloads
                self._listeners.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)

    def close(self) -> None:
        """End every open stream (the server is stopping); from any thread."""
        with self._lock:
            loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._end_all)

    def _end_all(self) -> None:
        for queue in list(self._listeners):
            self._listeners.discard(queue)
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    async def stream(self, disconnected: Callable[[], Awaitable[bool]],
                     still_allowed: Callable[[], Awaitable[bool]],
                     wants: Callable[[str, dict[str, Any]], bool] = lambda kind, data: True,
                     ) -> AsyncIterator[str]:
        """A listener's frames until it disconnects, or `still_allowed()` says its session is
        over (log-out, `user disable`, expiry): asked at every ping and before a frame at most
        every RECHECK_S, so an ended session stops receiving within PING_S. `wants(kind,
        data)`: whether this listener gets an event (an operator, their desks' alerts)."""
        queue: asyncio.Queue[_Item | None] = asyncio.Queue(QUEUE_LIMIT)
        self._listeners.add(queue)
        checked = time.monotonic()
        try:
            yield ": connected\n\n"
            while True:
                try:
                    frame = await asyncio.wait_for(queue.get(), PING_S)
                except TimeoutError:
                    if await disconnected() or not await still_allowed():
                        return
                    checked = time.monotonic()
                    yield ": ping\n\n"
                    continue
                if frame is None:  # dropped for falling behind, or the server stops
                    return
                if not wants(frame[1], frame[2]):
                    continue
                if time.monotonic() - checked >= RECHECK_S:
                    if not await still_allowed():
                        return
                    checked = time.monotonic()
                yield frame[0]
        finally:
            self._listeners.discard(queue)
