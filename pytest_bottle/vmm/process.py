"""Starting and ending QEMU processes so that none outlives its owner.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the
process.  So every child is forked by one long-lived spawner thread, never by
a short-lived worker thread whose exit would kill the VM.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from .forks import ForkSafePool

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
_libc = ctypes.CDLL(None, use_errno=True)
_spawner = ForkSafePool(1, "bottle-spawner")


def die_with(parent: int, sig: int) -> None:
    """In a child between fork and exec: get ``sig`` when the forking thread of
    ``parent`` (its pid, read before the fork) dies."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    # The parent may already be gone between fork and prctl; an orphan is
    # re-parented to a subreaper as well as to init, so compare pids.
    if os.getppid() != parent:
        os._exit(1)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = True,
    small_pages: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with output to ``log_path``, killed if this process dies.

    ``die_with_parent=False`` (for ``--bottle-keep``) lets the child outlive
    us in its own session; the run-state record then is its only leash.
    ``small_pages``: the child gets no transparent huge pages (see
    :func:`no_huge_pages`).
    """
    argv = list(argv)
    preexec: Callable[[], None] | None = None
    if die_with_parent:
        setpriv = _setpriv()
        if setpriv:
            # Python code between fork and exec (preexec_fn) forces a full fork
            # of this process: ~6 ms against ~0.2 ms for the vfork Popen does
            # otherwise.  setpriv (util-linux) sets the signal, then execs.
            argv = leashed(setpriv, argv)
        else:
            preexec = functools.partial(die_with, os.getpid(), signal.SIGKILL)

    def start() -> subprocess.Popen[bytes]:
        # The child's files (memory state, console, overlays) are the user's
        # alone: a clone's disk holds its SSH host key.
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "ab") as out, no_huge_pages(small_pages):
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
                umask=0o077,
            )

    return _spawner.submit(start).result()


@contextlib.contextmanager
def no_huge_pages(wanted: bool = True) -> Iterator[None]:
    """Children started meanwhile get no transparent huge pages.

    The flag belongs to a process's memory and is copied to a child and kept
    across exec; no other way reaches a child that Popen starts without
    running Python in it (which costs a full fork, see spawn).  So it is set
    on this process for the moment of the start and then put back: a page
    this process faults in meanwhile is an ordinary one, and a child another
    thread starts meanwhile has no huge pages either; nothing else.
    """
    if not wanted or _libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) != 0:
        yield  # not asked, or already so (the user's choice, which stays)
        return
    if _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        yield  # a kernel without it (before 3.15): nothing to do
        return
    try:
        yield
    finally:
        _libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)


# After setpriv's prctl: a parent that died before it (a kill -9 as the VM
# started) sent no signal, and the child would run on, orphaned, until a sweep.
_PARENT_CHECK = '[ "$PPID" = "$1" ] || exit 1; shift; exec "$@"'


def leashed(setpriv: str, argv: Sequence[str], parent: int | None = None) -> list[str]:
    """``argv`` run with SIGKILL on the death of ``parent`` (this process),
    and not at all if it is already dead when the signal is set."""
    check = ["/bin/sh", "-c", _PARENT_CHECK, "sh", str(os.getpid() if parent is None else parent)]
    return [setpriv, "--pdeathsig", "KILL", "--", *check, *argv]


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


# A process is known by its pid, the kernel's start time in clock ticks since
# boot and the boot id: "<ticks>@<boot id>".  Unlike a wall-clock start time
# (psutil's create_time, derived from the boot time in wall-clock terms), it
# does not move when the clock is stepped.  A float (records written before
# this format) or None is an identity that cannot be proven.
Identity = str | float | None


@functools.cache
def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


@functools.cache
def machine_id() -> str:
    """This host, for state that several hosts may share (a cache on an NFS home).

    A boot id only tells boots of one machine apart: another host's boot id
    differs from ours while its processes are alive.
    """
    try:
        with open("/etc/machine-id") as f:
            if ident := f.read().strip():
                return ident
    except OSError:
        pass
    return f"host:{socket.gethostname()}"


_NS: tuple[int, str] | None = None  # (pid, namespace): read once per process, forks included


def pid_namespace() -> str:
    """This process's pid namespace ("pid:[inode]"); its pids mean nothing elsewhere."""
    global _NS
    pid = os.getpid()
    if _NS is None or _NS[0] != pid:
        try:
            _NS = (pid, os.readlink("/proc/self/ns/pid"))
        except OSError:
            _NS = (pid, "")
    return _NS[1]


def foreign(machine: str | None, pid_ns: str | None) -> str | None:
    """Why pids recorded on ``machine`` in ``pid_ns`` cannot be judged from here, or None.

    Empty values (state written before these were recorded) count as ours.
    """
    if machine and machine != machine_id():
        return f"it is from another machine ({machine})"
    if pid_ns and pid_ns != pid_namespace():
        return f"it is from another pid namespace ({pid_ns})"
    return None


def parse_stat(raw: bytes) -> tuple[str, int]:
    """(state, start time in clock ticks) from a /proc/PID/stat line.

    The command name (field 2) may hold spaces, parentheses and bytes that
    are not UTF-8 (a name cut mid-character), so the line stays bytes and the
    fields are counted from its last ')'; start time is field 22.
    """
    rest = _after_comm(raw)
    return rest[0].decode("ascii"), int(rest[19])


def _after_comm(raw: bytes) -> list[bytes]:
    """The fields of a /proc/PID/stat line after the command name: state first."""
    return raw[raw.rindex(b")") + 2 :].split()


def parent_pid(pid: int) -> int | None:
    """The parent of a running process, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(_after_comm(f.read())[1])
    except (OSError, ValueError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    """The identity of a running process, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state, ticks = parse_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None
    if state in ("Z", "X"):  # exited, only its exit status is left
        return None
    return f"{ticks}@{boot_id()}"


_WALL: tuple[int, float | None] | None = None  # this process's own wall_start, asked at every lease


def wall_start(pid: int) -> float | None:
    """The wall-clock start time older versions identified processes by (kept
    in leases so that they can still read a state directory we share)."""
    global _WALL
    if _WALL is not None and _WALL[0] == pid == os.getpid():
        return _WALL[1]
    try:
        started: float | None = float(psutil.Process(pid).create_time())
    except psutil.Error:
        started = None
    if pid == os.getpid():
        _WALL = (pid, started)
    return started


def is_same_process(pid: int, started: Identity) -> bool:
    """Whether ``pid`` is provably the process ``started`` identifies (safe to signal)."""
    return isinstance(started, str) and start_time(pid) == started


def is_alive(pid: int, started: Identity) -> bool:
    """Whether the process may still be alive: False only when it is provably gone.

    An identity of another boot is gone whatever runs under that pid now; an
    old wall-clock identity (float) or None counts as alive while the pid exists.
    """
    if isinstance(started, str):
        if started.rpartition("@")[2] != boot_id():
            return False
        return start_time(pid) == started
    return start_time(pid) is not None


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


def kill_pid(pid: int, started: Identity, grace: float = 2.0) -> bool:
    """End a process we may not have forked (a dead run's QEMU), checking identity first.

    Returns whether it was ours to end (False: gone already, or its identity
    cannot be proven).  Raises PermissionError for another user's process.
    """
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
