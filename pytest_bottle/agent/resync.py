"""Finding the start of a session on a fresh connection to an agent.

A connection to a kept bottle's agent (``bottle shell``) may begin in the
middle of what the agent sent to the last one: the guest writes a frame in
pieces, so the chardev can be swapped, or a shell die, with half a frame
sent.  The agent answers the new session's SYNC with a HELLO; whatever
comes before it belongs to the last session and is dropped, up to a bound.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

from ..guest import frames
from .calls import ProtocolError

# Bytes dropped looking for the first HELLO before giving up: a little more
# than what the agent can have in flight (its window per call, a few calls).
RESYNC_LIMIT = 16 * 1024 * 1024
MARKER = frames.HEADER.pack(frames.HELLO, 0, frames.HELLO_SIZE) + frames.SYNC_MAGIC


class NoHello(ProtocolError):
    """No HELLO within ``RESYNC_LIMIT`` bytes of a fresh connection."""


class BadFrame(ProtocolError):
    """A frame no agent sends (an unknown kind, an oversized length, a reply
    that does not decode): garbage, or an agent's successor's HELLO read where
    its predecessor's unfinished frame went on.  ``seen``: its last bytes."""

    def __init__(self, message: str, seen: bytes) -> None:
        super().__init__(message)
        self.seen = seen


class MidFrame(Exception):
    """Nothing came for ``stall`` seconds in the middle of a frame: its sender
    stopped there (an agent killed while it wrote, whose successor's HELLO is
    then read as that frame's payload).  ``partial``: what came of it."""

    def __init__(self, partial: bytes) -> None:
        super().__init__(f"after {len(partial)} bytes of it")
        self.partial = partial


def receiver(sock: socket.socket, deadline: float | None = None) -> Callable[[], bytes]:
    """``recv()`` of what comes; with a ``deadline`` (``time.monotonic()``),
    ``TimeoutError`` once it passed."""
    waiting = select.poll()
    waiting.register(sock, select.POLLIN)

    def recv() -> bytes:
        while True:
            if deadline is not None and not waiting.poll(max(0.0, deadline - time.monotonic()) * 1000):
                raise TimeoutError("no HELLO in time")
            try:
                return sock.recv(frames.CHUNK)
            except TimeoutError:  # the socket's timeout bounds sends; reads wait on
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                continue

    return recv


def skip_to_hello(recv: Callable[[], bytes], limit: int = RESYNC_LIMIT, start: bytes = b"") -> tuple[bytes, bytes]:
    """Read with ``recv`` (b"" at the end raises EOFError) until the first
    HELLO frame, looking in ``start`` first; return its payload and the bytes
    read past it."""
    buf = start
    skipped = 0
    while True:
        at = buf.find(MARKER)
        if at >= 0:
            skipped += at
            break
        cut = max(0, len(buf) - (len(MARKER) - 1))  # a marker may straddle two reads
        skipped += cut
        buf = buf[cut:]
        if skipped > limit:
            raise NoHello(f"no HELLO from the agent in the first {skipped} bytes (limit {limit})")
        chunk = recv()
        if not chunk:
            raise EOFError
        buf += chunk
    end = at + frames.HEADER.size + frames.HELLO_SIZE
    while len(buf) < end:
        chunk = recv()
        if not chunk:
            raise EOFError
        buf += chunk
    return buf[at + frames.HEADER.size : end], buf[end:]


def exact_reader(
    sock: socket.socket, pending: bytes, stall: Callable[[], float] | None = None
) -> Callable[[int, bool], bytes]:
    """``read(n, within_frame)``: exactly ``n`` bytes, first from ``pending``
    (read past the HELLO), then from ``sock``; EOFError at the end.  With
    ``stall()`` seconds, ``MidFrame`` when nothing comes for that long while a frame is
    under way (``within_frame``: its payload; or some of its header came)."""
    rest = bytearray(pending)
    waiting = select.poll()
    waiting.register(sock, select.POLLIN)

    def read(n: int, within_frame: bool = False) -> bytes:
        buf = bytearray()
        if rest:
            buf += rest[:n]
            del rest[:n]
        last = time.monotonic()
        while len(buf) < n:
            if stall is not None and (within_frame or buf):
                left = last + stall() - time.monotonic()
                if left <= 0:
                    raise MidFrame(bytes(buf))
                if not waiting.poll(left * 1000 + 1):
                    continue
            try:
                chunk = sock.recv(min(n - len(buf), frames.CHUNK))  # never reserve what a header claims
            except TimeoutError:  # the socket's timeout bounds sends; reads wait on
                continue
            if not chunk:
                raise EOFError
            buf += chunk
            last = time.monotonic()
        return bytes(buf)

    return read
