"""Progress of long first-use work (image builds, work seeds): what is being
made, why, and for how long, so that nobody watches a silent minute.

One reporter per process.  Work runs inside ``task(what, why)``: it reports a
start, each stage line it is given, a heartbeat with the elapsed time and the
latest stage whenever it has been quiet for ``interval`` seconds, and an end
with the duration.  Where the lines go is the sink's business: stderr by
default (library use, the CLI), the terminal under pytest, a file that the
xdist controller tails under a worker.  No pytest here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from ..terminal_text import printable

log = logging.getLogger(__name__)

Kind = Literal["start", "stage", "heartbeat", "end", "failed", "interrupted"]

# Seconds of quiet after which a running task says it is still running.
INTERVAL_ENV = "BOTTLE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 15.0
PREFIX = "pytest-bottle"


def default_interval() -> float:
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_INTERVAL
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:  # a typo must not make a long build silent
        if value not in _warned:  # once: each reporter (one per process, and the CLI's) reads it
            _warned.add(value)
            log.warning("%s=%r is not a positive number of seconds: using %g", INTERVAL_ENV, value, DEFAULT_INTERVAL)
        return DEFAULT_INTERVAL
    return max(0.1, seconds)


_warned: set[str] = set()


@dataclass(frozen=True)
class Event:
    """One line's worth of progress; plain values, so it crosses processes as JSON."""

    kind: Kind
    what: str  # "building image debian-bookworm (key 1a2b3c4d)"
    why: str  # "not cached yet"
    elapsed: float
    stage: str = ""  # the latest stage line, if any
    origin: str = ""  # the xdist worker that reported it, if not this process

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(
            d["kind"], str(d["what"]), str(d["why"]), float(d["elapsed"]), str(d["stage"]), str(d.get("origin", ""))
        )


def format_event(e: Event) -> str:
    """The line shown for ``e``: ``pytest-bottle [  12s] building image X: ...``."""
    origin = f"[{e.origin}] " if e.origin else ""
    return f"{origin}{PREFIX} [{e.elapsed:4.0f}s] {_body(e)}"


def _body(e: Event) -> str:
    if e.kind == "start":
        return f"{e.what}: {e.why}" if e.why else e.what
    if e.kind == "stage":
        return f"{e.what}: {e.stage}"
    if e.kind == "heartbeat":
        return f"{e.what}: still running" + (f" ({e.stage})" if e.stage else "")
    if e.kind == "end":
        return f"{e.what}: done in {e.elapsed:.1f}s"
    ended = "interrupted" if e.kind == "interrupted" else "failed"
    return f"{e.what}: {ended} after {e.elapsed:.1f}s" + (f" ({e.stage})" if e.stage else "")


Sink = Callable[[Event], None]


def stderr_sink(e: Event) -> None:
    """The default: one line on stderr (library use, ``bottle run``)."""
    print(format_event(e), file=sys.stderr, flush=True)


def cli_sink(e: Event) -> None:
    """The ``bottle`` command's: on stdout in the form of the image builder's
    stage lines there, ``[  12.3s] ...``."""
    print(f"[{e.elapsed:6.1f}s] {_body(e)}", file=sys.stdout, flush=True)


class Task:
    """One piece of long work in progress (made by ``Reporter.task``)."""

    def __init__(self, reporter: Reporter, what: str, why: str, started: float) -> None:
        self._reporter = reporter
        self.what, self.why, self.started = what, why, started
        self.last_stage = ""
        self.last_shown = started

    def stage(self, line: str, *, show: bool = True) -> None:
        """A new stage of the work (``Callable[[str], None]``: one line per step).
        ``show=False`` only remembers it for the heartbeats (the caller shows it)."""
        line = printable(line.strip())  # a derived build's step output is the guest's
        if not line:
            return
        self.last_stage = line
        if show and self._reporter.stages:
            self._reporter.emit(self, "stage")

    def relay(self, also: Callable[[str, float], None] | None = None) -> Callable[[str, float], None]:
        """A ``(stage, elapsed)`` callback (the image builder's) feeding this task;
        ``also`` still gets every stage, and then shows it itself."""

        def relay(line: str, elapsed: float) -> None:
            self.stage(line, show=also is None)
            if also is not None:
                also(printable(line), elapsed)

        return relay

    def event(self, kind: Kind, now: float) -> Event:
        return Event(kind, self.what, self.why, now - self.started, self.last_stage)


