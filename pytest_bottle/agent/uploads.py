"""Data the host streams to the agent (uploads, a command's stdin, a
terminal's keys), sent only as fast as the agent's window allows: mixed into
``channel.AgentChannel``, whose state and liveness checks it uses."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable

from ..errors import AgentError, AgentTimeout
from ..guest.frames import CANCEL, CHUNK, DATA, EOF, frame
from .calls import Call, CallOver
from .ends import Ends
from .send import held_by


class Uploads(Ends):  # from Ends: the channel's attributes, its liveness check and ``_send_locked``
    _lock: threading.Lock
    _credit: threading.Condition
    _calls: dict[int, Call]

    def _send(self, data: bytes, *, confined: bool = False) -> None:
        raise NotImplementedError

    def _within(self, deadline: float | None) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def send_data_frame(self, rid: int, chunk: bytes, deadline: float | None = None) -> None:
        """Send ``chunk`` as DATA once the agent has room for it (raises CallOver
        if the call ended meanwhile, AgentTimeout at ``deadline``)."""
        deadline = deadline if deadline is not None else self._thread_deadline()
        for i in range(0, len(chunk), CHUNK):
            piece = chunk[i : i + CHUNK]
            if deadline is not None and time.monotonic() >= deadline:  # credit to spare is no licence to go on
                raise AgentTimeout(f"bottle {self.name}: the agent took no more data before the deadline")
            with self._lock:
                while True:
                    call = self._calls.get(rid)
                    if call is None:
                        raise CallOver
                    if call.window >= len(piece):
                        call.window -= len(piece)
                        break
                    wait = self.idle if deadline is None else min(self.idle, deadline - time.monotonic())
                    if wait <= 0:
                        raise AgentTimeout(f"bottle {self.name}: the agent took no more data before the deadline")
                    if not self._credit.wait(wait):
                        self._lock.release()
                        try:
                            self._check_alive("a transfer")
                        finally:
                            self._lock.acquire()
            with self._within(deadline):  # a guest that takes nothing of it fails it then, not 60 s later
                self._send(frame(DATA, rid, piece), confined=True)

    def send_data(self, rid: int, chunks: Iterable[bytes], deadline: float | None = None) -> None:
        """Stream ``chunks`` then EOF, within the agent's window; stop quietly if
        the call ended; if producing them fails, tell the agent to abort the call
        (it drops what it wrote) and re-raise.  The cancel and the EOF keep to
        ``deadline`` too."""
        with self._within(deadline):
            try:
                for chunk in chunks:
                    if chunk:
                        self.send_data_frame(rid, chunk, deadline)
            except CallOver:
                return
            except AgentTimeout:
                if not self.broken:  # the agent is alive and waits for more: it must drop what it wrote
                    self.cancel(rid)
                raise
            except AgentError:
                raise
            except BaseException:
                if not self.broken:
                    self.cancel(rid)
                raise
            self._send(frame(EOF, rid))

    def cancel(self, rid: int, within: float | None = None) -> None:
        """Tell the agent to drop call ``rid``.  ``within``: seconds to wait for
        the channel (another send may hold it on a guest that reads nothing);
        past them nothing is sent (the call is forgotten anyway)."""
        with held_by(self._wlock, None if within is None else time.monotonic() + within) as got:
            if got:
                self._send_locked(frame(CANCEL, rid))
