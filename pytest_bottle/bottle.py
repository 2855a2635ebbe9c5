"""The ``Bottle`` handle: what a test holds to drive its VM."""

from __future__ import annotations

import collections
import copy
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .agent.channel import AgentChannel
from .agent.client import AgentClient
from .agent.streams import OnOutput
from .arguments import GuestPath, check_env, check_input, check_port, check_timeout, check_user, guest_path
from .bottle_files import FILE_TIMEOUT as FILE_TIMEOUT  # importable here as before the split; patch bottle_files
from .bottle_files import READ_CAP as READ_CAP
from .bottle_files import BottleFiles
from .errors import AgentError, BottleError, ExecError, ExecTimeout, SpecError
from .history import CommandHistory, ProcessEntry
from .process import GuestProcess
from .results import OUTPUT_CAP, Command, ExecResult, as_command, to_argv
from .retry import Waits
from .ssh import SshAccess
from .vmm import console
from .vmm.backend import Machine

if TYPE_CHECKING:  # the launch pipeline makes bottles, and imports this module
    from .lifecycle.resources import Resources
    from .snapshot import Snapshot

log = logging.getLogger(__name__)

# An agent that has not answered this long after a command's own timeout is
# gone (it drains the pipes 1 s at most, waits 5 s at most for a killed group).
TIMEOUT_GRACE = 15.0
EXEC_OUTPUT_CAP = OUTPUT_CAP  # bytes of each output stream kept in memory; the rest is read and dropped
# How long keep() gives a VM whose agent is gone to finish powering off.
STOPPING_GRACE = 10.0
SSH_DEATH_WAIT = 2.0  # s an ssh that failed (255) waits to learn whether its VM died


# Output watched as it comes (spawn, on_output): Python block-buffers a pipe,
# so a server's "Serving HTTP on ..." would wait in its buffer.  The caller's env wins.
STREAMED_ENV = {"PYTHONUNBUFFERED": "1"}


