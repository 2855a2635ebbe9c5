"""The host's typed client of the guest agent: one method per operation.

Operation names and reply fields live here and in ``replies``, nowhere else on
the host.  Errors are the channel's (``AgentError`` for a dead, hung or
restarted agent, ``AgentTimeout`` past a timeout, the guest's own failures
mapped by ``calls.guest_error``) plus ``AgentError`` for a malformed reply.
The streaming operations (``tar``, ``read`` into a sink, ``untar``) hand back
the call for ``transfer``, which bounds and credits what flows.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Mapping
from typing import IO, Any

from ..errors import AgentError, AgentTimeout, BootTimeout
from ..guest.frames import CHUNK, STDERR, STDOUT
from ..results import CappedOutput
from .calls import Call, Sink
from .channel import AgentChannel
from .handshake import Handshake
from .replies import (
    ExecReply,
    HelloReply,
    ListeningReply,
    ReadReply,
    SettleReply,
    SetupReply,
    StatReply,
    UntarReply,
    WriteReply,
)
from .streams import OnOutput, OutputFeed

# The handshake: milliseconds on a restore, seconds mid-boot on a loaded host.
SETUP_TIMEOUT = 120.0
# Seconds a settle's answer may take past the time it was given to wait.
SETTLE_GRACE = 30.0
NOT_SETTLED = "its boot did not settle within"
BUSY = {"systemd": "systemd was still starting units", "udev": "udev was still handling devices"}
# How long past its timeout an exec(on_output=) still calls the callback (see ``_finish_feeding``).
LATE_MARGIN = 0.5


class AgentClient:
    """The agent of one machine, over its channel (which it does not own)."""

    def __init__(self, channel: AgentChannel) -> None:
        self.channel = channel

    @classmethod
    def of(cls, agent: AgentClient | AgentChannel) -> AgentClient:
        return agent if isinstance(agent, AgentClient) else cls(agent)

    @property
    def name(self) -> str:
        return self.channel.name

    def deadline(self, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        """Calls this thread makes inside raise ``AgentTimeout`` after ``timeout`` s
        (or at a sooner deadline the thread already has)."""
        return self.channel.deadline(timeout)

    # -- identity -----------------------------------------------------------

    def hello(self, *, timeout: float | None = None) -> HelloReply:
        return HelloReply.parse(self.channel.call("hello", timeout=timeout), self.name)

    def setup(self, handshake: Handshake, *, timeout: float | None) -> SetupReply:
        """Give the machine its own identity and NICs (the clone handshake)."""
        return SetupReply.parse(self.channel.call("setup", timeout=timeout, **handshake.to_call()), self.name)

    def set_clock(self, time_ns: int, *, timeout: float | None = 30) -> None:
        """Step the guest's clock (a ``setup`` that sets nothing else)."""
        self.channel.call("setup", timeout=timeout, time_ns=time_ns)

    def announce(self, name: str, mac: str, ip: str, *, timeout: float | None = 30) -> None:
        """The gratuitous ARP a handshake left for later (``NicSetup.announce``)."""
        self.channel.call("announce", timeout=timeout, name=name, mac=mac, ip=ip)

    # -- commands -----------------------------------------------------------

    def exec(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        user: str | int | None,
        timeout: float | None,
        stdin: bytes | None,
        cap: int,
        on_output: OnOutput | None = None,
        all_output: bool = False,
    ) -> ExecRun:
        """Start ``argv``, keeping ``cap`` bytes of each output stream; the agent
        kills it at ``timeout``.  Raises before anything is sent if it cannot start.
        ``on_output`` gets the text as it comes (``streams.OutputFeed``)."""
        run = ExecRun(self, stdin, timeout, cap, on_output, all_output)
        with self.channel.deadline(timeout):  # its CALL waits behind another send no longer than that
            run.rid, run.call = self.channel.start(
                "exec", run.sink, auto_credit=on_output is None, argv=argv, env=dict(env), cwd=cwd, user=user,
                timeout=timeout, stdin=stdin is not None,
            )  # fmt: skip
        if run.feed is not None:
            run.feed.watch(run.call)
        return run

    def spawn(
        self, argv: list[str], sink: Sink, *, env: Mapping[str, str], cwd: str | None, user: str | int | None,
        stdin: bool,
    ) -> tuple[int, Call]:  # fmt: skip
        """Start ``argv`` with no timeout; ``sink`` gets a STARTED frame (its pid)
        once it runs, then its output.  The reply comes when it ends."""
        return self.channel.start(
            "exec", sink, argv=argv, env=dict(env), cwd=cwd, user=user, timeout=None, stdin=stdin, notify=True
        )

    def signal(self, rid: int, signal: int, *, group: bool, timeout: float | None = 30) -> bool:
        """Send ``signal`` to the command of call ``rid`` (``group``: its process
        group); false if it is over."""
        reply = self.channel.call("signal", target=rid, signal=signal, group=group, timeout=timeout)
        return reply.get("sent") is True

    def end_processes(self, *, timeout: float | None = 10) -> int:
        """Kill every command, shell and spawned process group this session
        started (``Bottle.keep``); how many were signalled."""
        killed = self.channel.call("end", timeout=timeout).get("killed")
        return killed if type(killed) is int else 0

    def start_pty(
        self,
        argv: list[str] | None,
        *,
        term: str,
        rows: int,
        cols: int,
        sink: Sink | None = None,
        auto_credit: bool = True,
    ) -> tuple[int, Call]:
        """Start ``argv`` (the login shell if None) on a new pseudo-terminal; send
        its keystrokes with ``send_data_frame``; ``sink`` gets its output as STDOUT
        (without ``auto_credit``, its consumer calls ``channel.grant``)."""
        return self.channel.start("pty", sink, auto_credit=auto_credit, argv=argv, term=term, rows=rows, cols=cols)

    def resize(self, rid: int, rows: int, cols: int, *, timeout: float | None = 30) -> None:
        self.channel.call("resize", target=rid, rows=rows, cols=cols, timeout=timeout)

    def listening(self, *, timeout: float | None = 30) -> ListeningReply:
        """The TCP ports something in the guest listens on."""
        return ListeningReply.parse(self.channel.call("listening", timeout=timeout), self.name)

    def settle(self, *, timeout: float | None, quiet: float) -> SettleReply:
        """Wait until boot is over and the machine has been idle ``quiet`` s;
        a boot still running after ``timeout`` s is ``BootTimeout``: a snapshot
        or a build of a half-booted machine would look fine and fail later."""
        within = 3600.0 if timeout is None else timeout
        # The guest gives up at ``within`` and says what was still busy; the
        # grace is for its answer, not for more waiting.
        reply = self.channel.call("settle", timeout=within + SETTLE_GRACE, quiet=quiet, within=within)
        settled = SettleReply.parse(reply, self.name)
        if settled.busy:
            what = BUSY[settled.busy] + (f": {', '.join(settled.running)}" if settled.running else "")
            raise BootTimeout(f"{NOT_SETTLED} {round(within, 1):g} s ({what})", name=self.name)
        return settled

    def quiesce(self, *, warm: Iterable[str] = (), timeout: float | None) -> None:
        """Sync the disk for a snapshot, ``warm`` directories read into the cache first."""
        self.channel.call("quiesce", timeout=timeout, warm=list(warm))

    def park(self, *, timeout: float | None) -> str | None:
        """Let the agent's compiled core serve the port from now on, for a seed's
        snapshot (``guest.handoff``): None once it does, else why not."""
        reply = self.channel.call("park", timeout=timeout)
        # The guest's words go into a log: a line of them at most.
        return None if reply.get("parked") is True else str(reply.get("why") or "not parked")[:200]

    # -- files --------------------------------------------------------------

    def write(
        self,
        path: str,
        data: bytes | IO[bytes] | Iterable[bytes],
        *,
        mode: int | None = None,
        into_dir: str | None = None,
        timeout: float | None,
    ) -> WriteReply:
        """Write ``data`` (bytes, a file open for reading, or chunks) to ``path``
        atomically; ``into_dir`` names the file if ``path`` is a directory."""
        args: dict[str, Any] = {"into_dir": into_dir} if into_dir is not None else {}
        reply = self.channel.call("write", path=path, mode=mode, data=_chunks(data), timeout=timeout, **args)
        return WriteReply.parse(reply, self.name)

    def read(self, path: str, sink: Sink, *, timeout: float | None, limit: int | None = None) -> ReadReply:
        """Stream ``path`` into ``sink`` (DATA frames, then EOF); a file whose
        size is over ``limit`` is refused at once (``GuestOSError``, EFBIG)."""
        reply = self.channel.call("read", path=path, sink=sink, timeout=timeout, limit=limit)
        return ReadReply.parse(reply, self.name)

    def stat(self, path: str) -> StatReply:
        """A malformed reply is ``UnsafeTransfer``: nothing is copied on its word."""
        return StatReply.parse(self.channel.call("stat", path=path), path)

    def start_read(self, path: str, sink: Sink, limit: int | None = None) -> tuple[int, Call]:
        """Start streaming ``path`` into ``sink``; credit goes back as it returns.
        A file whose size is over ``limit`` is refused at once (EFBIG)."""
        return self.channel.start("read", sink, path=path, limit=limit)

    def start_tar(self, path: str, sink: Sink) -> tuple[int, Call]:
        """Start a tar stream of directory ``path``; the consumer grants the credit."""
        return self.channel.start("tar", sink, auto_credit=False, path=path)

    def start_untar(self, path: str) -> tuple[int, Call]:
        """Start extracting a tar stream (``send_data``) into directory ``path``."""
        return self.channel.start("untar", None, path=path)

    def untar_reply(self, call: Call, op: str) -> UntarReply:
        return UntarReply.parse(self.channel.wait(call, None, op) or {})


