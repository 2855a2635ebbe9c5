"""Parking the agent behind its compiled core before a snapshot (guest side, stdlib only).

Under emulation every restore translates afresh all the code a clone runs, and
the interpreter's share of a restore was about 7,900 of 31,000 blocks.  So a
seed, last thing before its snapshot, hands the port to ``bottle-agent-core``
(``guest/core``, static C): a clone's SYNC, ``hello``, ``setup`` and plain
``exec`` calls never wake Python.  This agent waits, parked, and gets the port
back at the first call the core does not serve (the handback), with the
commands the core still runs: they become this agent's children, since it is
the core's parent and a child subreaper while the core exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import threading
from typing import Any

try:  # on the host, as part of the package
    from . import execute, frames
except ImportError:  # in the guest, files side by side
    import execute  # type: ignore[import-not-found,no-redef]
    import frames  # type: ignore[import-not-found,no-redef]

CORE = "/usr/lib/pytest-bottle/bottle-agent-core"
# synced, the number of bytes read from the port but not consumed, the request id of
# ``park``: the core answers it once this agent sleeps in its read of the socket.
GO = struct.Struct("=III")
LENGTH = struct.Struct("=I")
PR_SET_CHILD_SUBREAPER = 36
MAX_FDS = 253  # SCM_MAX_FD: per message
MAX_META = 1 << 20  # the handback's JSON: a few lines per command still running
MAX_LEFTOVER = 64 << 20  # unconsumed port bytes: bounded by frame limits and windows


class Parked:
    """The core, started and given the port; ``wait`` blocks until it hands back."""

    def __init__(self, port: int, instance: bytes) -> None:
        import ctypes  # here, at park time: the handback must not import anything

        self.prctl = ctypes.CDLL(None, use_errno=True).prctl
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Above the target numbers: a dup2 onto itself would keep close-on-exec.
        high = [_dup_high(port), _dup_high(theirs.fileno())]
        try:
            actions = [(os.POSIX_SPAWN_DUP2, high[0], 3), (os.POSIX_SPAWN_DUP2, high[1], 4)]
            self.pid = os.posix_spawn(CORE, [CORE, instance.hex()], dict(os.environ), file_actions=actions)
        except BaseException:
            ours.close()
            raise
        finally:
            for fd in high:
                os.close(fd)
            theirs.close()
        self.sock = ours

    def go(self, synced: bool, unread: bytes, rid: int) -> None:
        """Let the core read the port and answer ``park`` (request ``rid``)."""
        try:
            self.sock.sendall(GO.pack(int(synced), len(unread), rid) + unread)
        except OSError:  # it died already: ``wait`` reaps it
            pass

    def wait(self) -> Handback | None:
        """The core's handback (None if it died without one: it is reaped either way)."""
        try:
            back = self._receive()
        except (OSError, ValueError, LookupError, TypeError):  # a handback we cannot read: none
            back = None
        if back is not None:
            # Its running commands come to us, not to PID 1, when it exits.
            self.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            try:
                with contextlib.suppress(OSError):  # it died after all: its exit is ours to reap
                    self.sock.sendall(b"\x01")
                os.waitpid(self.pid, 0)
            finally:
                self.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        else:  # it may wait for our answer: end it
            self.abandon()
        self.sock.close()
        return back

    def abandon(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.sock.close()

    def _receive(self) -> Handback | None:
        back, buf = Handback([]), bytearray()
        try:
            size = LENGTH.unpack_from(self._until(back, buf, LENGTH.size))[0]
            if size > MAX_META:
                raise ValueError("handback too long")
            end = LENGTH.size + size
            back.meta = json.loads(bytes(self._until(back, buf, end)[LENGTH.size : end]))
            left = int(back.meta["bytes"])
            if not 0 <= left <= MAX_LEFTOVER:
                raise ValueError("handback too long")
            back.unread = bytes(self._until(back, buf, end + left)[end : end + left])
        except BaseException:
            back.close()
            raise
        return back

    def _until(self, back: Handback, buf: bytearray, n: int) -> bytearray:
        """Read until ``buf`` holds ``n`` bytes; the pipes of many commands
        come in several messages (SCM_RIGHTS takes 253 descriptors at most)."""
        while len(buf) < n:
            more, fds, _, _ = socket.recv_fds(self.sock, max(n - len(buf), 1 << 16), MAX_FDS)
            back.fds += fds
            if not more:
                raise ValueError("the core's handback ended early")
            buf += more
        return buf


class Handback:
    """What the core hands back: its sync state, the port bytes it did not
    consume, and the commands it still runs (their pipes as ``fds``)."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds
        self.meta: dict[str, Any] = {}
        self.unread = b""

    def calls(self) -> list[tuple[int, dict[str, Any], int]]:
        """The core's ``exec`` calls still running, as calls for ``Agent.op_exec``
        to finish (request id, call, send credit); those of a host that left
        (killed already) are only reaped."""
        fds, out = list(self.fds), []
        for rec in self.meta.get("execs", []):
            stdout = fds.pop(0) if rec.get("out") else -1
            stderr = fds.pop(0) if rec.get("err") else -1
            child = execute.Child(int(rec["pid"]), None, stdout, stderr)
            child.killed = bool(rec.get("killed"))
            if rec.get("stale"):
                threading.Thread(target=_discard, args=(child,), daemon=True).start()
                continue
            call = {"op": "exec", "_child": child, "timeout": rec.get("left"), "_timed_out": bool(rec.get("timed_out"))}
            out.append((int(rec["rid"]), call, int(rec.get("credit", frames.HOST_WINDOW))))
        self.fds = fds
        return out

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _discard(child: execute.Child) -> None:
    for fd in (child.stdout, child.stderr):
        if fd >= 0:
            os.close(fd)
    child.kill()
    child.reap()


def _dup_high(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def available() -> bool:
    return os.access(CORE, os.X_OK)
