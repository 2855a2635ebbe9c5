"""File locks that say who holds them: a wait is never silent or anonymous."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ..terminal_text import printable
from ..vmm.process import parent_pid
from . import progress

log = logging.getLogger(__name__)

# A build legitimately holds its lock for minutes: report a long wait this often.
REPORT_EVERY = 30.0
# A wait on a holder whose progress does not show here is shown after this long.
SHOW_AFTER = 3.0
# How execnet starts a local (popen) gateway: an xdist worker's command line.
WORKER_BOOTSTRAP = b"import sys;exec(eval(sys.stdin.readline()))"


def lock_holder(lock_path: Path) -> str:
    """Who holds an flock on ``lock_path``, from /proc/locks: pid and command line."""
    return _describe(_holder_pids(lock_path))


def _describe(pids: list[str]) -> str:
    return ", ".join(f"pid {pid} ({_cmdline(pid)})" for pid in pids)


def _holder_pids(lock_path: Path) -> list[str]:
    try:
        st = os.stat(lock_path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    dev = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    pids = []
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields and dev in fields:
            pids.append(fields[fields.index(dev) - 1])
    return pids


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(1 << 16)  # another user's process: its arguments can be megabytes
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return "not visible here"
    if WORKER_BOOTSTRAP in raw:  # execnet's bootstrap says nothing of what it runs
        return f"uid {owner}: a pytest-xdist worker"
    # Another user's process names itself: shown, not obeyed, on the terminal.
    return f"uid {owner}: " + printable(raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200])


def _reported_here(pids: list[str]) -> bool:
    """Whether the holder's own progress shows where ours would: this process
    (another thread's task), or a sibling xdist worker (its lines reach the
    same controller).  Anything else, a ``bottle image build`` in another
    terminal, another CI job on a shared cache, shows nothing here."""
    me, parent, worker = str(os.getpid()), os.getppid(), bool(os.environ.get("PYTEST_XDIST_WORKER"))
    for pid in pids:
        if pid == me:
            continue
        if not (worker and parent_pid(int(pid)) == parent and is_xdist_worker(pid)):
            return False
    return bool(pids)


def is_xdist_worker(pid: str) -> bool:
    """Whether ``pid`` is a local xdist worker.  Its environment shows no
    PYTEST_XDIST_WORKER (set in Python after the start): its command line does."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return WORKER_BOOTSTRAP in f.read(1 << 16)
    except OSError:
        return False


@contextmanager
def reporting_lock(
    lock_path: Path, what: str, every: float = REPORT_EVERY, show_after: float = SHOW_AFTER
) -> Iterator[None]:
    """Hold ``lock_path`` (no time limit), logging every ``every`` seconds of
    waiting who holds it, so a long wait names the build (or the stuck process).
    A wait past ``show_after`` on a holder whose progress does not show here is
    a progress task of its own: the terminal says what it waits for."""
    lock = FileLock(str(lock_path))
    try:  # one finally for the wait and the hold: an exception while waiting leaves nothing held
        with contextlib.ExitStack() as shown:
            _wait(lock, lock_path, what, every, show_after, shown)
        yield
    finally:
        lock.release()


def _wait(
    lock: FileLock, lock_path: Path, what: str, every: float, show_after: float, shown: contextlib.ExitStack
) -> None:
    if _try(lock):
        return
    shown.enter_context(progress.work())  # from the first moment: pytest-timeout does not count it
    started = time.monotonic()
    next_note = started + every
    decide: float | None = started + show_after
    while True:
        until = next_note if decide is None else min(next_note, decide)
        try:
            lock.acquire(timeout=max(0.01, until - time.monotonic()))
            return
        except Timeout:
            pass
        now = time.monotonic()
        if decide is not None and now >= decide:
            decide = None  # once: a task, or none, for the whole wait
            pids = _holder_pids(lock_path)
            if not pids and _try(lock):  # let go meanwhile
                return
            if not _reported_here(pids):
                holder = _describe(pids) or "a process not visible here"
                shown.enter_context(progress.task(f"waiting for {what}", f"held by {holder}"))
        if now >= next_note:
            next_note = now + every
            holder = lock_holder(lock_path)
            if not holder and _try(lock):  # let go since the timeout: no one to name
                return
            log.warning(
                "waiting %.0f s for %s (%s), held by %s",
                now - started,
                what,
                lock_path,
                holder or "a process not visible here",
            )


def _try(lock: FileLock) -> bool:
    try:
        lock.acquire(blocking=False)
        return True
    except Timeout:
        return False
