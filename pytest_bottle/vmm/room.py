"""Why QEMU's writes to a file failed when the host's file system under it
is full: QEMU itself says only "exited with -7" or "migration failed"."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .qemu import MachineConfig


def _free(path: Path) -> int | None:
    """Free bytes for us under ``path``: root may also write into ext4's reserved blocks."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def ram_bus_error(cfg: MachineConfig, rc: int) -> str:
    """A SIGBUS (``rc``) of a QEMU whose guest RAM is written through to a file
    (a seed's) that found its file system full: the faulting write had no page."""
    ram = cfg.ram_file
    if rc != -signal.SIGBUS or ram is None or not ram[1]:
        return ""
    free = _free(ram[0])
    if free is None or free >> 20 >= cfg.memory_mb:
        return ""
    return (
        f" (SIGBUS: its guest RAM is the file {ram[0]}, and the host's file system under it is full: "
        f"{free >> 20} MiB free, for a machine of {cfg.memory_mb} MiB)"
    )


def write_failed(path: Path) -> str:
    """Why a state written to ``path`` (``exec:cat > path``) failed, if its file system has no room left."""
    free = _free(path)
    if free is None or free >= 1 << 20:
        return ""
    return f"; the host's file system under {path} is full ({free >> 10} KiB free)"
