"""The boot partition `sos-provision` writes: on a Pi 3, 4, 5 and Zero 2 W the GPS UART on
GPIO14/15 is /dev/ttyAMA0 with no console on it.

One config.txt serves every board through conditional filters, so each board's golden file in
tests/data/boot/ holds the setting lines its firmware applies to the stock Raspberry Pi OS
Bookworm config.txt after provisioning (tests/data/boot/stock-bookworm/README.md says where the
stock files come from)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from provisioning import boot

DATA = Path(__file__).resolve().parent / "data" / "boot"
STOCK_CONFIG = (DATA / "stock-bookworm" / "config.txt").read_text()
STOCK_CMDLINE = (DATA / "stock-bookworm" / "cmdline.txt").read_text()
BOARDS = ("pi3", "pi4", "pi5", "pi02")

# What the version before this one appended (comments at the end of lines, no filter reset).
LEGACY_BLOCK = """\
# >>> sos-device (managed by sos-device provision; do not edit inside)
enable_uart=1            # GPS receiver on the PL011 UART (GPIO14/15) = /dev/serial0
dtoverlay=disable-bt     # give the PL011 UART to the GPS, not to Bluetooth
camera_auto_detect=1     # the camera module
dtparam=watchdog=on      # hardware watchdog, fed by systemd (RuntimeWatchdogSec)
# <<< sos-device
"""


def provisioned() -> str:
    return boot.render_config_txt(STOCK_CONFIG)


# -- golden files ------------------------------------------------------------------------------


def test_the_provisioned_config_txt_is_the_stock_one_plus_our_block() -> None:
    assert provisioned() == (DATA / "config.txt").read_text()
    assert provisioned().startswith(STOCK_CONFIG)  # not one stock line changed


@pytest.mark.parametrize("board", BOARDS)
def test_each_board_applies_exactly_its_golden_lines(board: str) -> None:
    assert boot.effective_lines(provisioned(), board) == (
        (DATA / f"{board}.txt").read_text().splitlines())


def test_the_provisioned_cmdline_txt_is_golden() -> None:
    assert boot.render_cmdline_txt(STOCK_CMDLINE) == (DATA / "cmdline.txt").read_text()


# -- what each board gets ----------------------------------------------------------------------


@pytest.mark.parametrize("board", BOARDS)
def test_every_board_enables_the_uart_and_takes_the_pl011_from_bluetooth(board: str) -> None:
    lines = boot.effective_lines(provisioned(), board)
    assert {"enable_uart=1", "dtoverlay=disable-bt", "dtparam=watchdog=on",
            "camera_auto_detect=1"} <= set(lines)


@pytest.mark.parametrize(("board", "gets_uart0"), [("pi3", False), ("pi4", False),
                                                   ("pi5", True), ("pi02", False)])
def test_only_a_pi5_gets_rp1_uart0_on_gpio14_15(board: str, gets_uart0: bool) -> None:
    assert ("dtparam=uart0=on" in boot.effective_lines(provisioned(), board)) is gets_uart0


def test_the_stock_compute_module_sections_stay_with_the_compute_modules() -> None:
    lines = {b: boot.effective_lines(provisioned(), b) for b in BOARDS}
    assert not any("otg_mode=1" in v or "dtoverlay=dwc2,dr_mode=host" in v
                   for v in lines.values())


def test_our_block_applies_even_after_a_file_that_ends_in_a_filter_section() -> None:
    """The old block landed under whatever section ended the file: here, a CM5's only."""
    ends_filtered = STOCK_CONFIG.removesuffix("[all]\n")
    text = boot.render_config_txt(ends_filtered)
    for board in BOARDS:
        assert "enable_uart=1" in boot.effective_lines(text, board)


def test_lines_someone_adds_after_our_block_apply_to_every_board() -> None:
    text = provisioned() + "dtparam=i2c_arm=on\n"
    for board in BOARDS:
        assert boot.effective_lines(text, board)[-1] == "dtparam=i2c_arm=on"


# -- the shape of the block --------------------------------------------------------------------


def test_no_comment_sits_at_the_end_of_a_setting_line() -> None:
    assert boot.setting_lines_with_comments(provisioned()) == []
    assert boot.setting_lines_with_comments(LEGACY_BLOCK)  # what the old block did


def test_the_first_line_after_our_marker_is_all_and_so_is_the_last_inside_it() -> None:
    block = boot.managed_block().splitlines()
    settings = [line for line in block if not line.startswith("#")]
    assert block[0] == boot.CONFIG_TXT_BEGIN and block[-1] == boot.CONFIG_TXT_END
    assert block[1] == "[all]"
    assert settings[0] == "[all]" and settings[-1] == "[all]"


