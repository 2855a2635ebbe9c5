"""Why QEMU's writes failed, when a file system is full: the free-space rule alone."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_bottle.vmm import room
from pytest_bottle.vmm.qemu import MachineConfig


def _statvfs(monkeypatch: pytest.MonkeyPatch, *, avail: int, free: int, euid: int) -> None:
    fs = SimpleNamespace(f_bavail=avail, f_bfree=free, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda path: fs)
    monkeypatch.setattr(os, "geteuid", lambda: euid)


def test_a_state_write_is_blamed_on_a_full_file_system_only_when_it_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    target = Path("/c/snapshots/x/stream")
    _statvfs(monkeypatch, avail=0, free=0, euid=1000)
    assert room.write_failed(target) == f"; the host's file system under {target} is full (0 KiB free)"
    _statvfs(monkeypatch, avail=0, free=10_000, euid=0)  # ext4's reserved blocks: root may still write
    assert room.write_failed(target) == ""
    _statvfs(monkeypatch, avail=0, free=10_000, euid=1000)  # ... another user may not
    assert "is full (0 KiB free)" in room.write_failed(target)
    _statvfs(monkeypatch, avail=1000, free=1000, euid=1000)  # 4 MB free: something else failed
    assert room.write_failed(target) == ""


def test_a_sigbus_is_blamed_on_a_full_file_system_only_for_a_ram_file_written_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = MachineConfig(kernel=Path("k"), initrd=Path("i"), disk=Path("d"), memory_mb=512)
    seed = MachineConfig(kernel=Path("k"), initrd=Path("i"), disk=Path("d"), memory_mb=512, save_ram=Path("/c/s/ram"))
    _statvfs(monkeypatch, avail=256, free=256, euid=1000)  # 1 MiB free
    said = room.ram_bus_error(seed, -signal.SIGBUS)
    assert said == (
        " (SIGBUS: its guest RAM is the file /c/s/ram, and the host's file system under it is full: "
        "1 MiB free, for a machine of 512 MiB)"
    )
    assert room.ram_bus_error(seed, -signal.SIGSEGV) == "" and room.ram_bus_error(base, -signal.SIGBUS) == ""
    _statvfs(monkeypatch, avail=1 << 20, free=1 << 20, euid=1000)  # 4 GiB free: not the file system
    assert room.ram_bus_error(seed, -signal.SIGBUS) == ""
