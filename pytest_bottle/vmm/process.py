"""Starting and ending QEMU processes so that none outlives its owner.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the
process.  So every child is forked by one long-lived spawner thread, never by
a short-lived worker thread whose exit would kill the VM.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child between fork and exec: get ``sig`` when the forking thread dies."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    # The parent may already be gone between fork and prctl.
    if os.getppid() == 1:
        os._exit(1)


def _die_with_parent_kill() -> None:
    die_with_parent(signal.SIGKILL)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with output to ``log_path``, killed if this process dies.

    ``die_with_parent=False`` (for ``--bottle-keep``) lets the child outlive
    us in its own session; the run-state record then is its only leash.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bottle-spawner")

    argv = list(argv)
    preexec: Callable[[], None] | None = None
    if die_with_parent:
        setpriv = _setpriv()
        if setpriv:
            # Python code between fork and exec (preexec_fn) forces a full fork
            # of this process: ~6 ms against ~0.2 ms for the vfork Popen does
            # otherwise.  setpriv (util-linux) sets the signal, then execs.
            # (Unlike die_with_parent(), it cannot see a parent that died in
            # the microseconds before; the run record's sweep covers that.)
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        else:
            preexec = _die_with_parent_kill

    def start() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=tuple(pass_fds),
                preexec_fn=preexec,
                start_new_session=not die_with_parent,
                env=env,
                cwd=cwd,
            )

    return _spawner.submit(start).result()


@functools.cache
def _setpriv() -> str | None:
    """setpriv if it knows --pdeathsig (util-linux 2.33 and later), else None."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        r = subprocess.run([path, "--pdeathsig", "KILL", "--", "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if r.returncode == 0 else None


def start_time(pid: int) -> float | None:
    """The process's start time, to tell it from a later process with the same pid."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def is_same_process(pid: int, started: float | None) -> bool:
    now = start_time(pid)
    return now is not None and (started is None or abs(now - started) < 0.5)


def terminate(proc: subprocess.Popen[Any], grace: float = 2.0) -> int | None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reap; return the exit code."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.terminate()
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def kill_pid(pid: int, started: float | None, grace: float = 2.0) -> bool:
    """End a process we may not have forked (a dead run's QEMU), checking identity first."""
    if not is_same_process(pid, started):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not is_same_process(pid, started):
                return True
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True
