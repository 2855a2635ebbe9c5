"""Running one command for the agent (guest side, stdlib only).

Every command gets its own session (process group), so a timeout kills
everything it started.  The common case (root, default directory) goes
through ``posix_spawn`` — a vfork, far cheaper than ``subprocess``'s Python
fork path under emulation; a ``user`` or ``cwd`` falls back to ``subprocess``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A program that is there but cannot be run gives 126, as a shell's does (a
# missing one 127); the core's exec.c keeps the same list.
CANNOT_RUN = frozenset(
    {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ENOEXEC, errno.E2BIG, errno.ELOOP, errno.ENAMETOOLONG}
    | {errno.ETXTBSY, errno.ELIBBAD, errno.EISDIR}
)
HOME = "/root"
PIPE_CHUNK = 64 * 1024  # a pipe holds 64 KiB: no read returns more
# Output still trickling in after the command exited comes from processes it
# left in the background; they keep the pipes open, so stop waiting this soon
# after the last of it, and this long after the exit at most.
BACKGROUND_GRACE = 0.05
BACKGROUND_CAP = 1.0
# A group we SIGKILLed is gone before the reply (a ``pgrep`` right after must
# not see its members dying or waiting for init to reap them); a member stuck
# in the kernel (D state) holds the reply this long at most.
GROUP_GONE_WAIT = 5.0


class Child:
    """A spawned command: pid, our ends of its pipes, its exit code once reaped.

    Reaping and signalling hold ``lock``: a signal never reaches a pid the
    kernel gave to another process after ours was reaped.  Its group (its pid:
    every command leads a session) outlives it while members remain."""

    def __init__(self, pid: int, stdin: IO[bytes] | None, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self.killed = False  # its group got a SIGKILL: the reply waits for ``gone``
        self.lock = threading.Lock()

    def reap(self, block: bool = True) -> int | None:
        if self.returncode is None and block:
            try:  # wait for the exit without reaping, so not under the lock
                os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass
        with self.lock:
            if self.returncode is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def signal(self, sig: int, group: bool) -> bool:
        """Signal the command (not once reaped) or its group (while it has members)."""
        with self.lock:
            if self.returncode is not None and not group:
                return False
            try:
                (os.killpg if group else os.kill)(self.pid, sig)
            except ProcessLookupError:
                return False
            if group and sig == signal.SIGKILL:
                self.killed = True
        return True

    def kill(self) -> None:
        self.signal(signal.SIGKILL, group=True)

    def gone(self, wait: float = GROUP_GONE_WAIT) -> None:
        """Once reaped, wait until no member of its killed group is left, not
        even a zombie (``killpg(pid, 0)`` fails only then)."""
        if not self.killed or self.returncode is None:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.002)


class SpawnFailed(Exception):
    """The command could not start; ``rc`` and ``message`` mimic a shell."""

    def __init__(self, rc: int, message: str) -> None:
        super().__init__(message)
        self.rc = rc
        self.message = message


# The agent runs out of the OOM killer's reach and at a raised priority
# (bottle-agent.service).  Its commands must get neither: with the OOM score
# inherited, a test's memory hog left the OOM killer nothing to kill (a
# kernel panic instead of the hog's SIGKILL).
_PLAIN = threading.Lock()
_oom_fd: list[int] = []
_said: list[str] = []


@contextlib.contextmanager
def plain_child() -> Iterator[None]:
    """Around a spawn: a raised priority (this thread's nice) and OOM
    protection (the agent's score) undone, so the child starts without them;
    put back after.  Only what is raised is undone: the agent's tests on a
    host run it as it comes."""
    with _PLAIN:
        if not _oom_fd:
            try:
                _oom_fd.append(os.open("/proc/self/oom_score_adj", os.O_RDWR | os.O_CLOEXEC))
            except OSError as e:
                _oom_fd.append(-1)
                _say(f"cannot read its OOM score ({e.strerror}): commands get the agent's")
        nice, adj = os.getpriority(os.PRIO_PROCESS, 0), b"0"
        try:
            if _oom_fd[0] >= 0 and (adj := os.pread(_oom_fd[0], 16, 0).strip()).startswith(b"-"):
                os.pwrite(_oom_fd[0], b"0", 0)
        except OSError as e:
            adj = b"0"
            _say(f"cannot reset its OOM score for a command ({e.strerror})")
        try:
            if nice < 0:
                os.setpriority(os.PRIO_PROCESS, 0, 0)  # this thread only: the one that spawns
        except OSError as e:
            nice = 0
            _say(f"cannot reset its priority for a command ({e.strerror})")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if adj.startswith(b"-"):
                    os.pwrite(_oom_fd[0], adj, 0)
            with contextlib.suppress(OSError):
                if nice < 0:
                    os.setpriority(os.PRIO_PROCESS, 0, nice)


def _say(what: str) -> None:
    """Once each, to the journal (the agent's stderr)."""
    if what not in _said:
        _said.append(what)
        print(f"bottle-agent: {what}", file=sys.stderr, flush=True)


def spawn(argv: list[str], env_add: dict[str, str], cwd: str | None, user: str | int | None, stdin: bool) -> Child:
    env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "HOME": HOME, "USER": "root", "LOGNAME": "root"}
    ids: dict[str, Any] = {}
    if user is not None:
        pw = _getpw(user)
        ids = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid)}
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
        if cwd is None:  # nobody's home does not exist; one the user may not enter is skipped like login(1) does
            cwd = pw.pw_dir if os.path.isdir(pw.pw_dir) and _may_enter(pw.pw_dir, ids) else "/"
        elif os.path.isdir(cwd) and not _may_enter(cwd, ids):
            raise SpawnFailed(2, f"cannot change directory to {cwd}: Permission denied\n")
    env.update(env_add)
    try:
        with plain_child():
            if ids or (cwd not in (None, HOME)):
                return _popen(argv, env, cwd or HOME, ids, stdin)
            return _posix_spawn(argv, env, stdin)
    except OSError as e:
        where = e.filename if e.filename is not None else argv[0]
        if cwd and where == cwd:  # any chdir error (a link loop, a name too long too)
            raise SpawnFailed(2, f"cannot change directory to {cwd}: {e.strerror}\n") from None
        if e.errno == errno.ENOENT:
            raise SpawnFailed(127, f"{argv[0]}: not found\n") from None
        if e.errno not in CANNOT_RUN:  # the agent's own trouble (no memory, no descriptors): an error
            raise
        raise SpawnFailed(126, f"{argv[0]}: {e.strerror}\n") from None


