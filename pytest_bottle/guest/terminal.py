"""The agent's process operations besides ``exec``: signals, and a shell on a
pseudo-terminal (guest side, stdlib only).

``op_pty`` runs a command as the session leader of a new pty, so it gets a
controlling terminal: Ctrl-C (a 0x03 byte in its input) becomes SIGINT for
the foreground job, job control works, and ``op_resize`` sets the window size
(the kernel sends SIGWINCH).  The host streams keystrokes as DATA and gets
the terminal's output as STDOUT, both flow-controlled like ``exec``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import select
import signal
import struct
import termios
import threading
from collections.abc import Callable
from typing import Any

try:  # on the host, as part of the package
    from . import execute, frames
except ImportError:  # in the guest, files side by side
    import execute  # type: ignore[import-not-found,no-redef]
    import frames  # type: ignore[import-not-found,no-redef]

READ_SIZE = 64 * 1024
MAX_GROUPS = 256  # spawned groups remembered before the empty ones are pruned
EXIT_GRACE = 0.2  # output still read after the command exited, seconds


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


# The command starts as a new session's leader (posix_spawn's setsid, no
# Python code in the child of this multi-threaded agent); a session leader
# that opens a terminal without O_NOCTTY gets it as its controlling terminal,
# so the shell opens the pty again by name, then execs the command.
# A terminal's shell starts with these at their defaults whatever the agent
# has (Python ignores SIGPIPE; an agent started in the background of a shell
# ignores SIGINT and SIGQUIT, and an ignored signal stays ignored across exec).
DEFAULT_SIGNALS = (
    signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGHUP, signal.SIGTERM,
    signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD,
)  # fmt: skip
# The pty's name is $1: $0 is what the shell calls itself in its errors
# ("sh: 1: exec: htpo: not found"), so it is "sh", as for any sh -c.
CTTY_WRAPPER = 'exec 0<>"$1" 1>&0 2>&0 && cd "$HOME" 2>/dev/null; shift; exec "$@"'


def login_shell() -> list[str]:
    shell = pwd.getpwuid(0).pw_shell or "/bin/sh"
    return [shell if os.path.exists(shell) else "/bin/sh", "-l"]


class Link:
    """A spawned command's tie to the host session that started it.  Once
    ``cut`` (a new session), its output is read and dropped: it never blocks
    on a full pipe, and no frame of its old request id reaches the new host."""

    def __init__(self, rid: int, detached: bool = False) -> None:
        self.rid = rid
        self.lock = threading.Lock()
        self.detached = detached

    def cut(self) -> None:
        with self.lock:  # waits out a send under way (the session's windows are aborted first)
            self.detached = True


class ProcessOps:
    """Mixed into ``agent.Agent``: uses its ``lock``, ``procs``, ``emit``, ``chan``, ``windows``."""

    lock: threading.Lock
    procs: dict[int, execute.Child]
    cancelled: set[int]
    ptys: dict[int, int]
    groups: dict[int, execute.Child]
    emit: Callable[[int, int, bytes], None]
    chan: frames.Channel
    windows: frames.Windows
    session: int

    def forward(self, link: Link, kinds: dict[int, int], fd_kind: int, data: bytes) -> None:
        """A spawned command's output: to its host, or nowhere once detached."""
        with link.lock:
            if link.detached:
                return
            try:
                self.windows.take(link.rid, len(data))
            except frames.Aborted:  # a new session is cutting this link
                return
            self.chan.send(frames.frame(kinds[fd_kind], link.rid, data))

    def op_signal(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        """Signal a command of this session (``target``: its request id);
        ``group``: its whole process group, which a spawned command's keeps
        while members remain after its own exit.  ``sent`` is false once it is over."""
        target, group = int(call["target"]), bool(call.get("group"))
        with self.lock:
            child = self.procs.get(target) or self.groups.get(target)
        if child is None:
            return {"sent": False}
        sent = child.signal(int(call["signal"]), group)  # under the lock that reaps it
        if sent and child.returncode is not None:  # no exec reply will wait for the group: this one does
            child.gone()
        if not sent and child.returncode is not None:
            with self.lock:
                self.groups.pop(target, None)
        return {"sent": sent}

    def op_end(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        """Kill every command, shell and spawned group of this session (a kept
        bottle: nobody will read their output any more)."""
        return {"killed": self.end_all(but=rid)}

    def end_all(self, but: int = 0) -> int:
        with self.lock:
            children = [c for r, c in self.procs.items() if r != but] + list(self.groups.values())
            self.groups.clear()
        return sum(child.signal(signal.SIGKILL, group=True) for child in children)

    def drop_groups(self, pid: int) -> None:
        """Under ``lock``: ``pid`` was handed out again, so a group of that id
        remembered from before is empty (the kernel reuses no pid a group still
        holds); a late ``killpg`` must not reach the new command's group."""
        if self.groups:
            for stale in [r for r, c in self.groups.items() if c.pid == pid]:
                del self.groups[stale]

    def keep_group(self, rid: int, child: execute.Child) -> None:
        """Under ``lock``: remember a spawned command's group.  Its pid handed
        out again means the old group is empty; past ``MAX_GROUPS``, empty
        groups are dropped."""
        self.drop_groups(child.pid)
        if len(self.groups) >= MAX_GROUPS:
            for r, c in list(self.groups.items()):
                if c.returncode is not None and not c.signal(0, group=True):
                    del self.groups[r]
        self.groups[rid] = child

    def op_resize(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        with self.lock:
            fd = self.ptys.get(int(call["target"]))
        if fd is not None:
            set_size(fd, int(call["rows"]), int(call["cols"]))
        return {"resized": fd is not None}

    def op_pty(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        argv = [str(a) for a in call.get("argv") or login_shell()]
        env = {"PATH": execute.DEFAULT_PATH, "LANG": "C.UTF-8", "HOME": execute.HOME, "USER": "root"}
        env.update(LOGNAME="root", TERM=str(call.get("term") or "vt100"), SHELL=argv[0])
        master, slave = os.openpty()
        try:
            set_size(master, int(call.get("rows") or 24), int(call.get("cols") or 80))
            actions = [(os.POSIX_SPAWN_DUP2, slave, fd) for fd in (0, 1, 2)]
            wrapped = ["/bin/sh", "-c", CTTY_WRAPPER, "sh", os.ttyname(slave), *argv]
            with execute.plain_child():
                pid = os.posix_spawn(
                    "/bin/sh", wrapped, env, file_actions=actions, setsid=True, setsigdef=DEFAULT_SIGNALS, setsigmask=()
                )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        child = execute.Child(pid, None, -1, -1)
        with self.lock:
            stale = call.get("_session") != self.session  # see agent.op_exec
            if not stale:
                self.procs[rid], self.ptys[rid] = child, master
                self.drop_groups(child.pid)
            cancelled = rid in self.cancelled and not stale  # see agent.Agent.cancel
        if stale or cancelled:
            child.kill()
        # Its own fd: the terminal may close here while it still writes.
        threading.Thread(target=_type_in, args=(os.dup(master), inbox), daemon=True).start()
        try:
            _pump(master, child.pid, lambda data: self.emit(rid, frames.STDOUT, data))
        except BaseException:  # the host left: nobody sees this terminal any more
            child.kill()
            raise
        finally:
            with self.lock:
                if self.procs.get(rid) is child:  # not a new session's call of the same id
                    del self.procs[rid]
                    del self.ptys[rid]
            child.reap()
            inbox.put(frames.EOF, b"")
            os.close(master)
        return {"rc": child.returncode}


def _pump(master: int, pid: int, emit: Callable[[bytes], None]) -> None:
    """The terminal's output until every holder of its other end closed it
    (EIO), or shortly after the command exited (a background job it left may
    hold the terminal for good)."""
    pidfd = os.pidfd_open(pid)
    exited = False
    try:
        while True:
            ready, _, _ = select.select([master] + ([] if exited else [pidfd]), [], [], EXIT_GRACE if exited else None)
            if not ready:
                return
            if pidfd in ready:
                exited = True
                continue
            try:
                data = os.read(master, READ_SIZE)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                if e.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            emit(data)
    finally:
        os.close(pidfd)


def _type_in(fd: int, inbox: frames.Inbox) -> None:
    try:
        for chunk in inbox.chunks():
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    except (OSError, frames.Aborted):
        pass
    finally:
        os.close(fd)
