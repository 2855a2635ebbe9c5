"""The agent's wire format and the guest end of its port (stdlib only).

Frames are ``kind (1 byte) | request id (4) | length (4)`` followed by
``length`` payload bytes; control frames carry a small JSON object, data
frames carry raw bytes (no base64 on the data path).  The host imports this
module too, so the two sides cannot drift apart.

Limits, checked by both ends before a payload is read: no frame is longer
than ``MAX_PAYLOAD``, a stream frame (DATA, STDOUT, STDERR) no longer than
``CHUNK``.  Streams are flow-controlled per request and direction: a sender
may have at most a window of bytes its peer has not consumed yet
(``WINDOW`` towards the guest, ``HOST_WINDOW`` towards the host); the consumer returns credit in CREDIT frames (a 4-byte
count) once it has taken a quarter of the window out, so a small stream
never costs a CREDIT frame and a large one few.

A starting agent sends HELLO unsolicited (``SYNC_MAGIC`` + a random
instance id) and answers every SYNC and PING with it: the host learns that
the agent restarted, and that it is alive, from one kind of frame.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

VERSION = 2
PORT_NAME = "bottle.agent"
HEADER = struct.Struct("!BII")
CHUNK = 256 * 1024
MAX_PAYLOAD = 4 * 1024 * 1024  # a CALL carries argv and env: room for what execve takes
# 4 MiB each way: measured under TCG, 1 MiB stalled uploads and stdin (~25% slower
# than no flow control); 4 MiB is on par.  Guest memory per upload stays bounded.
WINDOW = 16 * CHUNK  # host -> guest: stdin, uploads
HOST_WINDOW = 16 * CHUNK  # guest -> host: output, downloads
CREDIT_STEP = WINDOW // 4
HOST_CREDIT_STEP = HOST_WINDOW // 4
COUNT = struct.Struct("!I")

CALL, DATA, EOF, STDOUT, STDERR, REPLY, CANCEL, SYNC, HELLO, PING, CREDIT, STARTED = range(1, 13)
NAMES = {
    CALL: "CALL", DATA: "DATA", EOF: "EOF", STDOUT: "STDOUT", STDERR: "STDERR", REPLY: "REPLY",
    CANCEL: "CANCEL", SYNC: "SYNC", HELLO: "HELLO", PING: "PING", CREDIT: "CREDIT", STARTED: "STARTED",
}  # fmt: skip
# STARTED: a spawned command runs (JSON ``{"pid": N}``), before any of its
# output; it counts against the request's window like output does.
STARTED_LIMIT = 256
STREAMS = (DATA, STDOUT, STDERR)
SYNC_MAGIC = b"\xb0pytest-bottle\x00\x02"
SYNC_FRAME = HEADER.pack(SYNC, 0, len(SYNC_MAGIC)) + SYNC_MAGIC
INSTANCE_SIZE = 16
HELLO_SIZE = len(SYNC_MAGIC) + INSTANCE_SIZE


def frame(kind: int, rid: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, rid, len(payload)) + payload


def jframe(kind: int, rid: int, obj: dict[str, Any]) -> bytes:
    return frame(kind, rid, json.dumps(obj, separators=(",", ":")).encode())


def credit_frame(rid: int, n: int) -> bytes:
    return HEADER.pack(CREDIT, rid, COUNT.size) + COUNT.pack(n)


def limit(kind: int) -> int:
    """The longest payload a frame of ``kind`` may carry."""
    if kind in STREAMS:
        return CHUNK
    if kind == CREDIT:
        return COUNT.size
    if kind == HELLO:
        return HELLO_SIZE
    if kind == STARTED:
        return STARTED_LIMIT
    if kind in (EOF, CANCEL, PING):
        return 0
    return MAX_PAYLOAD


class Aborted(ConnectionAbortedError):
    """The host gave up on a transfer (CANCEL) or left: whatever was written must go."""


class Channel:
    """The guest end: a virtio-serial port the host may connect to and leave.

    Until the first SYNC of a host everything read is dropped: bytes left in
    the port by a host that left, or by a predecessor agent that died in the
    middle of a frame, must never be taken for a call.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.wlock = threading.Lock()
        self.buf = bytearray()
        self.synced = False
        # One read buffer for good: os.read() allocates (and under glibc, maps
        # and remaps) a fresh buffer per call, kernel work TCG pays for.
        self.rbuf = bytearray(CHUNK)
        self.rview = memoryview(self.rbuf)
        self.poller = select.poll()
        self.poller.register(fd, select.POLLOUT)
        self.later: queue.SimpleQueue[bytes] | None = None

    def _write(self, data: bytes) -> None:
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

    def send(self, data: bytes) -> None:
        with self.wlock:
            self._write(data)

    def post(self, data: bytes) -> None:
        """Send a small frame from the reading thread without ever blocking it:
        a reader stuck on a write could no longer drain the port, and the host
        (whose reader may be waiting to send us credit) would stall with it."""
        if self.wlock.acquire(blocking=False):
            try:
                if any(ev & select.POLLOUT for _, ev in self.poller.poll(0)):
                    self._write(data)
                    return
            finally:
                self.wlock.release()
        if self.later is None:
            self.later = queue.SimpleQueue()
            threading.Thread(target=self._send_later, args=(self.later,), daemon=True).start()
        self.later.put(data)

    def _send_later(self, later: queue.SimpleQueue[bytes]) -> None:
        while True:
            self.send(later.get())

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
            self.synced = False
            time.sleep(idle)
            idle = min(idle * 2, 0.05)

    def recv(self) -> tuple[int, int, bytes]:
        while True:
            while len(self.buf) < HEADER.size:
                self._fill()
            kind, rid, size = HEADER.unpack_from(self.buf)
            if kind == SYNC or not self.synced or kind not in NAMES or size > limit(kind):
                pos = self.buf.find(SYNC_FRAME)
                if pos < 0:
                    del self.buf[: max(0, len(self.buf) - len(SYNC_FRAME))]
                    self._fill()
                    continue
                del self.buf[: pos + len(SYNC_FRAME)]
                self.synced = True
                return SYNC, 0, b""
            while len(self.buf) < HEADER.size + size:
                self._fill()
            payload = bytes(self.buf[HEADER.size : HEADER.size + size])
            del self.buf[: HEADER.size + size]
            return kind, rid, payload