def _may_enter(path: str, ids: dict[str, Any]) -> bool:
    """Whether the user of ``ids`` may enter ``path``: Popen's child changes
    directory before it drops root, so that alone would let anyone in."""
    if path == "/":
        return True
    done = subprocess.run(
        ["/bin/sh", "-c", 'cd -- "$1"', "sh", path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"PATH": DEFAULT_PATH},
        cwd="/",
        **ids,
    )
    return done.returncode == 0


def _getpw(user: str | int) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(user)) if str(user).isdigit() else pwd.getpwnam(str(user))
    except KeyError:
        raise ValueError(f"no such user in the guest: {user!r}") from None


def _posix_spawn(argv: list[str], env: dict[str, str], stdin: bool) -> Child:
    spawn = os.posix_spawn
    if "/" in argv[0]:
        path: str | None = argv[0]
    elif env.get("PATH") == os.environ.get("PATH"):
        # libc searches the agent's own PATH: no Python-level search (with an
        # exception per miss) on the path every first command takes.
        path, spawn = argv[0], os.posix_spawnp
    else:
        path = shutil.which(argv[0], path=env.get("PATH", DEFAULT_PATH))
    if path is None:
        raise FileNotFoundError(2, "not found", argv[0])
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    in_r, in_w = os.pipe2(os.O_CLOEXEC) if stdin else (os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), -1)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
        pid = spawn(path, argv, env, file_actions=actions, setsid=True)
    except BaseException:
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
            if fd >= 0:
                os.close(fd)
        raise
    for fd in (out_w, err_w, in_r):
        os.close(fd)
    return Child(pid, os.fdopen(in_w, "wb") if stdin else None, out_r, err_r)


def _popen(argv: list[str], env: dict[str, str], cwd: str, ids: dict[str, Any], stdin: bool) -> Child:
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
        # SIGPIPE stays ignored, as on the posix_spawn path (docs/reference.md, exec)
        restore_signals=False,
        **ids,
    )
    assert proc.stdout is not None and proc.stderr is not None
    # We reap it ourselves (waitpid); Popen must not try again.
    child = Child(proc.pid, proc.stdin, os.dup(proc.stdout.fileno()), os.dup(proc.stderr.fileno()))
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = 0
    return child


def pump(child: Child, emit: Callable[[int, bytes], None], timeout: float | None) -> bool:
    """Forward output as ``emit(fd_kind, data)`` (1 stdout, 2 stderr) until the
    command and its pipes are done; kill its group on timeout.  Returns timed_out."""
    kinds = {child.stdout: 1, child.stderr: 2}
    buf = bytearray(PIPE_CHUNK)  # reused: see frames.Channel
    view = memoryview(buf)
    open_fds = {fd for fd in kinds if fd >= 0}  # -1: closed before the core handed it over
    pidfd = os.pidfd_open(child.pid)
    deadline = None if timeout is None else time.monotonic() + float(timeout)
    timed_out = False
    exited_at: float | None = None
    exit_time = 0.0
    try:
        while open_fds:
            now = time.monotonic()
            if deadline is not None and now >= deadline:  # checked each round: a flood never lets select idle
                timed_out = True
                child.kill()
                deadline = None
            if exited_at is not None:
                wait: float | None = max(0.0, min(exited_at + BACKGROUND_GRACE, exit_time + BACKGROUND_CAP) - now)
            elif deadline is not None:
                wait = max(0.0, deadline - now)
            else:
                wait = None
            ready, _, _ = select.select(list(open_fds) + ([pidfd] if exited_at is None else []), [], [], wait)
            if not ready:
                if exited_at is not None:
                    break
                timed_out = True
                child.kill()
                deadline = None
                continue
            for fd in ready:
                if fd == pidfd:
                    child.reap(block=False)  # it exited: no wait
                    exited_at = exit_time = time.monotonic()
                    continue
                n = os.readv(fd, [buf])
                if n:
                    emit(kinds[fd], bytes(view[:n]))
                    if exited_at is not None:
                        exited_at = time.monotonic()
                else:
                    open_fds.discard(fd)
                    os.close(fd)
        if child.returncode is None:
            timed_out = _wait_until(child, deadline) or timed_out
    finally:
        os.close(pidfd)
        for fd in open_fds:
            os.close(fd)
    return timed_out


def _wait_until(child: Child, deadline: float | None) -> bool:
    """Reap a child whose pipes closed before it exited; kill it at the deadline."""
    while child.reap(block=deadline is None) is None:
        if deadline is not None and time.monotonic() >= deadline:
            child.kill()
            child.reap()
            return True
        time.sleep(0.01)
    return False
