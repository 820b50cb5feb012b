"""The console's HTTPS server: uvicorn on its own thread, beside the centre's MQTT client.

The listening socket is bound before the thread starts, so `url` is known (port 0 picks a free
one) and a browser's first connection waits in the backlog instead of being refused while the
event loop starts. Stopping ends the open event streams first: uvicorn waits for open
responses, and an EventSource never ends one by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from control_center.web.hub import EventHub

log = logging.getLogger("sos.center.console")
STOP_WAIT_S = 5.0


class ConsoleServer:
    def __init__(self, app: Starlette, hub: EventHub, *, host: str, port: int,
                 cert_file: Path, key_file: Path) -> None:
        self._hub = hub
        # uvicorn loads these on its own thread, where a bad pair would only be logged while
        # clients hang: load them here first, so start-up fails with the reason.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
        self._socket = socket.create_server((host, port), family=_family(host), backlog=128)
        self.host, self.port = host, self._socket.getsockname()[1]
        self._config = uvicorn.Config(
            app, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file), log_level="warning",
            lifespan="off", timeout_graceful_shutdown=2, access_log=False, proxy_headers=False)
        self._server = uvicorn.Server(self._config)
        self._thread = threading.Thread(target=self._run, name="console-https", daemon=True)
        self._loop_ready = threading.Event()

    @property
    def url(self) -> str:
        host = "localhost" if self.host in ("127.0.0.1", "::1", "0.0.0.0", "::") else self.host
        return f"https://{host}:{self.port}/"

    def start(self) -> None:
        self._thread.start()
        if not self._loop_ready.wait(10):
            raise RuntimeError("the console's web server did not start within 10 s")

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._hub.bind(asyncio.get_running_loop())
        self._loop_ready.set()
        try:
            await self._server.serve(sockets=[self._socket])
        except Exception:
            log.exception("the console's web server stopped")

    def stop(self) -> None:
        self._hub.close()
        self._server.should_exit = True
        self._thread.join(STOP_WAIT_S)
        with contextlib.suppress(OSError):
            self._socket.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
