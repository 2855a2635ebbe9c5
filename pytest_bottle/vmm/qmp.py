"""QMP through the ``qemu.qmp`` library, usable from any thread.

All clients share one asyncio loop running in a daemon thread; calls hop onto
it with ``run_coroutine_threadsafe`` and wait with a timeout, so a dead or
wedged QEMU never blocks a caller forever.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

log = logging.getLogger(__name__)
T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            _loop.set_exception_handler(_unretrieved)
            threading.Thread(target=_loop.run_forever, name="bottle-qmp", daemon=True).start()
        return _loop


def _unretrieved(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A QEMU gone without a ``disconnect`` leaves qemu.qmp's reader task with
    an EOFError nobody awaits: expected, so not printed as asyncio's
    "exception was never retrieved"."""
    if isinstance(context.get("exception"), (EOFError, ConnectionError)):
        log.debug("qmp: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


_open: weakref.WeakSet[QMP] = weakref.WeakSet()  # under _loop_lock


@atexit.register
def _disconnect_all() -> None:
    """At exit, end the sessions of bottles never closed: left to the
    interpreter's teardown, their tasks die with the loop's daemon thread and
    each prints a traceback ("Task was destroyed but it is pending!")."""
    with _loop_lock:
        sessions = list(_open)
    for qmp in sessions:
        qmp.close(timeout=1.0)
    if _loop is not None:
        _loop.call_soon_threadsafe(_loop.stop)


def _forked() -> None:
    """A forked child has no loop thread, and the sessions are its parent's."""
    global _loop, _loop_lock, _open
    _loop, _loop_lock, _open = None, threading.Lock(), weakref.WeakSet()


os.register_at_fork(after_in_child=_forked)


# qemu.qmp logs every message at DEBUG, and our users' -p logging would drown in it;
# its warnings are about answers that come after we stopped waiting ("Unknown ID"), and
# its errors about a QEMU that exited while we connected ("Negotiation failed: EOFError",
# on `bottle run`'s stderr when the KVM probe's QEMU fails): each is also raised to us,
# and we say what happened.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def io_stop(event: Any) -> str:
    """Why QEMU stopped the VM's disk, from a ``BLOCK_IO_ERROR`` event whose action
    was to stop it (a full host file system under ``werror=enospc``: the
    guest would otherwise wait for its disk forever), else ""."""
    data = event.get("data") if event.get("event") == "BLOCK_IO_ERROR" else None
    if not isinstance(data, dict) or data.get("action") != "stop":
        return ""
    reason = str(data.get("reason", "an I/O error"))[:200]
    return f"the host's file system under it is full: {reason}" if data.get("nospace") else reason


# A command's answer waits for QEMU's main loop, which a state load or a
# flush of guest writes can hold for seconds on a loaded host.
TIMEOUT = 60.0
# What a command raises when QEMU fails at it, is gone, or does not answer.
FAILED = (QMPError, OSError, EOFError, TimeoutError)


class QMP:
    """A connected QMP session over an already connected socket."""

    def __init__(self, sock: socket.socket, name: str, timeout: float = TIMEOUT) -> None:
        self.name = name
        self.timeout = timeout
        self._client = QMPClient(name)
        # Its default listener keeps every event (and a history of them) for the
        # session's life: a guest can make QEMU send them (RTC_CHANGE...), so
        # none is kept; a stop on a disk error is told to ``on_stop`` (on the loop: it must not block).
        self._client.events.event_filter = self._event
        self.on_stop: Callable[[str], None] | None = None
        self._sock = sock
        self._connected = False

    def _event(self, event: Any) -> bool:
        try:  # on qemu.qmp's reader: an exception here would end the session
            if (why := io_stop(event)) and self.on_stop is not None:
                self.on_stop(why)
        except Exception as e:
            log.warning("qmp %s: handling %s failed: %s", self.name, event.get("event"), e)
        return False

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, _get_loop())
        limit = self.timeout if timeout is None else timeout
        try:
            return fut.result(limit)
        except TimeoutError:
            if fut.done():  # the command's own error, not our wait
                raise
            fut.cancel()
            raise TimeoutError(f"QEMU of {self.name} did not answer {what} within {limit:g} s") from None
        except BaseException:
            fut.cancel()
            raise

    def connect(self, timeout: float | None = None) -> None:
        if not self._connected:
            self._run(self._client.connect(self._sock), timeout, "QMP's greeting")
            self._connected = True
            with _loop_lock:
                _open.add(self)

    def cmd(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        self.connect(timeout)
        return self._run(self._client.execute(command, args or None), timeout, repr(command))

    def close(self, timeout: float = 2.0) -> None:
        with _loop_lock:  # one closer disconnects
            connected, self._connected = self._connected, False
            _open.discard(self)
        if connected:
            try:
                self._run(self._client.disconnect(), timeout, "a disconnect")
            except Exception as e:  # QEMU may be gone already; nothing to release
                log.debug("qmp %s disconnect: %s", self.name, e)
        self._sock.close()
