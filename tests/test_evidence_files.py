"""`evidence_format.files.atomic_write`: the one way a file that matters is replaced."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from evidence_format.files import atomic_write


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    """A CRL an administrator made group-readable for the broker stays so after a revocation."""
    crl = tmp_path / "crl.pem"
    crl.write_bytes(b"old")
    os.chmod(crl, 0o640)
    atomic_write(crl, b"new")
    assert (crl.read_bytes(), mode(crl)) == (b"new", 0o640)


def test_a_new_file_gets_the_umask_as_open_would(tmp_path: Path) -> None:
    umask = os.umask(0o027)
    try:
        atomic_write(tmp_path / "registry.json", b"{}")
    finally:
        os.umask(umask)
    assert mode(tmp_path / "registry.json") == 0o640


def test_a_key_is_written_with_its_mode_even_over_a_readable_file(tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    key.write_bytes(b"old")
    os.chmod(key, 0o644)
    atomic_write(key, b"secret", mode=0o600)
    assert mode(key) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "registry.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json"]


def test_a_symlink_where_the_temp_file_would_go_is_not_followed(tmp_path: Path) -> None:
    """The temp name is new each time and opened with O_EXCL|O_NOFOLLOW."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "registry.json.tmp").symlink_to(outside)
    atomic_write(tmp_path / "dir" / "registry.json", b"new")
    assert outside.read_bytes() == b"untouched"
