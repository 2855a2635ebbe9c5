"""Host end of the agent channel: a socket to QEMU's virtio-serial port.

One reader thread demultiplexes frames by request id, so several threads may
run commands in the same bottle at once.  Whatever the guest sends is
checked before it is believed (``frames.limit``, the windows): the guest is
not trusted.  The reader never waits for a consumer, and calls never wait
for a dead agent: a HELLO with a new instance id (the agent restarted) fails
every pending call at once, and a call that has heard nothing for
``idle`` seconds pings the agent and gives up ``dead_after`` seconds later;
a frame left unfinished that long (its agent was killed writing it) fails
every call, and a SYNC finds the agent, or its successor, again.
When the socket closes (QEMU died) every waiting call fails at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import AgentError, AgentTimeout, SpecError
from ..guest import frames
from ..guest.frames import CALL, CREDIT, DATA, EOF, HEADER, HELLO, REPLY, frame
from . import resync
from .calls import Call, Gone, ProtocolError, Sink, decode_reply, guest_error, lose
from .restarts import RESYNC_WAIT, Restarts
from .send import SEND_TIMEOUT, STALL_FLOOR, Deadlines, Stalled, held_by, send_all
from .uploads import Uploads

log = logging.getLogger(__name__)

# Kinds a guest may send; anything else is a protocol error.
GUEST_KINDS = frozenset({DATA, EOF, frames.STDOUT, frames.STDERR, frames.STARTED, REPLY, HELLO, CREDIT})
IDLE = 2.0  # silence after which a waiting call pings the agent
DEAD_AFTER = 30.0  # an agent that has not answered a ping this long is gone


class AgentChannel(Deadlines, Uploads, Restarts):
    def __init__(
        self, sock: socket.socket, name: str = "bottle", idle: float = IDLE, dead_after: float = DEAD_AFTER
    ) -> None:
        # Our own descriptor (whoever passed ``sock`` closes theirs when they
        # like), closed by the reader as it ends: closed under its read, the
        # number could be another file's by the time it polls again, and it
        # would hang there or read what is not ours.  Sends stop first.
        # (Non-blocking is the open file's, so the caller's end is too: it is
        # the channel's to use from here on.)
        self.sock = sock.dup()
        self.name = name
        self._pid = os.getpid()  # a forked child has no reader thread: its calls would wait for ever
        self.idle = idle
        self.dead_after = dead_after
        self.explain: Callable[[], str] | None = None  # why the stream ended under us: the VM's exit
        self.stopped: Callable[[], str] | None = None  # why a VM that runs will never answer (it halted)
        self._looked = 0.0
        self.synced = threading.Event()
        self._settled = threading.Event()  # cleared from a resync's SYNC to its HELLO: calls wait
        self._settled.set()
        self._frames = 0  # frames but HELLOs read since the last resync
        self._resynced = False
        self._resync_at = 0.0
        self.closed = threading.Event()
        self.death = ""
        self.closing = ""  # why the host is closing it, set before it does: the death users read
        self.broken = ""
        self.instance: bytes | None = None
        self.restarts = 0
        self._wlock = threading.Lock()
        self._lock = threading.Lock()
        self._credit = threading.Condition(self._lock)
        self._calls: dict[int, Call] = {}
        self._abandoned: tuple[str, threading.Thread] | None = None  # why, and the one thread let in (abandon)
        self._next_id = 1
        self._last_rx = time.monotonic()
        self._ping_at = 0.0
        self._tls = threading.local()
        self._shut = self._read_done = False  # close() was called; the reader ended (and closed the fd)
        self._fdlock = threading.Lock()  # close()'s shutdown against the reader's close of the descriptor
        self.sock.settimeout(SEND_TIMEOUT)  # bounds a send (see send_all); the reader just reads on
        self._reader = threading.Thread(target=self._read_loop, name=f"bottle-agent-{name}", daemon=True)
        self._reader.start()

    # -- plumbing -----------------------------------------------------------

    def _send(self, data: bytes, *, confined: bool = False) -> None:
        with self._wlock:
            self._send_locked(data, confined=confined)

    def _send_locked(self, data: bytes, *, confined: bool = False) -> None:  # the caller holds _wlock
        """``confined``: only its call suffers its loss (a CALL; DATA, which a
        CANCEL follows): if none of it went, that call alone fails.  Any other
        (a CREDIT, CANCEL, EOF owed to the agent) breaks the channel."""
        if self._shut or self._read_done:
            raise self._closed_error()
        if self.broken:
            raise AgentError(f"agent channel of {self.name} is unusable: {self.broken}")
        try:
            send_all(self.sock, data, self._thread_deadline(), self._stuck)
        except Stalled as e:
            if confined and not e.sent:  # none of it went: the stream is whole
                raise AgentTimeout(f"bottle {self.name}: {e}") from None
            self._break(e)
            raise AgentTimeout(f"agent channel of {self.name} broke: {self.broken}") from None
        except BaseException as e:
            if isinstance(e, OSError) and (self._shut or self.closing):  # cut by end(), close() or a closing bottle
                self._break(e)
                raise self._closed_error() from None
            if isinstance(e, (BrokenPipeError, ConnectionResetError)):  # the VM exited
                self.broken = self.broken or f"the VM's end of the channel is gone ({type(e).__name__}: {e})"
                raise Gone(f"agent channel of {self.name} broke: {self.broken}") from None
            self._break(e)
            if isinstance(e, OSError):
                raise AgentError(f"agent channel of {self.name} broke: {self.broken}") from None
            raise

    def send_sync(self) -> None:
        self._send(frames.SYNC_FRAME)

    def _read_loop(self) -> None:
        try:
            hello, rest = resync.skip_to_hello(resync.receiver(self.sock))  # past a former session's half frame
            while True:
                try:
                    self._read_frames(hello, rest)
                except resync.MidFrame as e:  # the agent stopped in a frame: find it, or its successor, again
                    self._resync(f"stopped in the middle of a frame ({e}) for {self.dead_after:g} s")
                    at = e.partial.rfind(resync.MARKER)  # the successor's HELLO is the last thing it sent
                    start = e.partial[at:] if at >= 0 else e.partial[-len(resync.MARKER) :]
                    hello, rest = resync.skip_to_hello(resync.receiver(self.sock), start=start)
                except resync.BadFrame as e:  # garbage, or a successor's HELLO where a frame went on
                    if self._resynced and self._frames == 0:
                        raise  # again before any frame since the last: garbage, not a restart
                    self._resync(f"sent a frame no agent sends (protocol error: {e})")
                    try:  # a guest that does not answer the SYNC with a HELLO at once has no agent: closed
                        deadline = time.monotonic() + RESYNC_WAIT
                        hello, rest = resync.skip_to_hello(resync.receiver(self.sock, deadline), start=e.seen)
                    except TimeoutError:
                        raise e from None
        except (EOFError, OSError) as e:
            why = "the VM closed the agent channel" if isinstance(e, EOFError) else str(e)
            self.death = self.closing or (self.explain() if self.explain else "") or why  # it must not raise
        except Exception as e:  # a broken frame: the channel cannot be trusted any more
            self.death = f"protocol error: {type(e).__name__}: {e}"
            log.debug("agent channel %s: %s", self.name, self.death)
        finally:
            with self._lock:
                self.closed.set()
                self._settled.set()  # a call waiting out a resync goes on, and finds it closed
                calls = self._take_calls()
            lose(calls, "")  # wait() names the channel's death
            # A sender blocked on a guest that reads nothing holds _wlock until
            # close()'s shutdown or its own timeout wakes it.
            with self._wlock, self._fdlock:
                self._read_done = True
                self.sock.close()

    def _read_frames(self, hello: bytes, rest: bytes) -> None:
        """Frames from a HELLO on, until the stream ends or stops in a frame (``MidFrame``)."""
        read_exact = resync.exact_reader(self.sock, rest, stall=lambda: self.dead_after)
        self._last_rx = time.monotonic()
        self._hello(hello)
        while True:
            header = read_exact(HEADER.size, False)
            kind, rid, size = HEADER.unpack(header)
            if kind not in GUEST_KINDS:
                raise resync.BadFrame(f"unknown frame kind {kind}", header)
            if size > frames.limit(kind):
                limit = frames.limit(kind)
                raise resync.BadFrame(f"a {frames.NAMES[kind]} frame of {size} bytes (limit {limit})", header)
            payload = read_exact(size, True) if size else b""
            self._last_rx = time.monotonic()
            self._frames += kind != HELLO
            if kind == HELLO:
                self._hello(payload)
            elif kind == CREDIT:
                self._got_credit(rid, frames.COUNT.unpack(payload)[0] if size == frames.COUNT.size else 0)
            else:
                try:
                    self._dispatch(kind, rid, payload)
                except (ProtocolError, ValueError) as e:  # a reply that does not decode: the same
                    raise resync.BadFrame(f"{type(e).__name__}: {e}", payload[-64:]) from None

    def _hello(self, payload: bytes) -> None:
        if len(payload) != frames.HELLO_SIZE or not payload.startswith(frames.SYNC_MAGIC):
            raise ProtocolError("a HELLO frame without the agent's magic (a different protocol version?)")
        instance = payload[len(frames.SYNC_MAGIC) :]
        if self.instance is not None and instance != self.instance:
            self._restarted()
        self.instance = instance
        self.synced.set()
        self._settled.set()

    def abandon(self, reason: str) -> None:
        """Fail every pending call at once as lost for ``reason``, cancel it, and
        refuse calls other threads start from now on (``Bottle.keep`` ends the
        guest's processes next, from this thread: a killed command's reply
        would read as its own SIGKILL)."""
        with self._wlock, self._lock:  # a call another thread registered is on the wire first, then cancelled
            self._abandoned = (reason, threading.current_thread())
            calls = self._take_calls()
        lose(calls, reason)
        for call in calls:
            self.cancel_quietly(call.rid)

    def _take_calls(self) -> list[Call]:
        """Every pending call, now no longer ours (the caller holds ``_lock``)."""
        calls, self._calls = list(self._calls.values()), {}
        self._credit.notify_all()
        return calls

    def _got_credit(self, rid: int, n: int) -> None:
        with self._lock:
            call = self._calls.get(rid)
            if call is not None:
                call.window = min(call.window + n, frames.WINDOW)  # a guest cannot talk us past the window
                self._credit.notify_all()

    def _dispatch(self, kind: int, rid: int, payload: bytes) -> None:
        with self._lock:
            call = self._calls.get(rid)
        if call is None:  # a call we gave up on, or a guest making things up
            return
        if not payload and kind in frames.STREAMS:  # carries nothing; a flood of them must cost nothing
            return
        if kind == REPLY:
            call.reply = decode_reply(payload)
            with self._lock:
                self._calls.pop(rid, None)
                self._credit.notify_all()
            call.done.set()
            return
        with self._lock:  # a consumer thread may be crediting (``grant``)
            call.unacked += len(payload)
            over = call.unacked > frames.HOST_WINDOW
        if over:  # the guest ignores flow control: this call cannot be trusted
            self._fail(rid, call, AgentError(f"bottle {self.name}: the agent sent beyond its window"))
            return
        if call.sink is not None and call.error is None:
            try:
                call.sink(kind, payload)
            except Exception as e:  # the call fails, the channel goes on
                call.error = e
                self.cancel_quietly(rid)
        if call.auto:
            self._owe(rid, call, len(payload))

    def _fail(self, rid: int, call: Call, error: BaseException) -> None:
        call.error = error
        self.forget(rid)
        call.done.set()

    def _owe(self, rid: int, call: Call, n: int) -> None:
        with self._lock:
            call.owed += n
            if call.owed < frames.HOST_CREDIT_STEP or call.done.is_set():
                return
            owed, call.owed = call.owed, 0
            call.unacked -= owed
        try:
            self._send(frames.credit_frame(rid, owed))
        except AgentError:
            pass

    def grant(self, rid: int, n: int) -> None:
        """The consumer of a call started with ``auto_credit=False`` took ``n`` bytes out."""
        with self._lock:
            call = self._calls.get(rid)
        if call is not None:
            self._owe(rid, call, n)

    # -- calls --------------------------------------------------------------

    def start(self, op: str, sink: Sink | None = None, *, auto_credit: bool = True, **args: Any) -> tuple[int, Call]:
        """Send a CALL.  With ``auto_credit`` the agent may send more as soon as
        ``sink`` returned; otherwise the consumer calls ``grant`` as it reads."""
        if os.getpid() != self._pid:
            raise AgentError(
                f"bottle {self.name} belongs to process {self._pid}: a forked child cannot use its parent's "
                "bottles (it may start its own)"
            )
        payload = json.dumps(dict(args, op=op)).encode()
        if len(payload) > frames.MAX_PAYLOAD:
            raise SpecError(f"the arguments of {op} are {len(payload)} bytes; the limit is {frames.MAX_PAYLOAD}")
        try:
            return self._register_and_send(op, payload, sink, auto_credit)
        except Gone as e:
            raise self._gone(e, op) from None

    def _register_and_send(self, op: str, payload: bytes, sink: Sink | None, auto_credit: bool) -> tuple[int, Call]:
        self._settle()
        # Registered and sent in one step under _wlock: abandon() cannot slip between
        # and let keep()'s end call reach the agent before this CALL does.  Another
        # send stuck on a guest that reads nothing holds it up to SEND_TIMEOUT: this
        # call's own deadline comes first.
        with held_by(self._wlock, self._thread_deadline()) as got:
            if not got:
                raise AgentTimeout(f"bottle {self.name}: {op} was not sent in time (another send held the channel)")
            with self._lock:  # the reader closes under this lock: no call slips past its final sweep
                if self.closed.is_set():
                    raise self._closed_error()
                if self._abandoned is not None and self._abandoned[1] is not threading.current_thread():
                    raise AgentError(self._abandoned[0])  # it names the bottle
                rid = self._next_id
                self._next_id += 1
                call = self._calls[rid] = Call(rid, sink, auto_credit)
            try:
                self._send_locked(frame(CALL, rid, payload), confined=True)
            except BaseException:  # not sent (or the channel is gone): nothing will answer it
                with self._lock:
                    self._calls.pop(rid, None)
                raise
        return rid, call

    def check(self, call: Call, op: str = "") -> None:
        """For a thread waiting on a call's data: raise if the thread's deadline
        passed (the call is cancelled) or the agent stopped answering."""
        deadline = self._thread_deadline()
        if deadline is not None and time.monotonic() >= deadline:
            self.forget(call.rid)
            raise AgentTimeout(f"bottle {self.name}: {op or 'a call'} did not finish in time")
        self._check_alive(op)

    def wait(self, call: Call, timeout: float | None = None, op: str = "") -> dict[str, Any] | None:
        """The call's reply, None on timeout; raises AgentError if the channel
        died, the agent restarted or stopped answering."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if deadline is None and self._thread_deadline() is not None:  # inside ``with deadline()``
            while not call.done.wait(self.idle / 4):
                self.check(call, op)
        while not call.done.wait(self.idle if deadline is None else min(self.idle, deadline - time.monotonic())):
            if deadline is not None and time.monotonic() >= deadline:
                return None
            self._check_alive(op)
        if call.error is not None:
            raise call.error
        if call.reply is None:
            why = self._named(call.lost or self.death or "agent channel closed")
            raise AgentError(f"{why} during {op or 'a call'}")
        if not call.reply.get("ok"):
            raise guest_error(call.reply, op)
        return call.reply

    def forget(self, rid: int) -> None:
        """Give up on a call: cancel it, and drop whatever still comes for it."""
        with self._lock:
            self._calls.pop(rid, None)
            self._credit.notify_all()
        self.cancel_quietly(rid)

    def cancel_quietly(self, rid: int) -> None:
        """Cancel call ``rid`` if the channel works, within ``STALL_FLOOR`` s; its reply still comes."""
        if not self.broken and not self.closed.is_set():
            with contextlib.suppress(AgentError):
                self.cancel(rid, within=STALL_FLOOR)  # not held up behind a send on a guest reading nothing

    def call(
        self,
        op: str,
        *,
        data: Iterable[bytes] | None = None,
        sink: Sink | None = None,
        timeout: float | None = None,
        **args: Any,
    ) -> dict[str, Any]:
        """One call, its data sent and its reply awaited within ``timeout`` seconds
        (AgentTimeout; the call is cancelled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._within(deadline):
            rid, call = self.start(op, sink, **args)
            try:
                if data is not None:
                    self.send_data(rid, data, deadline)
                reply = self.wait(call, None if deadline is None else max(0.0, deadline - time.monotonic()), op)
            except AgentTimeout:
                self.forget(rid)
                raise
        if reply is None:
            self.forget(rid)
            raise AgentTimeout(f"bottle {self.name}: the agent did not finish {op!r} within {timeout:g} s")
        return reply

    def close(self) -> None:
        """Shut the channel: the reader wakes with an EOF, fails what is pending,
        and closes the descriptor (see ``__init__``); sends raise from now on."""
        if os.getpid() != self._pid:  # a forked child's copy: a shutdown would cut its parent's channel
            return
        self._shut = True
        with self._fdlock:
            if not self._read_done:
                try:  # wakes the reader, and a sender waiting in send_all
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if threading.current_thread() is not self._reader:  # a callback on the reader may close it
            self._reader.join(timeout=2)