def test_running_twice_gives_the_same_bytes() -> None:
    once = provisioned()
    assert boot.render_config_txt(once) == once
    cmdline = boot.render_cmdline_txt(STOCK_CMDLINE)
    assert boot.render_cmdline_txt(cmdline) == cmdline


def test_a_card_provisioned_by_the_old_version_is_updated_in_place() -> None:
    old = STOCK_CONFIG + LEGACY_BLOCK
    assert boot.render_config_txt(old) == provisioned()
    around = "arm_64bit=1\n" + LEGACY_BLOCK + "dtparam=spi=on\n"
    assert boot.render_config_txt(around) == (
        "arm_64bit=1\n" + boot.managed_block() + "dtparam=spi=on\n")


def test_a_second_copy_of_our_block_is_removed() -> None:
    twice = STOCK_CONFIG + LEGACY_BLOCK + "gpu_mem=64\n" + boot.managed_block()
    assert boot.render_config_txt(twice) == provisioned() + "gpu_mem=64\n"


def test_a_block_without_its_end_line_is_refused_not_guessed() -> None:
    with pytest.raises(boot.BootConfigError, match="no end line"):
        boot.render_config_txt(STOCK_CONFIG + boot.CONFIG_TXT_BEGIN + "\nenable_uart=1\n")


def test_a_file_without_a_final_newline_gets_the_block_on_a_line_of_its_own() -> None:
    assert boot.render_config_txt("arm_64bit=1") == "arm_64bit=1\n" + boot.managed_block()
    assert boot.render_config_txt("") == boot.managed_block()


# -- the evaluator follows the documented filter rules -----------------------------------------


def test_filters_of_one_type_replace_each_other_and_all_resets_them() -> None:
    text = "[pi4]\na=4\n[pi5]\nb=5\n[all]\nc=all\n"
    assert boot.effective_lines(text, "pi4") == ["a=4", "c=all"]
    assert boot.effective_lines(text, "pi5") == ["b=5", "c=all"]


def test_a_zero_2_w_sees_pi0_pi0w_and_pi02_and_a_pi3_b_plus_sees_pi3() -> None:
    text = "[pi0]\na\n[pi0w]\nb\n[pi02]\nc\n[pi3+]\nd\n[pi3]\ne\n[all]\n"
    assert boot.effective_lines(text, "pi02") == ["a", "b", "c"]
    assert boot.effective_lines(text, "pi3") == ["d", "e"]


def test_none_and_conditions_beyond_the_board_apply_nothing_until_all() -> None:
    text = "[none]\na\n[all]\n[EDID=VSC-TD2220]\nb\n[gpio4=1]\nc\n[all]\nd\n"
    assert boot.effective_lines(text, "pi4") == ["d"]


# -- cmdline.txt -------------------------------------------------------------------------------


@pytest.mark.parametrize("console", ["console=serial0,115200", "console=ttyAMA0,115200",
                                     "console=ttyS0,115200", "console=serial0"])
def test_every_serial_console_goes_and_everything_else_stays(console: str) -> None:
    line = f"{console} console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 rootwait\n"
    assert boot.render_cmdline_txt(line) == (
        "console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 rootwait\n")


def test_a_pi5_debug_console_put_there_on_purpose_stays() -> None:
    """ttyAMA10 is a Pi 5's 3-pin debug connector, never the GPS UART."""
    line = "console=ttyAMA10,115200 console=tty1 root=PARTUUID=4e639091-02 rootwait\n"
    assert boot.render_cmdline_txt(line) == line


def test_a_cmdline_without_a_serial_console_is_left_byte_for_byte() -> None:
    text = "console=tty1  root=/dev/mmcblk0p2 rootwait quiet"  # odd spacing, no newline
    assert boot.render_cmdline_txt(text) == text


# -- masking the serial getty ------------------------------------------------------------------


def test_the_serial_gettys_are_masked_once(tmp_path: Path) -> None:
    units = tmp_path / "etc" / "systemd" / "system"
    first = boot.mask_units(units)
    assert [what for what, _ in first] == ["masked"] * len(boot.MASKED_UNITS)
    for name in ("serial-getty@ttyAMA0.service", "serial-getty@ttyS0.service",
                 "serial-getty@serial0.service"):
        assert os.readlink(units / name) == "/dev/null"
    assert [what for what, _ in boot.mask_units(units)] == ["unchanged"] * len(boot.MASKED_UNITS)


def test_a_unit_file_in_the_way_is_replaced_by_the_mask(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    (units / "serial-getty@ttyAMA0.service").write_text("[Service]\nExecStart=/sbin/agetty\n")
    done = dict((path.name, what) for what, path in boot.mask_units(units))
    assert done["serial-getty@ttyAMA0.service"] == "updated"
    assert os.readlink(units / "serial-getty@ttyAMA0.service") == "/dev/null"
