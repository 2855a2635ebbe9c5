"""How the host's end of the agent channel finds and names the channel's end:
an agent that answers no ping, a halted guest, a write cut mid-frame, the VM
gone under a send, a closed channel.  Mixed into
``channel.AgentChannel``, whose state it reads."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from ..errors import AgentError
from ..guest.frames import PING, frame
from .calls import Gone
from .send import held_by

GONE_WAIT = 5.0  # a send that found the VM gone waits this long for the reader to say why


class Ends:
    name: str
    sock: socket.socket
    death: str
    closing: str
    broken: str
    closed: threading.Event
    _reader: threading.Thread
    _fdlock: threading.Lock
    idle: float
    stopped: Callable[[], str] | None
    _looked: float
    dead_after: float
    _last_rx: float
    _ping_at: float
    _wlock: threading.Lock
    _read_done: bool
    _shut: bool

    def _thread_deadline(self) -> float | None:
        raise NotImplementedError

    def _send_locked(self, data: bytes, *, confined: bool = False) -> None:
        raise NotImplementedError

    def _gone(self, e: Gone, op: str) -> AgentError:
        """A send met QEMU's end gone.  The reader meets it too and names it (a
        reboot, a panic: QEMU's exit, read within a second); wait for that, out
        of ``_wlock`` (the reader takes it to end) and never on the reader."""
        if threading.current_thread() is self._reader:
            return e
        deadline = self._thread_deadline()
        within = GONE_WAIT if deadline is None else min(GONE_WAIT, max(0.5, deadline - time.monotonic()))
        return self.ended(within, op) or e

    def ended(self, within: float, op: str) -> AgentError | None:
        """The channel's end as ``AgentError`` if it ends within ``within`` s (its
        VM died under a call made elsewhere: ``ssh()``), else None."""
        if self.closed.wait(within) and self.death:
            return AgentError(self._named(self.death) + (f" during {op}" if op else ""))
        return None

    def _break(self, e: BaseException, what: str = "a write failed or was interrupted") -> None:
        """Cut mid-frame (a signal, a test timeout, a guest that stopped
        reading): the agent would read the next frame from the middle of this
        one.  Give up on the channel rather than let later calls hang."""
        self.broken = f"{what} ({type(e).__name__}: {e})"
        self.closing = self.closing or self.broken  # what later calls read, not "the VM closed it"
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def end(self, why: str) -> None:
        """End the channel for ``why`` (the VM stopped under it): what is pending
        and every later call fail with it.  Never blocks: QMP's loop calls it."""
        self.closing = self.closing or why
        self._shut = True  # later sends say ``closing``, not the broken pipe they would meet
        with self._fdlock:
            if not self._read_done:
                try:  # the reader wakes with an EOF and reads ``closing``
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _check_alive(self, op: str) -> None:
        """Called by a waiting thread: ping an agent that has been silent a while,
        raise AgentError if it has not answered in ``dead_after`` seconds."""
        now = time.monotonic()
        if now - self._last_rx < self.idle:
            return
        if self._ping_at <= self._last_rx:
            try:
                with held_by(self._wlock, now) as got:  # only if free: a send under way must be read first
                    if got:
                        self._ping_at = now
                        self._send_locked(frame(PING, 0))
            except Gone as e:
                raise self._gone(e, op) from None
        elif now - self._ping_at > self.idle and (why := self._stopped(now)):
            self.end(why)
            raise AgentError(f"{self._named(why)} during {op or 'a call'}")
        elif now - self._ping_at > self.dead_after:
            raise AgentError(
                f"bottle {self.name}: the guest agent has not answered for {now - self._last_rx:.0f} s "
                f"(during {op or 'a call'}); it is hung or gone"
            )

    def _stuck(self, silent: float) -> None:
        """A send the guest has taken nothing of for ``silent`` s, its agent
        silent too: if the guest halted, it never will; end the channel and say
        why, rather than wait out the stall limit (a minute) and blame the agent."""
        now = time.monotonic()
        if silent > self.idle and now - self._last_rx > self.idle and (why := self._stopped(now)):
            self.end(why)
            raise AgentError(f"{self._named(why)} while sending to the agent")

    def _stopped(self, now: float) -> str:
        """Why a VM whose agent is silent will never answer (a guest that halted:
        QEMU runs on with its CPUs stopped), asked at most once per ``idle`` s."""
        if self.stopped is None or now - self._looked < self.idle:
            return ""
        self._looked = now
        return self.stopped()

    def _named(self, why: str) -> str:
        """``why`` with the bottle's name first, once ("bottle NAME was closed" has it)."""
        return why if why.startswith(f"bottle {self.name} ") else f"bottle {self.name}: {why}"

    def _closed_error(self) -> AgentError:
        death = self.death or self.closing  # the reader may not have ended yet
        if death.startswith(f"bottle {self.name} "):  # what closed it, in the user's words
            return AgentError(death)
        return AgentError(f"agent channel of {self.name} is closed: {death or 'closed'}")
