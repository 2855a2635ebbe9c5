"""A bottle's command history: its last commands and spawned processes, for
the failure report's "last commands" section."""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import BottleError

if TYPE_CHECKING:
    from .process import GuestProcess


class ProcessEntry(tuple[str, int | None, float]):
    """A history entry for a spawned process: ``(cmd, None, 0.0)`` like a command
    that has not finished, plus the process, whose state the report shows.

    The process is held weakly: the history must not keep the output of ended
    processes (up to twice ``PROCESS_OUTPUT_CAP``) alive.  A running one is
    held by its call on the channel, so the report always sees those."""

    pid: int | None
    _ref: weakref.ref[GuestProcess]
    final: str | None

    def __new__(cls, cmd: str, process: GuestProcess) -> ProcessEntry:
        entry = super().__new__(cls, (cmd, None, 0.0))
        entry.pid, entry._ref = process.pid, weakref.ref(process)
        # Its end, once seen: the report still shows it after the test drops the process.
        entry.final = process.state() if process.ended_seen() else None
        process._on_end = entry._ended
        return entry

    def _ended(self, state: str) -> None:
        self.final = state

    @property
    def process(self) -> GuestProcess | None:
        """The process, or None once the test dropped it after its end."""
        return self._ref()

    def running(self) -> bool:
        """Not ended (a running one is referenced by its call), whether or not the test polled it."""
        p = self._ref()
        return self.final is None and p is not None and not p.ended()


HISTORY_LEN = 20


class CommandHistory(collections.deque[tuple[str, int | None, float]]):
    """A bottle's last ``HISTORY_LEN`` commands, oldest first (a deque of that ``maxlen``).

    A spawned process that is still running keeps its place (the report must
    show a server a test started long ago): the entry that makes room is the
    oldest one that is not such a process, unless every entry is one.
    Commands run from several threads: changes take a lock (readers copy it
    with ``list()``, one C call under the GIL)."""

    def __init__(self) -> None:
        super().__init__(maxlen=HISTORY_LEN)
        self._lock = threading.Lock()

    def append(self, entry: tuple[str, int | None, float]) -> None:
        with self._lock:
            if len(self) == self.maxlen:
                for i, old in enumerate(self):
                    if not (isinstance(old, ProcessEntry) and old.running()):
                        del self[i]
                        break
            super().append(entry)  # full of running processes: the oldest goes

    def clear(self) -> None:
        with self._lock:
            super().clear()


def describe_history(entries: Iterable[tuple[str, int | None, float]]) -> str:
    """The "last commands" report section: exec'd commands with their exit code
    and duration, spawned processes with their state now."""
    lines = []
    for entry in entries:
        cmd, rc, seconds = entry
        if isinstance(entry, ProcessEntry):
            p = entry.process
            try:
                state = (entry.final or "ended (no longer referenced)") if p is None else p.state()
            except BottleError as e:
                state = f"unknown ({type(e).__name__})"
            lines.append(f"[spawn] pid {entry.pid}, {state}  {cmd}")
        else:
            lines.append(f"[{'?' if rc is None else rc}] {seconds:.2f}s  {cmd}")
    return "\n".join(lines)
