"""``bottle shell NAME``: an interactive shell on a pseudo-terminal in the guest.

The guest side is the agent's ``pty`` operation (``guest/terminal.py``): a
real controlling terminal, so Ctrl-C, job control and full-screen programs
work.  Here the local terminal goes raw, keystrokes stream to the guest as
they are typed, its output to stdout, and a window-size change (SIGWINCH)
is passed on.

Targets: a name is looked up by each function in ``TARGETS`` in turn; the
first that knows it yields an ``AgentClient`` for the session.  Built in:
a kept bottle (``--bottle-keep``, ``Bottle.keep``), whose QEMU serves its
agent on a Unix socket in its run directory.  QEMU serves one connection at a
time, so one shell at a time per kept bottle: a second is refused (a lock
next to the socket) instead of waiting unseen.  Then a saved snapshot: the
shell runs in a fresh fork of it, closed when the shell ends (the snapshot
does not change, so any number of shells may open it at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import select
import signal
import socket
import struct
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from .agent.calls import Call
from .agent.channel import AgentChannel
from .agent.client import AgentClient
from .agent.replies import shell_status
from .errors import AgentError, BottleError, SnapshotError, SnapshotGone
from .guest.frames import CHUNK, STDERR, STDOUT
from .host.paths import check_cache
from .host.runstate import RunRecord

if TYPE_CHECKING:
    from .snapshot import Snapshot

Target = Callable[[str, Path], "AbstractContextManager[AgentClient] | None"]
CONNECT_TIMEOUT = 30.0  # for the agent of a kept bottle to answer (seconds on a loaded host)
# Root's login shell, for input that is not a terminal (no pty: the exec call)
LOGIN_SHELL = [
    "/bin/sh",
    "-c",
    'shell=$(getent passwd 0 | cut -d: -f7); [ -x "$shell" ] || shell=/bin/sh; exec "$shell" -l',
]


def kept_bottle(name: str, cache_dir: Path) -> AbstractContextManager[AgentClient] | None:
    """The agent of the kept bottle ``name``, or None if there is no VM record of that name."""
    record = next((r for r in RunRecord.load_all() if r.name == name), None)
    if record is None:
        return None
    return _attach(record)


@contextlib.contextmanager
def _attach(record: RunRecord) -> Iterator[AgentClient]:
    path = record.extra.get("agent_socket")
    if not record.owner_alive():  # its socket may be left, with nobody listening
        owner = "QEMU" if record.extra.get("kept") else "session"  # a kept bottle's owner is its QEMU
        raise BottleError(
            f"bottle {record.name} is not running: its {owner} (pid {record.owner_pid}) is gone; "
            "`bottle ps` lists it as orphaned, `bottle sweep` removes what it left"
        )
    if not record.extra.get("kept"):
        raise BottleError(
            f"bottle {record.name} belongs to a running session (pid {record.owner_pid}), which holds its agent; "
            "only kept bottles (--bottle-keep) can be reached by `bottle shell`"
        )
    if not isinstance(path, str):
        raise BottleError(f"kept bottle {record.name} serves no agent socket (see its record in `bottle ps`)")
    try:
        lock = open(Path(path).with_name("agent.lock"), "a")
    except OSError as e:  # its run directory went away (the VM was stopped meanwhile)
        raise BottleError(f"kept bottle {record.name} is gone: {e.strerror or e} ({path})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BottleError(f"another `bottle shell` is attached to {record.name}; one at a time") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise BottleError(f"cannot reach the agent of {record.name} at {path}: {e.strerror or e}") from None
        try:
            channel = AgentChannel(sock, record.name)
        finally:
            sock.close()  # the channel has a descriptor of its own
        try:
            channel.send_sync()
            if not channel.synced.wait(CONNECT_TIMEOUT):
                why = f": {channel.death}" if channel.death else ""
                raise BottleError(f"the agent of {record.name} did not answer within {CONNECT_TIMEOUT:g} s{why}")
            yield AgentClient(channel)
        finally:
            channel.close()


def saved_snapshot(name: str, cache_dir: Path) -> AbstractContextManager[AgentClient] | None:
    """A fresh fork of the snapshot ``name`` (``--bottle-save-failed``, ``bottle snapshot list``),
    closed when the shell ends; None if there is no snapshot of that name."""
    from .snapshot import resolve_saved_snapshot
    from .store.snapshots import check_name

    try:
        check_name(name)  # a name no snapshot can have (``a/b``): none of that name, as for a bottle
    except SnapshotError:
        return None
    check_cache(cache_dir)  # a kept bottle needs none; a snapshot is read from it
    try:
        snapshot = resolve_saved_snapshot(cache_dir, name)
    except SnapshotGone:
        return None
    return _fork_agent(snapshot)


@contextlib.contextmanager
def _fork_agent(snapshot: Snapshot) -> Iterator[AgentClient]:
    with snapshot.start() as fork:
        yield fork._agent


TARGETS: list[Target] = [kept_bottle, saved_snapshot]


@contextlib.contextmanager
def open_target(name: str, cache_dir: Path) -> Iterator[AgentClient]:
    for target in TARGETS:
        found = target(name, cache_dir)
        if found is not None:
            with found as agent:
                yield agent
            return
    raise BottleError(
        f"no kept bottle or saved snapshot named {name!r} "
        "(see `bottle ps` and `bottle snapshot list`; keep one with --bottle-keep or --bottle-save-failed)"
    )


def window_size(fd: int) -> tuple[int, int]:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 24, 80
    return (rows or 24), (cols or 80)


class _HungUp(Exception):
    """The local terminal went away (SIGHUP) or we were told to stop (SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _hang_up(signum: int, frame: object) -> None:
    raise _HungUp(signum)


def run_shell(
    agent: AgentClient, argv: list[str] | None = None, stdin: int = 0, stdout: int = 1, stderr: int = 2
) -> int:
    """Run the shell until it exits; returns its exit code (128 + N if this
    side got SIGHUP or SIGTERM: the guest's shell is killed then, not left behind).

    A terminal gets a pseudo-terminal in the guest; other input (a pipe, a
    file) does not, as with ``ssh`` without ``-t``: the command reads it as
    its stdin, and its stdout and stderr stay apart."""
    channel = agent.channel
    input_failed, input_done = threading.Event(), threading.Event()
    feeder: threading.Thread | None = None
    tty_in = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if tty_in else None
    resized: queue.SimpleQueue[int] = queue.SimpleQueue()
    main = threading.current_thread() is threading.main_thread()  # only it may handle signals
    starting, hung = True, 0  # a SIGHUP/SIGTERM while the call starts, acted on once it has

    def hang_up(signum: int, frame: object) -> None:
        nonlocal hung
        if starting:  # raised in the middle of sending the CALL, it would break the channel
            hung = hung or signum
            return
        _hang_up(signum, frame)

    handlers = {signal.SIGWINCH: lambda *_: resized.put(1), signal.SIGHUP: hang_up, signal.SIGTERM: hang_up}
    # From here on a SIGHUP or SIGTERM ends this function, the terminal put back.
    old = {sig: signal.signal(sig, fn) for sig, fn in handlers.items()} if main else {}
    call: Call | None = None
    out = _Output(channel, stdout, stderr)

    def started() -> None:
        nonlocal starting
        starting = False
        if hung:
            raise _HungUp(hung)

    try:
        if tty_in:
            # Raw before the guest can answer: output written while ours is still
            # cooked gets its "\r\n" turned into "\r\r\n" (a command that fails at once).
            tty.setraw(stdin)
            rows, cols = window_size(stdin)
            rid, call = agent.start_pty(
                argv, term=os.environ.get("TERM", "vt100"), rows=rows, cols=cols, sink=out.put, auto_credit=False
            )
            out.begin(rid)
            started()
            _relay(agent, rid, call, stdin, resized)
        else:
            rid, call = channel.start(
                "exec", out.put, auto_credit=False, argv=argv or LOGIN_SHELL,
                env={}, cwd=None, user=None, timeout=None, stdin=True,
            )  # fmt: skip
            out.begin(rid)
            feeder = threading.Thread(target=_feed, args=(channel, rid, stdin, stderr, input_failed, input_done))
            feeder.start()
            started()
            while not call.done.wait(0.1):  # in steps: a signal handler runs between them
                channel.check(call, "shell")
        out.finish()  # all of it written before the exit code (or the error of a write) is ours
        reply = channel.wait(call, 0, "shell") or {}
    except _HungUp as e:
        return 128 + e.signum
    finally:
        out.stop()
        if call is not None and not call.done.is_set():  # the agent kills the shell (its pty call) on the cancel
            channel.forget(rid)
        if saved is not None:
            with contextlib.suppress(termios.error):  # a terminal that hung up
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        input_done.set()
        if feeder is not None and feeder.ident is not None:  # gone before we return: the caller may reuse its fd
            feeder.join(5)
    if isinstance(reply.get("stderr_text"), str):  # a command that could not start says why
        _show(stderr, STDERR, reply["stderr_text"].encode())
    if input_failed.is_set():
        return 1
    return shell_status(reply.get("rc"))


def _relay(agent: AgentClient, rid: int, call: Call, stdin: int, resized: queue.SimpleQueue[int]) -> None:
    """Keystrokes to the guest, window sizes on SIGWINCH, until the call ends."""
    channel = agent.channel
    typing = True
    while not call.done.is_set():
        ready, _, _ = select.select([stdin] if typing else [], [], [], 0.1)
        # A resize first: its signal came before the keys now ready (typed in
        # the new size), and the resize call returns once the guest applied it.
        while not resized.empty():
            resized.get()
            agent.resize(rid, *window_size(stdin))
        if ready:
            data = os.read(stdin, 4096)
            if data:
                channel.send_data_frame(rid, data)
            else:
                typing = False  # our terminal hung up: the shell goes on until it exits
        channel.check(call, "shell")


def _feed(
    channel: AgentChannel, rid: int, stdin: int, stderr: int, failed: threading.Event, done: threading.Event
) -> None:
    """Local input that is not a terminal, as the command's stdin, then its end.
    If reading it fails, the command is cancelled (its reply still comes) and
    ``failed`` set: the exit code is then 1, whatever the command's."""
    try:
        channel.send_data(rid, _input(stdin, done))
    except AgentError:  # the channel broke: the call reports it
        pass
    except OSError as e:
        failed.set()
        _show(stderr, STDERR, f"bottle shell: reading the input failed: {e}\n".encode())


def _input(fd: int, done: threading.Event) -> Iterator[bytes]:
    while not done.is_set():  # the shell ended: stop reading its input
        # select: an input left non-blocking by whoever opened it works too
        if not select.select([fd], [], [], 0.1)[0]:
            continue
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            continue
        if not data:
            return
        yield data


class _Output:
    """The shell's output, written by a thread of its own: the channel's reader
    never waits on our stdout (`| less` left on a page), so pings are answered
    and a dead agent is seen meanwhile.  Credit goes back as it is written: the
    agent holds the rest (flow control), and the queue holds one window at most."""

    def __init__(self, channel: AgentChannel, stdout: int, stderr: int) -> None:
        self.channel, self.fds = channel, {STDOUT: stdout, STDERR: stderr}
        self.items: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self.error: OSError | None = None
        self.stopped = False
        self.rid = 0
        self.thread = threading.Thread(target=self._run, name="bottle-shell-output", daemon=True)

    def put(self, kind: int, data: bytes) -> None:  # on the reader thread: never blocks
        self.items.put((kind, data))

    def begin(self, rid: int) -> None:
        self.rid = rid
        self.thread.start()

    def finish(self) -> None:
        """Wait until everything that came is written; raise the error of a write that failed."""
        if self.thread.ident is not None:
            self.items.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Nothing more is written (the shell ended otherwise: our fds may be reused next)."""
        self.stopped = True
        if self.thread.ident is not None and self.thread.is_alive():
            self.items.put(None)
            self.thread.join(1)  # one write under way; one blocked forever keeps a daemon thread only

    def _run(self) -> None:
        while (item := self.items.get()) is not None:
            kind, data = item
            if self.error is None and not self.stopped and kind in self.fds:
                try:
                    _show(self.fds[kind], kind, data)
                except OSError as e:  # the reader of our stdout left (EPIPE): the command is ended
                    self.error = e
                    self.channel.cancel_quietly(self.rid)
            self.channel.grant(self.rid, len(data))  # also after an error: the reply follows the output


def _show(fd: int, kind: int, data: bytes) -> None:
    if kind in (STDOUT, STDERR):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
