"""pytest glue for progress (``host.progress``): shows image builds and seed
creation on the terminal while the first test waits, under xdist too.

Plain pytest: lines go to a duplicate of the terminal's descriptor, so the
capture of the waiting test does not swallow them.  xdist: the controller
does not collect, so it cannot know whether a run needs a VM at all; instead
every worker reports into a file in the run's private state directory and
the controller tails it.  That covers any image a worker needs (markers,
derived images), not only the default one.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from .errors import BottleError
from .host import progress
from .host.paths import state_dir
from .host.progress_sinks import FileSink, Tail, TerminalSink, progress_file

log = logging.getLogger(__name__)

WORKER_KEY = "bottle_progress"


class LiveProgress:
    """Installed by the plugin at configure: the process's progress reporter and its sinks."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.terminal: TerminalSink | None = None
        self.file: FileSink | None = None
        self.tail: Tail | None = None
        self._width_after = 0
        worker = getattr(config, "workerinput", None)
        sink: progress.Sink = progress.stderr_sink
        if worker is not None:
            try:  # a worker on another host cannot reach the controller's file: stderr then
                # Only a file in this host's own progress directory: on another
                # host the same path may be a place someone else prepared.
                if (given := worker.get(WORKER_KEY)) and Path(given).parent == state_dir() / "progress":
                    sink = self.file = FileSink(Path(given), str(worker.get("workerid", "worker")))
            except (OSError, BottleError):  # no such file here, or no usable state dir
                pass
        else:
            try:  # capture is suspended during configure: this is the terminal
                self.terminal = TerminalSink(sys.stdout.fileno(), self._end_open_line)
                sink = self.terminal
            except (AttributeError, ValueError, OSError):  # no real stdout (in-process runs)
                pass
        # -q hides stage lines; start, heartbeats and end always show.
        reporter = progress.Reporter(sink, stages=config.get_verbosity() >= 0)
        self.previous = progress.install(reporter)
        self.reporter = reporter

    def _end_open_line(self) -> bool:
        """Whether pytest's terminal is mid-line (a path and its dots, xdist's
        dots): our line then starts on a new one."""
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is None:
            return False
        # The reporter does not see our lines: it still counts the width of
        # the line it left, which tells whether it wrote since our last one.
        width = int(getattr(getattr(tr, "_tw", None), "width_of_current_line", 0))
        open_line = getattr(tr, "currentfspath", None) is not None or width not in (0, self._width_after)
        tr.currentfspath = None  # its next word goes on a new line, under its path again
        self._width_after = width
        return open_line

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist controller: hand each worker the file it reports into, tailed here."""
        if self.terminal is None:
            return
        if self.tail is None:
            try:
                self.tail = Tail(progress_file(state_dir()), self.terminal)
            except (BottleError, OSError) as e:
                log.warning("pytest-bottle: no progress from xdist workers: %s", e)
                return
        node.workerinput[WORKER_KEY] = str(self.tail.path)

    def close(self) -> None:
        progress.install(self.previous)
        self.reporter.close()
        if self.tail is not None:
            self.tail.stop()
        for sink in (self.terminal, self.file):
            if sink is not None:
                sink.close()
