"""The `[upload]` section of the device config: where and how the shift-end upload goes.

    [upload]
    url = "https://ingest.example:8443"   # the ingest server; uploads go to {url}/files/
    chunk_bytes = 16777216                # bytes per request (at most this much is resent)
    dock_pin = 27                         # optional: GPIO input that is active when docked
    dock_active_high = true               # the dock pulls the pin high (default true)
    station_host = "ingest.example"       # optional: docked = this host:port answers a TCP connect
    station_port = 8443                   # default: the url's port
    check_interval_s = 30.0               # how often to look for the station / retry while docked
    max_backoff_s = 300.0                 # cap of the exponential backoff after 503/507/errors

TLS uses the device's MQTT identity (`[broker]` ca_file, cert_file, key_file): the ingest server's
certificate is issued by the same fleet CA and it authenticates the device by its certificate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from protocol.configfile import ConfigError

DEFAULT_CHUNK_BYTES = 16 << 20  # one request for a 10 s 1080p segment (see docs/UPLOAD-DEVICE.md)
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 64 << 20

_KEYS = ("url", "chunk_bytes", "dock_pin", "dock_active_high", "station_host", "station_port",
         "check_interval_s", "max_backoff_s")


@dataclass(frozen=True)
class UploadSettings:
    url: str  # https://host[:port], no path beyond an optional prefix; uploads at {url}/files/
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    dock_pin: int | str | None = None
    dock_active_high: bool = True
    station_host: str | None = None
    station_port: int | None = None  # None: the url's port
    check_interval_s: float = 30.0
    max_backoff_s: float = 300.0

    @property
    def files_url(self) -> str:
        return self.url.rstrip("/") + "/files/"

    @property
    def station(self) -> tuple[str, int] | None:
        """(host, port) the station check connects to, or None when it is not configured."""
        if self.station_host is None:
            return None
        return self.station_host, self.station_port or (urlsplit(self.url).port or 443)

    @classmethod
    def from_dict(cls, section: dict[str, Any], *, where: str = "upload") -> UploadSettings:
        """Settings from the parsed `[upload]` table; ConfigError naming `upload.<key>` when a
        key is missing, unknown or has a value that cannot work."""

        def fail(key: str, what: str) -> ConfigError:
            return ConfigError(f"key '{where}.{key}': {what}")

        if not isinstance(section, dict):
            raise ConfigError(f"key '{where}': must be a table")
        for key in section:
            if key not in _KEYS:
                raise ConfigError(f"unknown key '{where}.{key}' (a typo?)")
        if "url" not in section:
            raise ConfigError(f"missing key '{where}.url'")
        url = section["url"]
        if not isinstance(url, str):
            raise fail("url", "must be a string like \"https://ingest.example:8443\"")
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise fail("url", f"must be an https:// URL with a host, not {url!r}")
        if parts.query or parts.fragment:
            raise fail("url", "must not have a query or fragment")
        try:
            parts.port  # noqa: B018 -- raises ValueError for a bad port
        except ValueError:
            raise fail("url", f"bad port in {url!r}") from None

        def integer(key: str, default: int | None, low: int, high: int) -> int | None:
            value = section.get(key, default)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise fail(key, f"must be an integer, not {value!r}")
            if not low <= value <= high:
                raise fail(key, f"must be between {low} and {high}, not {value}")
            return value

        def number(key: str, default: float, low: float) -> float:
            value = section.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise fail(key, f"must be a number of seconds, not {value!r}")
            if value < low:
                raise fail(key, f"must be at least {low:g}, not {value}")
            return float(value)

        chunk = integer("chunk_bytes", DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
        assert chunk is not None
        pin = section.get("dock_pin")
        if pin is not None and (isinstance(pin, bool) or not isinstance(pin, int | str)
                                or pin == ""):
            raise fail("dock_pin", f"must be a BCM pin number or a pin name like "
                       f"\"GPIO27\", not {pin!r}")
        active_high = section.get("dock_active_high", True)
        if not isinstance(active_high, bool):
            raise fail("dock_active_high", f"must be true or false, not {active_high!r}")
        host = section.get("station_host")
        if host is not None and (not isinstance(host, str) or not host):
            raise fail("station_host", f"must be a host name or address, not {host!r}")
        port = integer("station_port", None, 1, 65535)
        if port is not None and host is None:
            raise fail("station_port", "is set but station_host is not")
        return cls(
            url=url.rstrip("/"),
            chunk_bytes=chunk,
            dock_pin=pin,
            dock_active_high=active_high,
            station_host=host,
            station_port=port,
            check_interval_s=number("check_interval_s", 30.0, 0.1),
            max_backoff_s=number("max_backoff_s", 300.0, 1.0),
        )
