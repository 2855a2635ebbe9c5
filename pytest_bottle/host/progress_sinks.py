"""Where progress lines go under pytest (wired by the plugin; no pytest here).

- ``TerminalSink``: a duplicate of the terminal's file descriptor, taken while
  pytest's capture is suspended, so lines written during a test's setup reach
  the terminal instead of the captured output.
- ``FileSink`` and ``Tail``: an xdist worker's output is not shown by the
  controller, so workers append events as JSON lines to a file in the run's
  private state directory, and a controller thread tails it onto its terminal.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from ..vmm.process import is_alive
from .progress import Event, Sink, format_event, with_origin

log = logging.getLogger(__name__)

TAIL_POLL = 0.5


class TerminalSink:
    """Writes formatted events to its own duplicate of ``fd``.

    ``before_line`` is called first and returns whether the terminal is in
    the middle of a line (pytest's progress dots), which is then ended."""

    def __init__(self, fd: int, before_line: Callable[[], bool] = lambda: False) -> None:
        self._fd = os.dup(fd)
        self._before = before_line
        self._lock = threading.Lock()

    def __call__(self, e: Event) -> None:
        self.write_line(format_event(e))

    def write_line(self, line: str) -> None:
        with self._lock:
            if self._fd < 0:
                return
            text = ("\n" if self._before() else "") + line + "\n"
            os.write(self._fd, text.encode(errors="replace"))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class FileSink:
    """An xdist worker's sink: one JSON line per event, appended (one write each)."""

    def __init__(self, path: Path, origin: str) -> None:
        # The controller made it (``progress_file``): nothing is created, and no link followed.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._origin = origin
        self._lock = threading.Lock()

    def __call__(self, e: Event) -> None:
        line = json.dumps(with_origin(e, self._origin).to_dict()) + "\n"
        with self._lock:  # never a closed (and maybe reused) descriptor
            if self._fd >= 0:
                os.write(self._fd, line.encode())

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def progress_file(state: Path) -> Path:
    """A new file for this run's workers to report into; files of dead runs go."""
    d = state / "progress"
    d.mkdir(mode=0o700, exist_ok=True)
    prune_dead(state)
    path = d / f"{os.getpid()}-{secrets.token_hex(4)}.jsonl"
    path.write_bytes(b"")
    path.chmod(0o600)
    return path


def prune_dead(state: Path) -> list[Path]:
    """Remove the progress files of controllers that are gone (a killed run's):
    the next xdist run or ``bottle sweep`` does it; returns what went."""
    gone = []
    for old in (state / "progress").glob("*.jsonl"):
        pid = old.name.split("-", 1)[0]
        if pid.isdigit() and not is_alive(int(pid), None):
            try:
                old.unlink(missing_ok=True)
            except OSError:  # not ours to remove: left, as any file we may not touch
                continue
            gone.append(old)
    return gone


class Tail:
    """The controller's thread that shows what its workers append to ``path``."""

    def __init__(self, path: Path, sink: Sink, poll: float = TAIL_POLL) -> None:
        self.path, self._sink, self._poll = path, sink, poll
        self._stop = threading.Event()
        self._file = open(path, "rb")  # held for the thread's life, closed in stop()
        self._partial = b""
        self._thread = threading.Thread(target=self._run, name="bottle-progress-tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            self.drain()

    def drain(self) -> None:
        data = self._partial + self._file.read()
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            try:
                self._sink(Event.from_dict(json.loads(raw)))
            except (ValueError, KeyError, TypeError, OSError) as e:
                log.debug("progress line not shown (%s): %r", e, raw[:200])

    def stop(self) -> None:
        """Show what is left, stop, and remove the file."""
        self._stop.set()
        self._thread.join(5)
        self.drain()
        self._file.close()
        self.path.unlink(missing_ok=True)
