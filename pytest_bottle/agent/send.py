"""Writing frames to a guest that may stop reading: bounded by how long the
guest takes nothing, not by how long a big frame takes to go through."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

SEND_TIMEOUT = 60.0  # a guest that takes nothing of a frame this long is gone
STALL_FLOOR = 2.0  # past a call's deadline, how long a guest may still take nothing
_LOOK = 100  # ms between tries: a Unix socket says POLLOUT only once it has drained a lot
# A write at a time: a Unix socket frees the writer's room a whole write at a
# time, once the reader has taken all of it; smaller ones show progress sooner.
_PIECE = 16 * 1024


class Stalled(TimeoutError):
    """The guest took nothing for the stall limit; ``sent`` bytes of the frame
    went (none: the stream is still at a frame boundary)."""

    def __init__(self, limit: float, sent: int) -> None:
        super().__init__(f"the agent took nothing for {limit:.0f} s")
        self.sent = sent


def stall_limit(deadline: float | None, progress: float) -> float:
    """How long after its last ``progress`` a send may wait for the guest to
    take a byte: ``SEND_TIMEOUT``, or until the calling thread's ``deadline``
    (at least ``STALL_FLOOR``: a frame half sent breaks the channel, so a guest
    that is slow, not gone, gets a moment past a deadline that ran out on
    something else)."""
    if deadline is None:
        return SEND_TIMEOUT
    return min(SEND_TIMEOUT, max(deadline - progress, STALL_FLOOR))


def send_all(
    sock: socket.socket, data: bytes, deadline: float | None, stuck: Callable[[float], None] | None = None
) -> None:
    """``sock.sendall(data)`` (a socket with a timeout: its descriptor does not
    block), raising ``Stalled`` once the guest has taken nothing for
    ``stall_limit(deadline, progress)`` s.  A guest that takes a write's worth
    (``_PIECE``) within that, however long the whole takes, gets the whole
    frame (``sendall``'s own timeout is one for the whole).  ``stuck`` is
    called with the time since the guest last took something while it takes
    nothing (it may raise: a guest that will never read again)."""
    view = memoryview(data)
    fd = sock.fileno()
    poller: select.poll | None = None
    progress = time.monotonic()
    while view:
        try:
            sent = os.write(fd, view[:_PIECE])
        except BlockingIOError:
            sent = 0
        if sent:
            view = view[sent:]
            progress = time.monotonic()
            continue
        limit = stall_limit(deadline, progress)
        if time.monotonic() - progress >= limit:
            raise Stalled(limit, len(data) - len(view))
        if stuck is not None:
            stuck(time.monotonic() - progress)
        if poller is None:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
        poller.poll(_LOOK)


class Deadlines:
    """A thread's deadline for the calls it makes (mixed into ``AgentChannel``):
    waits raise ``AgentTimeout`` at it, and sends give up on a guest that takes
    nothing by then (``send_all``)."""

    _tls: threading.local

    def deadline(self, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        """Calls this thread makes inside raise AgentTimeout after ``timeout`` s
        (for helpers that take no timeout themselves: tree transfers); a sooner
        deadline the thread already has stays, and ``None`` adds none."""
        return self._within(None if timeout is None else time.monotonic() + timeout)

    @contextlib.contextmanager
    def _within(self, deadline: float | None) -> Iterator[None]:
        """This thread's deadline is ``deadline`` inside, or the one it had if sooner."""
        old = self._thread_deadline()
        if deadline is not None:
            self._tls.deadline = deadline if old is None else min(old, deadline)
        try:
            yield
        finally:
            self._tls.deadline = old

    def _thread_deadline(self) -> float | None:
        return getattr(self._tls, "deadline", None)


@contextlib.contextmanager
def held_by(lock: threading.Lock, deadline: float | None) -> Iterator[bool]:
    """``lock`` held inside if it could be had by ``deadline`` (``time.monotonic()``;
    None: however long it takes; now: only if free); whether it was."""
    got = False
    try:
        got = lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic()))
        yield got
    finally:
        if got:
            lock.release()