class Bottle(BottleFiles, Waits):
    """A running VM.  Close it (or use it as a context manager) to release everything.

    Its file calls (``read_*``, ``write_*``, ``put``, ``get``) are ``bottle_files.BottleFiles``'."""

    def __init__(
        self,
        *,
        name: str,
        image: str,
        accel: str,
        machine: Machine,
        channel: AgentChannel,
        resources: Resources,
        ssh: SshAccess | BottleError | None = None,
        announce: Mapping[str, str] | None = None,
    ) -> None:
        """``resources`` owns the machine, the channel and everything else the
        bottle holds on the host: closing the bottle closes it."""
        self.name = name
        self.image = image
        self.accel = accel
        # The bottle's own address on its LAN, without the prefix length.
        self.lan_ip = resources.lan_ip.split("/")[0] if resources.lan_ip else None
        self._machine = machine
        self._channel = channel
        self._agent = AgentClient(channel)
        self._resources = resources
        self._forwards = dict(resources.forwards)
        self._ssh = ssh
        # The user NIC's gratuitous ARP, left out of the restore path: only a
        # forwarded connection needs QEMU's network to know the clone's MAC.
        self._announce: dict[str, str] | None = dict(announce) if announce else None
        self._announce_lock = threading.Lock()
        self.kept = False
        self._closed = False
        self._owner = os.getpid()  # a forked child's copy of the bottle closes nothing of its parent's
        self._console_at_close: str | None = None
        self._close_lock = threading.Lock()
        self.history: collections.deque[tuple[str, int | None, float]] = CommandHistory()

    # -- identity -----------------------------------------------------------

    def __repr__(self) -> str:
        state = f"pid {self._machine.pid}"
        if self.kept:  # closed here, running on past this process
            state = f"kept, {state}"
        elif self._closed:
            state = "closed"
        return f"<Bottle {self.name} image={self.image} accel={self.accel} {state}>"

    @property
    def pid(self) -> int:
        """PID of the QEMU process."""
        return self._machine.pid

    @property
    def closed(self) -> bool:
        return self._closed

    def alive(self) -> bool:
        """True while the VM runs and its agent channel is open."""
        return not self._closed and self._machine.alive() and not self._channel.closed.is_set()

    def vm_running(self) -> bool:
        """True while its QEMU runs, whatever its agent does (``keep()`` keeps such a VM for SSH).
        A kept bottle's QEMU runs on, still our child: ``alive()`` reaps it once it is gone."""
        return (self.kept or not self._closed) and self._machine.alive()

    @property
    def console_log(self) -> str:
        """The serial console output so far (after ``close()``: as it was then)."""
        if self._console_at_close is not None:
            return self._console_at_close
        text, cut = console.read_tail(self._machine.console_log)  # a guest may have flooded it
        cut += console.cut_bytes(self._machine.console_log)
        return f"[pytest-bottle: {cut} earlier bytes of console output not kept]\n{text}" if cut else text

    @property
    def console_log_path(self) -> Path:
        return self._machine.console_log

    # -- commands -----------------------------------------------------------

    def exec(
        self,
        cmd: Command,
        *,
        check: bool = False,
        input: str | bytes | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: GuestPath | None = None,
        user: str | int | None = None,
        on_output: OnOutput | None = None,
    ) -> ExecResult:
        """Run ``cmd`` in the guest (a str through ``/bin/sh -c``, a list as argv).

        ``env`` adds to a default environment (PATH, HOME, LANG=C.UTF-8).
        A command still running after ``timeout`` seconds is killed with its
        whole process group and ``ExecTimeout`` is raised; the bottle stays usable.
        ``on_output(stream, text)`` sees the output as it comes, on this thread
        (see ``agent.streams``); an exception from it kills the command and propagates.
        """
        return self._exec(cmd, check, input, timeout, env, cwd, user, on_output, TIMEOUT_GRACE)

    def _exec(
        self, cmd: Command, check: bool, input: str | bytes | None, timeout: float | None,
        env: Mapping[str, str] | None, cwd: GuestPath | None, user: str | int | None, on_output: OnOutput | None,
        grace: float,
    ) -> ExecResult:  # fmt: skip
        """``exec``; an agent still silent ``grace`` s past ``timeout`` is ``AgentTimeout``."""
        cmd = as_command(cmd)
        argv = to_argv(cmd)
        check_timeout(timeout)
        if on_output is not None and not callable(on_output):
            raise SpecError(f"must be a callable fn(stream, text), not {on_output!r}", "on_output")
        env = check_env(env) if on_output is None else {**STREAMED_ENV, **check_env(env)}
        cwd = None if cwd is None else guest_path(cwd, "cwd")
        user = check_user(user, "exec()")
        stdin = check_input(input)
        started = time.monotonic()
        run = self._agent.exec(  # raises before anything is sent: no history then
            argv, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin, cap=EXEC_OUTPUT_CAP,
            on_output=on_output,
        )  # fmt: skip
        try:
            reply = run.finish(grace, cmd)
        except BaseException:
            self.history.append((_show(cmd), None, time.monotonic() - started))
            raise
        duration = time.monotonic() - started
        self.history.append((_show(cmd), reply.rc, duration))
        if reply.timed_out:
            raise ExecTimeout(
                cmd, float(timeout or 0), reply.stdout.decode(errors="replace"), reply.stderr.decode(errors="replace")
            )
        result = ExecResult(cmd, reply.rc, reply.stdout, reply.stderr, duration)
        return result.check() if check else result

    def spawn(
        self,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: GuestPath | None = None,
        user: str | int | None = None,
        input: str | bytes | None = None,
    ) -> GuestProcess:
        """Start ``cmd`` and return as soon as it runs (see ``process.GuestProcess``)."""
        cmd = as_command(cmd)
        env = {**STREAMED_ENV, **check_env(env)}
        cwd = None if cwd is None else guest_path(cwd, "cwd")
        user = check_user(user, "spawn()")
        stdin = check_input(input)
        proc = GuestProcess.start(self._agent, cmd, env=env, cwd=cwd, user=user, input=stdin)
        self.history.append(ProcessEntry(_show(cmd), proc))
        return proc

    def check_output(self, cmd: Command, **kw: Any) -> str:
        """Stdout of ``cmd``; raises ``ExecError`` if it exits non-zero."""
        check = kw.pop("check", True)
        if not check:  # it was ignored: a TypeError, as subprocess.check_output makes any check= (True is harmless)
            raise TypeError(f"check_output() always checks: check={check!r} is refused (use exec(cmd, check=False))")
        return self.exec(cmd, check=True, **kw).stdout

    # -- network ------------------------------------------------------------

    def address(self, guest_port: int) -> tuple[str, int]:
        """Host-side (address, port) of a forwarded guest TCP port."""
        check_port(guest_port, "guest_port")
        self._check_open()  # its port is released: another bottle may hold it now
        try:
            where = self._forwards[guest_port]
        except KeyError:
            raise BottleError(
                f"guest port {guest_port} of {self.name} is not forwarded; forwarded ports: "
                f"{sorted(self._forwards) or 'none'} (use forward=[{guest_port}])"
            ) from None
        if not self._closed:
            self._announce_nic()
        return where

    def _announce_nic(self) -> None:
        with self._announce_lock:  # a second caller must not connect before it is done
            if self._announce is None:
                return
            try:
                self._agent.announce(**self._announce, timeout=30)
            except BottleError as e:  # a dead or hung guest fails the connection itself, clearly
                log.debug("%s: announcing its MAC failed: %s", self.name, e)
            self._announce = None

    # -- ssh (see ssh.py) ---------------------------------------------------

    def _check_open(self) -> None:
        if self._closed and not self.kept:
            raise AgentError(f"bottle {self.name} was closed")

    def _ssh_access(self) -> SshAccess:
        self._check_open()  # its config and forwarded port are gone
        if isinstance(self._ssh, BottleError):  # e.g. the host has no ssh-keygen
            raise copy.copy(self._ssh)  # a fresh one: raising the same object grows its traceback each time
        if self._ssh is None:
            raise BottleError(
                f"bottle {self.name} has no SSH access: image {self.image!r} has no SSH server (debian-bookworm "
                "and debian-trixie have one, their -minimal twins do not: add .install('openssh-server'))"
            )
        self._announce_nic()
        return self._ssh

    @property
    def ssh_config(self) -> Path:
        """An OpenSSH config file with a ``Host <name>`` entry for this bottle."""
        return Path(self._ssh_access().config_path)

    def ssh_argv(self, *args: str | os.PathLike[str]) -> list[str]:
        """``ssh -F <config> <name> args...`` as an argv list."""
        return list(self._ssh_access().argv(*args))

    def ssh(self, cmd: Command, **kw: Any) -> ExecResult:
        """Run ``cmd`` through real OpenSSH (not the agent)."""
        access = self._ssh_access()
        try:
            result = access.run(cmd, **kw)
        except ExecTimeout as e:
            self._check_open_after_ssh(e, died_within=0.0)  # its timeout is the user's: no wait past it
            raise
        except ExecError as e:  # check=True
            if e.returncode == 255:
                self._check_open_after_ssh(e)
            raise
        if result.returncode == 255:  # ssh's own failure: a close by another thread is the reason
            self._check_open_after_ssh(None)
        return result

    def _check_open_after_ssh(self, cause: BaseException | None, died_within: float = SSH_DEATH_WAIT) -> None:
        if self._closed and not self.kept:
            raise AgentError(f"bottle {self.name} was closed during ssh") from cause
        # A VM that died under ssh: said as exec says it, not as ssh's "connection refused" (255).
        # Its QEMU's exit reaches the channel a moment after the connection broke.
        if (died := self._channel.ended(died_within, "ssh")) is not None:
            raise died from cause

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        """Stop the VM and release everything it held.  Idempotent; a caller
        in another thread while it closes returns once it has (the VM gone)."""
        if os.getpid() != self._owner:  # a forked child: the VM, its channel and files are the parent's
            return
        with self._close_lock:
            if self.kept:  # handed over, or being handed over: the VM is not ours to stop
                return
            if not self._closed:
                self._closed = True
                self._console_at_close = self.console_log  # the run dir, and the log in it, go now
                self._channel.closing = f"bottle {self.name} was closed"
        # Every caller: the resources' lock makes a second one wait for the release in progress.
        self._resources.close()

    def keep(self) -> None:
        """Leave the VM running past this process (``--bottle-keep``).

        Its leases and run-state record pass to the QEMU process, so sweeps
        leave it alone while it runs; ``bottle stop NAME`` ends it.  Only a
        bottle started detached (``launch(detached=True)``, ``--bottle-keep``)
        can be kept: any other QEMU dies with this process, so keeping it
        raises ``BottleError`` and leaves the bottle as it was.
        """
        if self._closed and not self.kept:
            raise BottleError(f"bottle {self.name} cannot be kept: it was closed")
        if not self._closed and not self._machine.detached:
            raise BottleError(
                f"bottle {self.name} cannot be kept: its QEMU ends with this process "
                "(start it with launch(detached=True) to keep it)"
            )
        if not self._closed and not self.vm_running():  # nothing to hand over: say so, and let go of it
            self.close()
            raise BottleError(f"bottle {self.name} cannot be kept: it has stopped (its QEMU is gone)")
        kept = f"bottle {self.name} was kept: reach it with `bottle shell {self.name}`"
        if not self._closed:  # whoever reaches it next (ssh -F ...) must not stall
            self._announce_nic()
            # Calls in flight in other threads, or started there until the channel
            # closes, are lost: not answered with the SIGKILL keep deals them.
            self._channel.abandon(f"bottle {self.name} is being kept; keep() ends its processes")
            try:
                self._end_before_keeping()
            except BaseException:  # (Ctrl-C, a test timeout) not half kept: other threads' calls are refused
                self.close()
                raise
        with self._close_lock:
            if self._closed:  # kept already (a second keep() changes nothing), or closed meanwhile
                if self.kept:
                    return
                raise BottleError(f"bottle {self.name} cannot be kept: it was closed")
            self._closed = True
            self.kept = True
        # Before the hand-over: moving the agent to its socket shows our end an EOF.
        self._channel.closing = kept
        self._resources.hand_over(self._machine)
        self._channel.close()
        self._machine.disconnect()  # our end only: the VM runs on

    def _end_before_keeping(self) -> None:
        try:  # the test's processes end as with close(): unread, a chatty one would hang on its full pipe
            self._agent.end_processes(timeout=10)
        except BottleError as e:
            # The agent stops early in a poweroff: QEMU may follow within seconds, nothing to keep.
            if self._machine.wait(STOPPING_GRACE) is not None:
                raise BottleError(f"bottle {self.name} cannot be kept: it has stopped (its QEMU is gone)") from e
            log.warning("bottle %s: could not end its processes before keeping it: %s", self.name, e)

    def snapshot(self) -> Snapshot:
        """Save this running bottle as a ``Snapshot`` to fork (``bottle_factory(snapshot=s)``, ``s.start()``);
        it pauses briefly, then runs on as itself.  ``SnapshotError`` if it cannot (``lan=``, booted cold)."""
        return self._snapshot()

    def _snapshot(self, saved_for: str | None = None) -> Snapshot:  # saved_for: see take_snapshot
        from .snapshot import take_snapshot

        return take_snapshot(self, self._machine, self._resources, saved_for=saved_for)

    @property
    def agent_socket(self) -> str | None:
        """Where a kept bottle serves its agent (``bottle shell``); None if not kept or not served."""
        record = self._resources.record
        path = record.extra.get("agent_socket") if record is not None and self.kept else None
        return path if isinstance(path, str) else None

    def __enter__(self) -> Bottle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _show(cmd: Command) -> str:
    if isinstance(cmd, str):
        return cmd
    argv = to_argv(cmd)  # bytes as the command runs them
    return argv[2] if isinstance(cmd, (bytes, bytearray)) else " ".join(argv)
