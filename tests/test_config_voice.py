"""The centre's [voice] section: STUN/TURN URLs and the TURN secret, read and checked at start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from control_center.config import CenterConfig, load_center_config, voice_settings
from control_center.turn_credentials import ice_servers_for, turn_password
from protocol.configfile import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BASE = ('[center]\ndb = "c.sqlite"\nfleet_dir = "fleet"\n'
        '[broker]\nhost = "h"\nport = 8883\nca_file = "ca.pem"\n')
TURN = '"turn:turn.example:3478?transport=udp"'


def load(tmp_path: Path, voice: str) -> CenterConfig:
    path = tmp_path / "center.toml"
    path.write_text(BASE + "[voice]\n" + voice)
    return load_center_config(path)


def refused(tmp_path: Path, voice: str) -> str:
    with pytest.raises(ConfigError) as error:
        load(tmp_path, voice)
    return str(error.value)


def test_a_config_without_voice_has_no_voice_settings(tmp_path: Path) -> None:
    (tmp_path / "center.toml").write_text(BASE)
    assert load_center_config(tmp_path / "center.toml").voice is None


def test_the_turn_secret_is_read_beside_the_config_without_its_trailing_newline(
        tmp_path: Path) -> None:
    (tmp_path / "turn-secret").write_text("s3cret-of-coturn\n")
    voice = load(tmp_path, f'ice_urls = [{TURN}]\nturn_secret_file = "turn-secret"\n').voice
    assert voice is not None
    assert voice.turn_secret == b"s3cret-of-coturn"
    assert voice.turn_secret_file == tmp_path / "turn-secret"
    assert voice.ice_urls == ("turn:turn.example:3478?transport=udp",)


def test_credentials_are_minted_from_the_secret_in_the_file(tmp_path: Path) -> None:
    (tmp_path / "turn-secret").write_text("s3cret-of-coturn\n")
    voice = load(tmp_path, f'ice_urls = [{TURN}]\nturn_secret_file = "turn-secret"\n').voice
    assert voice is not None
    [server] = ice_servers_for("pil-01", 1_800_000_000, voice)
    assert server["credential"] == turn_password(b"s3cret-of-coturn", "1800003600:pil-01")


def test_a_missing_secret_file_stops_the_centre_naming_the_key(tmp_path: Path) -> None:
    text = refused(tmp_path, f'ice_urls = [{TURN}]\nturn_secret_file = "nowhere"\n')
    assert "key 'voice.turn_secret_file'" in text and "no such file" in text


def test_an_empty_secret_file_stops_the_centre_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "turn-secret").write_text("\n")
    text = refused(tmp_path, f'ice_urls = [{TURN}]\nturn_secret_file = "turn-secret"\n')
    assert "key 'voice.turn_secret_file'" in text and "is empty" in text


def test_a_secret_coturns_config_line_could_not_hold_is_refused(tmp_path: Path) -> None:
    (tmp_path / "turn-secret").write_text("two words\n")
    text = refused(tmp_path, f'ice_urls = [{TURN}]\nturn_secret_file = "turn-secret"\n')
    assert "key 'voice.turn_secret_file'" in text and "without spaces" in text


def test_a_turn_url_without_a_secret_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    assert "key 'voice.turn_secret_file': missing" in refused(tmp_path, f"ice_urls = [{TURN}]\n")


def test_stun_alone_needs_no_secret(tmp_path: Path) -> None:
    voice = load(tmp_path, 'ice_urls = ["stun:stun.example:3478"]\n').voice
    assert voice is not None and voice.turn_secret is None


@pytest.mark.parametrize("url", ["http://turn.example", "turn:[::1]:3478",
                                 "turn:turn.example:3478?transport=tls", "stuns:s.example"])
def test_a_url_aiortc_cannot_use_is_refused_naming_its_entry(tmp_path: Path, url: str) -> None:
    assert "key 'voice.ice_urls[0]': must be a stun:, turn: or turns: URL" in refused(
        tmp_path, f'ice_urls = ["{url}"]\n')


def test_an_unknown_key_in_voice_is_refused_naming_it(tmp_path: Path) -> None:
    assert "unknown key 'voice.bogus'" in refused(tmp_path, "bogus = 1\n")


def test_a_voice_section_given_in_code_is_checked_as_from_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("voice: key 'answer_timeout_s'")):
        voice_settings({"answer_timeout_s": 0}, tmp_path)


def test_the_examples_voice_section_loads_once_uncommented(tmp_path: Path) -> None:
    """hw/examples/center.toml carries it commented out, as its secret file must exist."""
    example = (ROOT / "hw" / "examples" / "center.toml").read_text()
    block = re.search(r"^# \[voice\]\n((?:# .*\n)+)", example, re.MULTILINE)
    assert block is not None
    voice = "".join(line[2:] + "\n" for line in block.group(1).splitlines())
    (tmp_path / "turn-secret").write_text("0123456789abcdef\n")
    settings = load(tmp_path, voice.replace("/etc/sos-center/turn-secret",
                                            str(tmp_path / "turn-secret"))).voice
    assert settings is not None and len(settings.ice_urls) == 4