class Windows:
    """The agent's send credit per request (see the module doc)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.avail: dict[int, int] = {}

    def open(self, rid: int, avail: int = HOST_WINDOW) -> None:
        with self.cond:
            self.avail[rid] = avail

    def close(self, rid: int) -> None:
        with self.cond:
            self.avail.pop(rid, None)

    def give(self, rid: int, n: int) -> None:
        with self.cond:
            if self.avail.get(rid, -1) >= 0:
                self.avail[rid] += n
                self.cond.notify_all()

    def abort(self, rid: int | None = None) -> None:
        """Wake the senders of ``rid`` (or all): their stream is over."""
        with self.cond:
            for r in list(self.avail) if rid is None else [rid]:
                if r in self.avail:
                    self.avail[r] = -1
            self.cond.notify_all()

    def take(self, rid: int, n: int) -> None:
        with self.cond:
            while True:
                have = self.avail.get(rid, -1)
                if have < 0:
                    raise Aborted("the host stopped this stream")
                if have >= n:
                    self.avail[rid] = have - n
                    return
                self.cond.wait()


class Inbox:
    """Frames from the host for one request (stdin or file data).

    ``ended`` turns true once EOF or CANCEL has been taken out: nothing more
    will come, so nobody must wait for it.  Taking DATA out returns credit
    through ``grant`` (the host sends at most ``WINDOW`` bytes ahead).
    """

    def __init__(self, grant: Callable[[int], None] | None = None) -> None:
        self.cond = threading.Condition()
        self.items: list[tuple[int, bytes]] = []
        self.ended = False
        self.grant = grant
        self.taken = 0

    def put(self, kind: int, data: bytes) -> None:
        with self.cond:
            self.items.append((kind, data))
            self.cond.notify()

    def get(self) -> tuple[int, bytes]:
        owed = 0
        with self.cond:
            while not self.items:
                self.cond.wait()
            kind, data = self.items.pop(0)
            if kind != DATA:
                self.ended = True
            else:
                self.taken += len(data)
                if self.taken >= CREDIT_STEP:
                    owed, self.taken = self.taken, 0
        if owed and self.grant is not None and not self.ended:
            self.grant(owed)
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
    """A write-only file object that hands its bytes on in pieces of at most CHUNK."""

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        self.emit = emit
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        while len(self.buf) >= CHUNK:
            self.emit(bytes(self.buf[:CHUNK]))
            del self.buf[:CHUNK]
        return len(data)

    def flush(self) -> None:
        if self.buf:
            self.emit(bytes(self.buf))
            self.buf.clear()
