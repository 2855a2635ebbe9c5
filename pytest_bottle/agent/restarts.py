"""How the host's end of the agent channel starts over with the agent: after
a restart (a HELLO with a new instance id), or when the stream lost its
frames (an agent killed while it sent one).  Mixed into
``channel.AgentChannel``, whose state it uses."""

from __future__ import annotations

import logging
import threading
import time

from ..errors import AgentError
from ..guest import frames
from .calls import Call, lose
from .ends import Ends
from .send import send_all

log = logging.getLogger(__name__)

RESYNC_WAIT = 5.0  # a new agent reads all before a SYNC: one that takes nothing this long is not one


class Restarts(Ends):  # from Ends: the channel's attributes and ``_break``
    restarts: int
    _settled: threading.Event
    _frames: int
    _resynced: bool
    _resync_at: float
    _lock: threading.Lock

    def _take_calls(self) -> list[Call]:
        raise NotImplementedError

    def _resync(self, what: str) -> None:
        """The stream lost its frames: an agent killed while it sent one left it
        unfinished (systemd starts another, whose HELLO goes where the frame goes
        on, and which drops all it reads before a SYNC), or a guest sends garbage.
        Every call is lost either way; a SYNC asks for a HELLO to start again from."""
        self._resync_at = time.monotonic()  # first: a call that sees the flag cleared reads this
        self._settled.clear()  # until its HELLO: a call sent now would be lost in the next SYNC
        self._frames, self._resynced = 0, True
        calls = self._start_over("the resync after the agent " + what.split(" (")[0] + " failed")
        self._resync_at = time.monotonic()  # the agent's dead_after counts from its SYNC
        why = f"the guest agent {what}"
        log.debug("agent channel %s: %s; %d call(s) lost", self.name, why, len(calls))
        lose(calls, f"{why}; {len(calls)} call(s) lost")

    def _restarted(self) -> None:
        """The agent restarted: whatever it was doing is gone."""
        self.restarts += 1
        calls = self._start_over("the resync after an agent restart failed")
        log.debug("agent channel %s: the guest agent restarted, %d call(s) lost", self.name, len(calls))
        lose(calls, f"the guest agent restarted; {len(calls)} call(s) lost")

    def _start_over(self, failure: str) -> list[Call]:
        """Take every call and send a SYNC in one step, so no CALL slips between
        (a new agent drops all it reads before a SYNC); the calls, to be lost."""
        with self._wlock, self._lock:
            calls = self._take_calls()
            if not self.broken:  # bounded: every call waits on these locks, whatever its timeout
                try:
                    send_all(self.sock, frames.SYNC_FRAME, time.monotonic() + RESYNC_WAIT)
                except OSError as e:  # Stalled too
                    self._break(e, failure)
        return calls

    def _settle(self) -> None:
        """A call waits for the HELLO a resync asked for (else the SYNC of a restart
        found then ends it), within its deadline; or it goes on when the channel
        closes (the reader sets ``_settled`` as it ends).  No HELLO ``dead_after`` s
        after the SYNC: no agent answers, and every call fails at once from then on."""
        if self._settled.is_set():
            return
        until = self._resync_at + self.dead_after
        deadline = self._thread_deadline()
        if self._settled.wait(max(0.0, (until if deadline is None else min(until, deadline)) - time.monotonic())):
            return
        if time.monotonic() >= until:
            raise AgentError(
                f"bottle {self.name}: the guest agent has not answered for {self.dead_after:g} s since the host "
                "asked it to start over (after a broken frame); it is hung or gone"
            )