class ExecRun:
    """A command started by ``AgentClient.exec``: its output as it comes, then its end."""

    def __init__(
        self,
        client: AgentClient,
        stdin: bytes | None,
        timeout: float | None,
        cap: int,
        on_output: OnOutput | None,
        all_output: bool = False,
    ) -> None:
        self.client, self.stdin, self.timeout = client, stdin, timeout
        self.out, self.err = CappedOutput(cap), CappedOutput(cap)
        self.feed = OutputFeed(on_output) if on_output is not None else None
        self.all_output = all_output  # on_output past the timeout too: a quick consumer of ours (_finish_feeding)
        self.rid = 0
        self.call: Call | None = None

    def sink(self, kind: int, data: bytes) -> None:
        if kind == STDOUT:
            self.out.add(data)
        elif kind == STDERR:
            self.err.add(data)
        if self.feed is not None:
            self.feed.sink(kind, data)

    def finish(self, grace: float, label: object) -> ExecReply:
        """Feed stdin, wait for the end; an agent still silent ``grace`` s past
        the timeout is given up on (``AgentError`` naming ``label``).  Given up
        on, or interrupted from outside (Ctrl-C, a test timeout's exception),
        the call is forgotten, which kills the command's group: a shared
        bottle's next test must not find it still running."""
        assert self.call is not None
        try:
            if self.feed is not None:
                return self._finish_feeding(grace, label)
            return self._finish(grace, label)
        except BaseException as e:
            channel = self.client.channel
            if isinstance(e, AgentError):
                channel.forget(self.rid)  # its output must not fill up here either
            elif not self.call.done.is_set():  # interrupted: the cancel may wait for another sender, not here
                threading.Thread(target=channel.forget, args=(self.rid,), name="bottle-cancel", daemon=True).start()
            raise

    def _finish(self, grace: float, label: object) -> ExecReply:
        channel, name = self.client.channel, self.client.name
        assert self.call is not None
        until = None if self.timeout is None else time.monotonic() + self.timeout + grace
        if self.stdin is not None:  # as fast as the command reads it (a window at a time); stops at its end
            channel.send_data(self.rid, _chunks(self.stdin), until)  # an agent that never takes it: AgentTimeout
        reply = channel.wait(self.call, None if until is None else max(0.0, until - time.monotonic()), "exec")
        if reply is None:
            raise AgentTimeout(f"bottle {name}: no answer {grace:g} s past the timeout of {label!r}")
        return ExecReply.parse(reply, self.out.value(), self.err.value(), name)

    def _finish_feeding(self, grace: float, label: object) -> ExecReply:
        """``finish`` with ``on_output``: this thread runs the callback, so stdin
        goes from another (the command may write before it reads it all)."""
        channel, call, feed = self.client.channel, self.call, self.feed
        assert call is not None and feed is not None
        if self.stdin is not None:
            feeder = threading.Thread(target=_send_quietly, args=(channel, self.rid, self.stdin), daemon=True)
            feeder.start()
        # The agent's clock starts when the call reaches it, a little after ours: a
        # margin, so that a command ending in time has all its output delivered.
        ends = None if self.timeout is None else time.monotonic() + self.timeout + LATE_MARGIN
        # A quick consumer of its own (a build's log) takes what comes after the timeout too.
        late = None if self.all_output else ends
        feed.run(channel, self.rid, call, None if ends is None else ends + grace, label, late)
        reply = channel.wait(call, 0, "exec")
        if reply is None:  # cannot be: the feed ran until the call was done
            raise AgentError(f"bottle {self.client.name}: exec of {label!r} ended without a reply")
        err = self.err.value()
        result = ExecReply.parse(reply, self.out.value(), err, self.client.name)
        feed.deliver(STDERR, result.stderr[len(err) :].decode("utf-8", "replace"))  # why it could not start
        return result


def _send_quietly(channel: AgentChannel, rid: int, data: bytes) -> None:
    try:
        channel.send_data(rid, _chunks(data))
    except AgentError:  # the channel broke: the call itself reports it
        pass


def _chunks(data: bytes | IO[bytes] | Iterable[bytes]) -> Iterable[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        return (bytes(view[i : i + CHUNK]) for i in range(0, len(view), CHUNK))
    if hasattr(data, "read"):
        f: IO[bytes] = data  # type: ignore[assignment]
        return iter(lambda: f.read(CHUNK), b"")
    return data
