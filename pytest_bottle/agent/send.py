"""Writing frames to a guest that may stop reading: bounded by how long the
guest takes nothing, not by how long a big frame takes to go through."""

from __future__ import annotations

import select
import socket
import time

SEND_TIMEOUT = 60.0  # a guest that reads nothing of a frame this long is gone
STALL_FLOOR = 2.0  # past a call's deadline, how long a guest may still read nothing


def stall_limit(deadline: float | None) -> float:
    """How long a send may wait for the guest to take a byte: ``SEND_TIMEOUT``,
    or what is left of the calling thread's ``deadline`` (at least ``STALL_FLOOR``:
    a frame half sent breaks the channel, so a guest that is slow, not gone,
    gets a moment past a deadline that ran out on something else)."""
    if deadline is None:
        return SEND_TIMEOUT
    return min(SEND_TIMEOUT, max(deadline - time.monotonic(), STALL_FLOOR))


def send_all(sock: socket.socket, data: bytes, deadline: float | None) -> None:
    """``sock.sendall(data)``, raising ``TimeoutError`` once the guest has taken
    nothing for ``stall_limit(deadline)`` s; a guest that keeps reading, however
    slowly, gets the whole frame (``sendall``'s own timeout is one total)."""
    view = memoryview(data)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    while view:
        limit = stall_limit(deadline)
        if not poller.poll(limit * 1000):
            raise TimeoutError(f"the agent read nothing for {limit:.0f} s")
        view = view[sock.send(view) :]
