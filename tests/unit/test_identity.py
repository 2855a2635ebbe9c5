"""The guest's in-place file writes (pure file operations, run on the host)."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_bottle.guest.identity import _write


def test_write_creates_with_mode_and_overwrites_in_place(tmp_path: Path) -> None:
    path = tmp_path / "machine-id"
    _write(str(path), "a" * 32 + "\n", 0o444)
    assert path.read_text() == "a" * 32 + "\n" and path.stat().st_mode & 0o777 == 0o444
    inode = path.stat().st_ino
    path.chmod(0o644)  # an existing file keeps its mode: no chmod on the restore path
    _write(str(path), "b" * 32 + "\n", 0o444)
    assert path.read_text() == "b" * 32 + "\n"
    assert path.stat().st_ino == inode and path.stat().st_mode & 0o777 == 0o644


def test_write_shorter_and_longer_content_leaves_exactly_the_new_text(tmp_path: Path) -> None:
    path = tmp_path / "hostname"
    _write(str(path), "btl-00000000\n", 0o644)
    _write(str(path), "short\n", 0o644)
    assert path.read_bytes() == b"short\n"
    _write(str(path), "a-much-longer-name\n", 0o644)
    assert path.read_bytes() == b"a-much-longer-name\n"
    assert os.stat(path).st_size == len("a-much-longer-name\n")