class Reporter:
    """Sends the tasks' events to a sink and keeps the heartbeats going.

    ``stages=False`` (``pytest -q``) shows start, heartbeats and end only.
    ``clock`` is injectable so the heartbeat logic is testable without waiting.
    """

    def __init__(
        self,
        sink: Sink = stderr_sink,
        *,
        interval: float | None = None,
        stages: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink, self.stages, self.clock = sink, stages, clock
        self.interval = default_interval() if interval is None else interval
        self._tasks: list[Task] = []
        # Told True and False, in the working thread, as its first-use work begins
        # and ends (tasks, and waits that show nothing): pytest-timeout's pause.
        self.watchers: list[Callable[[bool], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def work(self) -> Iterator[None]:
        """First-use work in this thread, shown or not (a wait on a sibling worker's build)."""
        self._tell(True)
        try:
            yield
        finally:
            self._tell(False)

    def _tell(self, busy: bool) -> None:
        for watcher in list(self.watchers):
            try:
                watcher(busy)
            except Exception as e:  # as a sink's: never the work's failure
                log.debug("progress watcher failed: %s", e)

    @contextmanager
    def task(self, what: str, why: str = "") -> Iterator[Task]:
        """Report ``what`` (and ``why``) from start to end, heartbeats between."""
        with self.work():
            t = Task(self, what, why, self.clock())
            with self._lock:
                self._tasks.append(t)
            try:  # the start's sink may be interrupted too: the task goes all the same
                self.emit(t, "start")
                self._ensure_thread()
                yield t
            except KeyboardInterrupt:  # Ctrl-C: the work did not fail, it was stopped
                self._finish(t, "interrupted")
                raise
            except BaseException:
                self._finish(t, "failed")
                raise
            self._finish(t, "end")

    def _finish(self, t: Task, kind: Kind) -> None:
        with self._lock:
            self._tasks.remove(t)
        self.emit(t, kind)

    def emit(self, t: Task, kind: Kind) -> None:
        now = self.clock()
        t.last_shown = now
        try:
            self.sink(t.event(kind, now))
        except Exception as e:  # progress must never break the work it reports
            log.debug("progress sink failed: %s", e)

    def tick(self) -> None:
        """Heartbeat every task that has been quiet for ``interval`` seconds."""
        now = self.clock()
        with self._lock:
            due = [t for t in self._tasks if now - t.last_shown >= self.interval]
        for t in due:
            self.emit(t, "heartbeat")

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._beat, name="bottle-progress", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        step = min(1.0, self.interval / 4)
        while not self._wake.wait(step):
            self.tick()
            with self._lock:
                if not self._tasks:
                    self._thread = None
                    return

    def close(self) -> None:
        """Stop the heartbeat thread (a replaced reporter)."""
        self._wake.set()


_current = Reporter()


def install(reporter: Reporter) -> Reporter:
    """Make ``reporter`` the process's; returns the one it replaces (to restore)."""
    global _current
    previous, _current = _current, reporter
    return previous


def current() -> Reporter:
    return _current


def work() -> contextlib.AbstractContextManager[None]:
    """``Reporter.work`` of the process's reporter."""
    return _current.work()


@contextmanager
def task(what: str, why: str = "") -> Iterator[Task]:
    """``with task("building image X", why="not cached yet") as t: ... t.stage(line)``."""
    with _current.task(what, why) as t:
        yield t


def with_origin(e: Event, origin: str) -> Event:
    return replace(e, origin=origin)
