"""Battery level for alerts: Linux power-supply sysfs on the Pi, nothing for mains devices."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("sos.battery")


class BatterySource(Protocol):
    def read(self) -> dict[str, Any] | None: ...


class NoBattery:
    """Mains-powered (the pillar): alerts carry `battery: null`."""

    def read(self) -> None:
        return None


class SysfsBattery:
    """Reads `capacity` and `status` from a /sys/class/power_supply/<name> directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._warned = False

    def read(self) -> dict[str, Any] | None:
        try:
            percent = float((self.directory / "capacity").read_text().strip())
            status = (self.directory / "status").read_text().strip().lower()
        except (OSError, ValueError) as exc:
            if not self._warned:
                log.warning("battery unreadable at %s (%s); alerts say battery unknown; "
                            "check battery.sysfs in the config", self.directory, exc)
                self._warned = True
            return None
        charging = status in ("charging", "full")
        return {"percent": max(0.0, min(100.0, percent)), "charging": charging}
