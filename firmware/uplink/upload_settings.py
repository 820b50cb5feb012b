"""The `[upload]` section of the device config: where and how the shift-end upload goes.

Each key's check, default and description: `upload` in firmware/config.schema.json (an example
in docs/UPLOAD-DEVICE.md). TLS uses the device's MQTT identity (`[broker]` ca_file, cert_file,
key_file): the ingest server's certificate is issued by the same fleet CA and it authenticates
the device by its certificate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from protocol.configfile import ConfigError, load_schema, problem, subschema, with_defaults

# Every key, its check, default and description: `upload` in firmware/config.schema.json.
SCHEMA = subschema(load_schema("firmware", "config.schema.json"), "upload")
_CHUNK = SCHEMA["properties"]["chunk_bytes"]
DEFAULT_CHUNK_BYTES: int = _CHUNK["default"]  # one request for a 10 s 1080p segment
MIN_CHUNK_BYTES: int = _CHUNK["minimum"]
MAX_CHUNK_BYTES: int = _CHUNK["maximum"]


@dataclass(frozen=True)
class UploadSettings:
    """The validated `[upload]` section with its schema defaults (built by `from_dict`)."""

    url: str  # https://host[:port], no path beyond an optional prefix; uploads at {url}/files/
    chunk_bytes: int
    dock_pin: int | str | None
    dock_active_high: bool
    station_host: str | None
    station_port: int | None  # None: the url's port
    check_interval_s: float
    max_backoff_s: float

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
        """Settings from the parsed `[upload]` table (over the board profile's); ConfigError
        naming `upload.<key>` when a key is missing, unknown or has a value that cannot work.
        The schema checks each key; what it cannot express is checked here."""
        text = problem({where: section}, {"type": "object", "properties": {where: SCHEMA}})
        if text is not None:
            raise ConfigError(text)
        values = with_defaults(section, SCHEMA)
        url = values["url"]
        try:
            parts = urlsplit(url)  # ValueError for e.g. "https://[::1"
            parts.port  # noqa: B018 -- raises ValueError for a bad port
        except ValueError as exc:
            raise ConfigError(f"key '{where}.url': {exc} in {url!r}") from None
        if not parts.hostname:
            raise ConfigError(f"key '{where}.url': must have a host, not {url!r}")
        return cls(
            url=url.rstrip("/"),
            chunk_bytes=values["chunk_bytes"],
            dock_pin=values.get("dock_pin"),
            dock_active_high=values["dock_active_high"],
            station_host=values.get("station_host"),
            station_port=values.get("station_port"),
            check_interval_s=float(values["check_interval_s"]),
            max_backoff_s=float(values["max_backoff_s"]),
        )
