"""Host end of the agent channel: a socket to QEMU's virtio-serial port.

One reader thread demultiplexes frames by request id, so several threads may
run commands in the same bottle at once.  When the socket closes (QEMU died)
every waiting call fails at once with ``AgentError``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import AgentError, SpecError, guest_os_error
from .frames import CALL, CANCEL, DATA, EOF, HEADER, REPLY, SYNC, SYNC_FRAME, frame

log = logging.getLogger(__name__)

Sink = Callable[[int, bytes], None]


class _Call:
    __slots__ = ("done", "error", "reply", "sink")

    def __init__(self, sink: Sink | None) -> None:
        self.done = threading.Event()
        self.reply: dict[str, Any] | None = None
        self.sink = sink
        self.error: BaseException | None = None  # the sink's own failure (a full local disk...)


class AgentChannel:
    def __init__(self, sock: socket.socket, name: str = "bottle") -> None:
        self.sock = sock
        self.name = name
        self.synced = threading.Event()
        self.closed = threading.Event()
        self.death = ""
        self.broken = ""
        self._wlock = threading.Lock()
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._next_id = 1
        self._reader = threading.Thread(target=self._read_loop, name=f"bottle-agent-{name}", daemon=True)
        self._reader.start()

    # -- plumbing -----------------------------------------------------------

    def _send(self, data: bytes) -> None:
        with self._wlock:
            if self.broken:
                raise AgentError(f"agent channel of {self.name} is unusable: {self.broken}")
            try:
                self.sock.sendall(data)
            except OSError as e:
                raise AgentError(f"agent channel of {self.name} broke: {e}") from None
            except BaseException as e:
                # Interrupted mid-frame (a signal, a test timeout): the agent would
                # read the next frame from the middle of this one. Give up on the
                # channel rather than let later calls hang.
                self.broken = f"a write was interrupted ({type(e).__name__})"
                self.sock.shutdown(socket.SHUT_RDWR)
                raise

    def send_sync(self) -> None:
        self._send(SYNC_FRAME)

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _read_loop(self) -> None:
        try:
            while True:
                kind, rid, size = HEADER.unpack(self._read_exact(HEADER.size))
                payload = self._read_exact(size) if size else b""
                if kind == SYNC:
                    self.synced.set()
                    continue
                with self._lock:
                    call = self._calls.get(rid)
                if call is None:
                    continue
                if kind == REPLY:
                    call.reply = json.loads(payload)
                    with self._lock:
                        self._calls.pop(rid, None)
                    call.done.set()
                elif call.sink is not None and call.error is None:
                    try:
                        call.sink(kind, payload)
                    except Exception as e:  # the call fails, the channel goes on
                        call.error = e
        except (EOFError, OSError) as e:
            self.death = "the VM closed the agent channel" if isinstance(e, EOFError) else str(e)
        except Exception as e:  # a broken frame: the channel cannot be trusted any more
            self.death = f"protocol error: {type(e).__name__}: {e}"
            log.debug("agent channel %s: %s", self.name, self.death)
        finally:
            with self._lock:
                self.closed.set()
                calls, self._calls = list(self._calls.values()), {}
            for call in calls:
                call.done.set()

    # -- calls --------------------------------------------------------------

    def start(self, op: str, sink: Sink | None = None, **args: Any) -> tuple[int, _Call]:
        call = _Call(sink)
        with self._lock:  # the reader closes under this lock: no call slips past its final sweep
            if self.closed.is_set():
                raise AgentError(f"agent channel of {self.name} is closed: {self.death or 'closed'}")
            rid = self._next_id
            self._next_id += 1
            self._calls[rid] = call
        self._send(frame(CALL, rid, json.dumps(dict(args, op=op)).encode()))
        return rid, call

    def send_data_frame(self, rid: int, chunk: bytes) -> None:
        self._send(frame(DATA, rid, chunk))

    def send_data(self, rid: int, chunks: Iterable[bytes]) -> None:
        """Stream ``chunks`` then EOF; if producing them fails, tell the agent to
        abort the call (it drops what it wrote) and re-raise."""
        try:
            for chunk in chunks:
                if chunk:
                    self._send(frame(DATA, rid, chunk))
        except AgentError:
            raise
        except BaseException:
            if not self.broken:
                self.cancel(rid)
            raise
        self._send(frame(EOF, rid))

    def cancel(self, rid: int) -> None:
        self._send(frame(CANCEL, rid))

    def wait(self, call: _Call, timeout: float | None = None, op: str = "") -> dict[str, Any] | None:
        """The call's reply, None on timeout; raises AgentError if the channel died."""
        if not call.done.wait(timeout):
            return None
        if call.error is not None:
            raise call.error
        if call.reply is None:
            raise AgentError(f"bottle {self.name}: {self.death or 'agent channel closed'} during {op or 'a call'}")
        if not call.reply.get("ok"):
            raise _guest_error(call.reply, op)
        return call.reply

    def call(
        self,
        op: str,
        *,
        data: Iterable[bytes] | None = None,
        sink: Sink | None = None,
        timeout: float | None = None,
        **args: Any,
    ) -> dict[str, Any]:
        rid, call = self.start(op, sink, **args)
        if data is not None:
            self.send_data(rid, data)
        reply = self.wait(call, timeout, op)
        if reply is None:
            raise AgentError(f"bottle {self.name}: the agent did not answer {op!r} within {timeout} s")
        return reply

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(timeout=2)


def _guest_error(reply: dict[str, Any], op: str) -> Exception:
    msg = str(reply.get("error", "unknown error"))
    if reply.get("type") == "OSError" or reply.get("errno") is not None:
        return guest_os_error(f"in the guest: {msg}", reply.get("errno"), reply.get("path"))
    if reply.get("type") == "ValueError":  # a bad argument the guest could not honour (e.g. user=)
        return SpecError(msg.removeprefix("ValueError: "), f"{op}()")
    return AgentError(f"agent error during {op}: {msg}")
