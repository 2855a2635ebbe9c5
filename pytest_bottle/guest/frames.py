"""The agent's wire format and the guest end of its port (stdlib only).

Frames are ``kind (1 byte) | request id (4) | length (4)`` followed by
``length`` payload bytes; control frames carry a small JSON object, data
frames carry raw bytes (no base64 on the data path).  The host imports this
module too, so the two sides cannot drift apart.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

VERSION = 1
PORT_NAME = "bottle.agent"
HEADER = struct.Struct("!BII")
CHUNK = 256 * 1024

CALL, DATA, EOF, STDOUT, STDERR, REPLY, CANCEL, SYNC = range(1, 9)
SYNC_MAGIC = b"\xb0pytest-bottle\x00\x01"
SYNC_FRAME = HEADER.pack(SYNC, 0, len(SYNC_MAGIC)) + SYNC_MAGIC


def frame(kind: int, rid: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, rid, len(payload)) + payload


def jframe(kind: int, rid: int, obj: dict[str, Any]) -> bytes:
    return frame(kind, rid, json.dumps(obj, separators=(",", ":")).encode())


class Channel:
    """The guest end: a virtio-serial port the host may connect to and leave."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.wlock = threading.Lock()
        self.buf = bytearray()
        # One read buffer for good: os.read() allocates (and under glibc, maps
        # and remaps) a fresh buffer per call, kernel work TCG pays for.
        self.rbuf = bytearray(CHUNK)
        self.rview = memoryview(self.rbuf)

    def send(self, data: bytes) -> None:
        with self.wlock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.fd, view)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EINTR):
                        time.sleep(0.001)
                        continue
                    raise
                view = view[n:]

    def _fill(self) -> None:
        idle = 0.001
        while True:
            try:
                n = os.readv(self.fd, [self.rbuf])
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EINTR):
                    raise
                n = 0
            if n:
                self.buf += self.rview[:n]
                return
            # No host connected: the port reads as EOF at once.  Whatever was
            # buffered belonged to the host that left; resynchronise on SYNC.
            self.buf.clear()
            time.sleep(idle)
            idle = min(idle * 2, 0.05)

    def recv(self) -> tuple[int, int, bytes]:
        while True:
            while len(self.buf) < HEADER.size:
                self._fill()
            kind, rid, size = HEADER.unpack_from(self.buf)
            if kind == SYNC or not 1 <= kind <= SYNC:
                pos = self.buf.find(SYNC_FRAME)
                if pos < 0:
                    del self.buf[: max(0, len(self.buf) - len(SYNC_FRAME))]
                    self._fill()
                    continue
                del self.buf[: pos + len(SYNC_FRAME)]
                return SYNC, 0, b""
            while len(self.buf) < HEADER.size + size:
                self._fill()
            payload = bytes(self.buf[HEADER.size : HEADER.size + size])
            del self.buf[: HEADER.size + size]
            return kind, rid, payload


class Aborted(ConnectionAbortedError):
    """The host gave up on a transfer (CANCEL): whatever was written must go."""


class Inbox:
    """Frames from the host for one request (stdin or file data).

    ``ended`` turns true once EOF or CANCEL has been taken out: nothing more
    will come, so nobody must wait for it.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: list[tuple[int, bytes]] = []
        self.ended = False

    def put(self, kind: int, data: bytes) -> None:
        with self.cond:
            self.items.append((kind, data))
            self.cond.notify()

    def get(self) -> tuple[int, bytes]:
        with self.cond:
            while not self.items:
                self.cond.wait()
            kind, data = self.items.pop(0)
            if kind != DATA:
                self.ended = True
            return kind, data

    def chunks(self) -> Iterator[bytes]:
        """DATA payloads up to EOF; raises Aborted on CANCEL."""
        while True:
            kind, data = self.get()
            if kind == CANCEL:
                raise Aborted("the host aborted the transfer")
            if kind != DATA:
                return
            yield data

    def drain(self) -> None:
        while not self.ended:
            self.get()


class InboxReader:
    """A file object over a request's DATA frames, for tarfile's stream mode."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox
        self.buf = b""
        self.done = False

    def read(self, n: int = -1) -> bytes:
        while not self.done and (n < 0 or len(self.buf) < n):
            kind, data = self.inbox.get()
            if kind == CANCEL:
                self.done = True
                raise Aborted("the host aborted the transfer")
            if kind != DATA:
                self.done = True
            self.buf += data
        if n < 0:
            n = len(self.buf)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def drain(self) -> None:
        self.inbox.drain()
        self.done = True


class FrameWriter:
    """A write-only file object that hands its bytes on in DATA-sized chunks."""

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        self.emit = emit
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        if len(self.buf) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buf:
            self.emit(bytes(self.buf))
            self.buf.clear()
