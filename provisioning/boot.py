"""The Pi's boot configuration: the GPS UART on GPIO14/15 with no console on it, on every board.

One card boots a Pi 3, 4, 5 or Zero 2 W, so `config.txt` says what differs through its
conditional filters, and `cmdline.txt` (which has none) keeps no serial console at all.
Pure text functions (golden-tested per board in tests/test_boot_config.py) and the small
writers `provision` calls.

The Raspberry Pi facts this relies on, from the Raspberry Pi documentation
(github.com/raspberrypi/documentation, documentation/asciidoc/computers/):
- config_txt/conditional.adoc: `[all]` resets every filter; filters of one type replace each
  other; `[none]` applies nothing. Model filters: `[pi3]` 3B, 3B+, 3A+, CM3 (`[pi3+]` 3A+/3B+
  also see `[pi3]`), `[pi4]` 4B, 400, CM4, CM4S (`[pi400]`, `[cm4]`, `[cm4s]` also see `[pi4]`),
  `[pi5]` Pi 5 (`[cm5]`, `[pi500]` also see `[pi5]`), `[pi0]` Zero, Zero W, Zero 2 W, `[pi0w]`,
  `[pi02]` Zero 2 W (also sees `[pi0w]` and `[pi0]`). "Remember to use the [all] filter at the
  end, so that any subsequent settings aren't limited" to the last filter.
- configuration/uart.adoc: Pi 3, 4 and Zero 2 W give the PL011 (UART0, /dev/ttyAMA0) to
  Bluetooth and the mini UART (/dev/ttyS0, its baud rate tied to the core clock) to GPIO14/15;
  `dtoverlay=disable-bt` makes the PL011 the primary UART on GPIO14/15 (and says to disable the
  `hciuart` service). On a Pi 5 the primary UART, /dev/serial0, is the debug connector's
  (UART10, /dev/ttyAMA10), not GPIO14/15. `console=serial0,115200` in cmdline.txt puts the
  kernel console on the primary UART.
- configuration/device-tree.adoc: a `dtparam=` after a `dtoverlay=` goes to that overlay only
  when the overlay has a parameter of that name; otherwise it is the base device tree's.
- Pi 5: `dtparam=uart0=on` enables RP1's UART0 on GPIO14/15 as /dev/ttyAMA0 while serial0
  stays ttyAMA10 (raspberrypi/documentation issue #3239, a user's report the UART update PR
  #3294 answered; field guides agree). Not from the reference text itself: check it on the
  first real Pi 5 (`ls -l /dev/ttyAMA0 /dev/sos-gps`, docs/FLASHING.md). On a Pi 5 the firmware
  maps `disable-bt` to `disable-bt-pi5` (its overlay map; third-party notes), which only turns
  Bluetooth off there.
- A `#` is a comment only at the start of a line: after a setting it becomes part of the value
  (issue 13: a `dtoverlay=` line with a trailing comment may not load), so every comment here
  is a line of its own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Cards provisioned before have the old first line; it is still recognised and replaced.
CONFIG_TXT_BEGIN = "# >>> sos-device (written by sos-provision; do not edit inside)"
LEGACY_BEGINS = ("# >>> sos-device (managed by sos-device provision; do not edit inside)",)
CONFIG_TXT_END = "# <<< sos-device"

CONFIG_TXT_BLOCK = (
    "[all]",
    "# Our settings apply to every board, whatever filter section ends the lines above.",
    "# The UART on GPIO14/15 carries the GPS receiver; cmdline.txt keeps no console on it.",
    "enable_uart=1",
    "# Pi 3, 4 and Zero 2 W: take the PL011 from Bluetooth, so GPIO14/15 is /dev/ttyAMA0, not",
    "# the mini UART whose speed follows the core clock. On a Pi 5: Bluetooth off, nothing more.",
    "dtoverlay=disable-bt",
    "# The camera module.",
    "camera_auto_detect=1",
    "# The hardware watchdog, fed by systemd (RuntimeWatchdogSec).",
    "dtparam=watchdog=on",
    "[pi5]",
    "# Pi 5: serial0 is the debug connector; RP1's UART0 on GPIO14/15 becomes /dev/ttyAMA0.",
    "dtparam=uart0=on",
    "[all]",
)

# Kernel consoles that can sit on the GPS UART: serial0 (the firmware turns it into ttyAMA0 or
# ttyS0), the PL011 and the mini UART. A Pi 5's debug UART (ttyAMA10) never carries the GPS: a
# console someone put there on purpose stays.
SERIAL_CONSOLES = ("serial0", "ttyAMA0", "ttyS0")
_CONSOLE = re.compile("^console=(" + "|".join(map(re.escape, SERIAL_CONSOLES)) + ")(,.*)?$")

# systemd's getty generator starts serial-getty@<device> for the kernel console (the firmware
# has already turned serial0 into the device's name); masked, no login prompt can take the GPS
# UART even if a console comes back. hciuart: the documentation's step for disable-bt.
MASKED_UNITS = ("serial-getty@ttyAMA0.service", "serial-getty@ttyS0.service",
                "serial-getty@serial0.service", "hciuart.service")

# Which model filters each board we support sees (conditional.adoc's table).
BOARD_FILTERS: dict[str, frozenset[str]] = {
    "pi3": frozenset({"pi3", "pi3+"}),  # Pi 3 Model B+
    "pi4": frozenset({"pi4"}),  # Pi 4 Model B
    "pi5": frozenset({"pi5"}),  # Pi 5
    "pi02": frozenset({"pi0", "pi0w", "pi02"}),  # Zero 2 W
}
MODEL_FILTERS = frozenset({"pi1", "pi2", "pi3", "pi3+", "pi4", "pi400", "pi5", "pi500", "cm0",
                           "cm1", "cm3", "cm3+", "cm4", "cm4s", "cm5", "pi0", "pi0w", "pi02"})


class BootConfigError(ValueError):
    """A boot file we cannot change safely; the text says which and why."""


# -- config.txt ------------------------------------------------------------------------------


def managed_block() -> str:
    return "\n".join([CONFIG_TXT_BEGIN, *CONFIG_TXT_BLOCK, CONFIG_TXT_END]) + "\n"


def render_config_txt(text: str) -> str:
    """`text` with our block in place of the first one found (old marker included), any other
    copies removed, or the block appended. Every line outside our blocks is kept as it was."""
    lines = text.splitlines(keepends=True)
    begins = {CONFIG_TXT_BEGIN, *LEGACY_BEGINS}
    out: list[str] = []
    inside, placed = False, False
    for number, line in enumerate(lines, 1):
        bare = line.rstrip("\r\n")
        if not inside and bare in begins:
            inside = True
            if not placed:
                out.append(managed_block())
                placed = True
        elif inside and bare == CONFIG_TXT_END:
            inside = False
        elif inside and bare in begins:
            raise BootConfigError(f"config.txt line {number}: a second start of the sos-device "
                                  "block before the first one ended; mend it by hand")
        elif not inside:
            out.append(line)
    if inside:
        raise BootConfigError(f"config.txt: the sos-device block has no end line "
                              f"('{CONFIG_TXT_END}'); mend it by hand")
    if not placed:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(managed_block())
    return "".join(out)


def effective_lines(text: str, board: str) -> list[str]:
    """The setting lines the firmware of `board` (a BOARD_FILTERS key) applies, in file order.

    Model filters, `[all]` and `[none]` as documented; any other filter (EDID, GPIO, serial
    number, tryboot, board-type...) counts as not matching, since it depends on more than the
    board. Duplicates are kept: for a plain setting the last one wins, `dtoverlay`/`dtparam`
    lines add up."""
    sees = BOARD_FILTERS[board]
    active: dict[str, bool] = {}
    applied: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1]
            if name == "all":
                active.clear()
            elif name == "none":
                active["none"] = False
            elif name in MODEL_FILTERS:
                active["model"] = name in sees
            else:
                active[re.split(r"[=:]", name, maxsplit=1)[0]] = False
            continue
        if all(active.values()):
            applied.append(line)
    return applied


def setting_lines_with_comments(text: str) -> list[str]:
    """Setting lines carrying a `#` after the setting: the firmware would read it as part of
    the value (a `dtoverlay=` line like that may not load)."""
    return [line for line in text.splitlines()
            if "#" in line and not line.lstrip().startswith("#")]


# -- cmdline.txt -----------------------------------------------------------------------------


def render_cmdline_txt(text: str) -> str:
    """The kernel command line without a serial console on the GPS UART; everything else
    (console=tty1, root=...) kept. Unchanged text when there is nothing to remove."""
    first, newline, rest = text.partition("\n")
    words = first.split()
    kept = [w for w in words if not _CONSOLE.match(w)]
    if kept == words:
        return text
    return " ".join(kept) + (newline or "\n") + rest


# -- writers ---------------------------------------------------------------------------------


def mask_units(units_dir: Path) -> list[tuple[str, Path]]:
    """`systemctl mask` without systemctl: a link to /dev/null per unit in MASKED_UNITS.
    Returns (what happened, path) for each."""
    done: list[tuple[str, Path]] = []
    units_dir.mkdir(parents=True, exist_ok=True)
    for name in MASKED_UNITS:
        link = units_dir / name
        if link.is_symlink() and os.readlink(link) == "/dev/null":
            done.append(("unchanged", link))
            continue
        existed = link.is_symlink() or link.exists()
        if link.is_dir() and not link.is_symlink():
            raise BootConfigError(f"{link} is a directory: cannot mask {name}")
        if existed:
            link.unlink()
        link.symlink_to("/dev/null")
        done.append(("updated" if existed else "masked", link))
    return done
