"""File locks that say who holds them: a wait is never silent or anonymous."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

# A build legitimately holds its lock for minutes: report a long wait this often.
REPORT_EVERY = 30.0


def lock_holder(lock_path: Path) -> str:
    """Who holds an flock on ``lock_path``, from /proc/locks: pid and command line."""
    try:
        st = os.stat(lock_path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    dev = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    holders = []
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields and dev in fields:
            pid = fields[fields.index(dev) - 1]
            holders.append(f"pid {pid} ({_cmdline(pid)})")
    return ", ".join(holders)


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return "not visible here"
    return f"uid {owner}: " + raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200]


@contextmanager
def reporting_lock(lock_path: Path, what: str, every: float = REPORT_EVERY) -> Iterator[None]:
    """Hold ``lock_path`` (no time limit), logging every ``every`` seconds of
    waiting who holds it, so a long wait names the build (or the stuck process)."""
    lock = FileLock(str(lock_path))
    started = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=every)
            break
        except Timeout:
            log.warning(
                "waiting %.0f s for %s (%s), held by %s",
                time.monotonic() - started,
                what,
                lock_path,
                lock_holder(lock_path) or "a process not visible here",
            )
    try:
        yield
    finally:
        lock.release()
