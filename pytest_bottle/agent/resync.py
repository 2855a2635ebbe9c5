"""Finding the start of a session on a fresh connection to an agent.

A connection to a kept bottle's agent (``bottle shell``) may begin in the
middle of what the agent sent to the last one: the guest writes a frame in
pieces, so the chardev can be swapped, or a shell die, with half a frame
sent.  The agent answers the new session's SYNC with a HELLO; whatever
comes before it belongs to the last session and is dropped, up to a bound.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from ..guest import frames
from .calls import ProtocolError

# Bytes dropped looking for the first HELLO before giving up: a little more
# than what the agent can have in flight (its window per call, a few calls).
RESYNC_LIMIT = 16 * 1024 * 1024
MARKER = frames.HEADER.pack(frames.HELLO, 0, frames.HELLO_SIZE) + frames.SYNC_MAGIC


class NoHello(ProtocolError):
    """No HELLO within ``RESYNC_LIMIT`` bytes of a fresh connection."""


def receiver(sock: socket.socket) -> Callable[[], bytes]:
    def recv() -> bytes:
        while True:
            try:
                return sock.recv(frames.CHUNK)
            except TimeoutError:  # the socket's timeout bounds sends; reads wait on
                continue

    return recv


def skip_to_hello(recv: Callable[[], bytes], limit: int = RESYNC_LIMIT) -> tuple[bytes, bytes]:
    """Read with ``recv`` (b"" at the end raises EOFError) until the first
    HELLO frame; return its payload and the bytes read past it."""
    buf = b""
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


def exact_reader(sock: socket.socket, pending: bytes) -> Callable[[int], bytes]:
    """``read(n)``: exactly ``n`` bytes, first from ``pending`` (read past the
    HELLO), then from ``sock``; EOFError at the end."""
    rest = bytearray(pending)

    def read(n: int) -> bytes:
        buf = bytearray()
        if rest:
            buf += rest[:n]
            del rest[:n]
        while len(buf) < n:
            try:
                chunk = sock.recv(min(n - len(buf), frames.CHUNK))  # never reserve what a header claims
            except TimeoutError:  # the socket's timeout bounds sends; reads wait on
                continue
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    return read
