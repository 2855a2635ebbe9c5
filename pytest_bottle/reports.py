"""pytest glue for reports: a failed test's bottle sections, tracebacks of
pytest-bottle's errors without its own frames, and the list of bottles kept by
``--bottle-keep`` (registered by ``plugin.pytest_configure``)."""

from __future__ import annotations

import os
from collections.abc import Generator
from types import TracebackType
from typing import Any

import pytest

from .bottle import Bottle
from .errors import BottleError
from .history import describe_history
from .lifecycle.boot import RESTORED
from .lifecycle.manager import BottleManager
from .terminal_text import printable

CONSOLE_LINES = 50
SEED_LINES = 5  # of the seed's boot, before a restored bottle's own lines
LINE_CAP = 2000  # characters of one console line in a report
REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
# The test's own bottles, put here as their group closes: a teardown report comes after that.
CLOSED = pytest.StashKey[list[Bottle]]()
PACKAGE = os.path.dirname(os.path.realpath(__file__))
FIXTURES = os.path.join(PACKAGE, "plugin.py")


def failed(item: pytest.Item) -> bool:
    """Whether any phase of ``item`` reported so far has failed."""
    return any(r.failed for r in item.stash.get(REPORTS, {}).values())


class BottleReports:
    """Adds a failed test's console tail and last commands, per bottle, and
    lists the bottles kept running (xdist ships them from workers)."""

    def __init__(self, manager: BottleManager, keep: bool) -> None:
        self.manager = manager
        self.keep = keep
        self.kept: list[str] = []
        self.not_kept: list[str] = []
        self.running: str | None = None  # the test whose protocol runs now
        self.made: dict[str, list[Bottle]] = {}  # bottles of longer-lived groups, by the test that made them

    def made_now(self, bottle: Bottle) -> None:
        """``bottle`` (of a session factory) was made by the running test: its report shows it."""
        if self.running is not None:
            self.made.setdefault(self.running, []).append(bottle)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        self.running = item.nodeid
        try:
            return (yield)
        finally:
            self.running = None
            self.made.pop(item.nodeid, None)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        whole = item.config.getoption("fulltrace", False) or item.config.getoption("tbstyle", "auto") == "native"
        if call.excinfo is not None and not whole:
            _hide_own_frames(call.excinfo)
        report = yield
        if report.when == "setup":  # a new run of the test (pytest-rerunfailures runs one again)
            item.stash[REPORTS] = {}
        first_failure = report.failed and not failed(item)  # a teardown's after a failed call: shown once
        item.stash.setdefault(REPORTS, {})[report.when] = report
        if first_failure:
            for b in self.item_bottles(item):
                tail = printable("\n".join(_capped(line) for line in console_tail(b))) or "(empty)"
                report.sections.append((f"bottle {b.name} console (last {CONSOLE_LINES} lines)", tail))
                cmds = describe_history(list(b.history))  # a copy: commands may run on meanwhile
                report.sections.append((f"bottle {b.name} last commands", printable(cmds) or "(none)"))
        if report.when == "teardown" and CLOSED in item.stash:  # items live all session: their consoles need not
            del item.stash[CLOSED]
        return report

    def item_bottles(self, item: pytest.Item) -> list[Bottle]:
        found: dict[int, Bottle] = {}
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Bottle):
                found[id(value)] = value
        for b in [*self.manager.bottles(item.nodeid), *item.stash.get(CLOSED, []), *self.made.get(item.nodeid, [])]:
            found[id(b)] = b
        return list(found.values())

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in report.user_properties:
            lines = {"bottle_kept": self.kept, "bottle_not_kept": self.not_kept}.get(key)
            if lines is not None and str(value) not in lines:
                lines.append(str(value))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for title, lines in (
            ("bottles kept running (--bottle-keep)", self.kept),
            ("bottles not kept (--bottle-keep): they had stopped", self.not_kept),
        ):
            if lines:
                terminalreporter.section(title)
                for text in lines:
                    terminalreporter.write_line(text)


def _hide_own_frames(excinfo: pytest.ExceptionInfo[BaseException]) -> None:
    """A ``BottleError`` says what went wrong in its message: its report shows
    the test's (or fixture's) line that raised it, not the plugin's code under
    it (a boot timeout's was 60 lines of it).  Any other exception keeps every
    frame (it may be our bug), and so does every one with ``--full-trace`` or
    ``--tb=native`` (Python's own traceback, whole)."""
    if not excinfo.errisinstance(BottleError):
        return
    frames: list[TracebackType] = []
    tb: TracebackType | None = excinfo.tb
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    kept: list[TracebackType] = []
    caller = ""  # the module of the frame before
    for tb in frames:
        path = os.path.realpath(tb.tb_frame.f_code.co_filename)
        # A fixture's frame stays when pytest called it; a factory's called by a test or fixture does not.
        if not path.startswith(PACKAGE + os.sep) or (path == FIXTURES and caller.startswith(("_pytest.", "pluggy."))):
            kept.append(tb)
        caller = str(tb.tb_frame.f_globals.get("__name__", ""))
    if not kept or len(kept) == len(frames):  # (nothing outside the package: keep what there is)
        return
    # pytest walks the raw chain from the test's frame on (Traceback.cut), so
    # the chain itself is made anew: the exception's own __traceback__ is untouched.
    *above, last = kept
    chain = TracebackType(None, last.tb_frame, last.tb_lasti, last.tb_lineno)
    for tb in reversed(above):
        chain = TracebackType(chain, tb.tb_frame, tb.tb_lasti, tb.tb_lineno)
    excinfo.traceback = pytest.ExceptionInfo.from_exc_info((excinfo.type, excinfo.value, chain)).traceback


def console_tail(b: Bottle) -> list[str]:
    """The console's last ``CONSOLE_LINES`` lines; of a restored bottle that
    printed fewer since its restore, those and only ``SEED_LINES`` of the boot
    its seed (or snapshot) made long before, which would fill the section."""
    lines = b.console_log.splitlines()
    tail = lines[-CONSOLE_LINES:]
    marker = RESTORED.format(name=b.name, source="\0").partition("\0")[0]
    for i in range(len(lines) - 1, max(len(lines) - CONSOLE_LINES, 0) - 1, -1):
        if lines[i].startswith(marker):  # at most CONSOLE_LINES in all, as the title says
            first = max(i - SEED_LINES, len(lines) - CONSOLE_LINES, 0)
            note = [f"[pytest-bottle: {first} earlier lines, from before the restore, not shown]"] if first else []
            return note + lines[first:]
    return tail


def _capped(line: str) -> str:
    """A console line cut to ``LINE_CAP`` characters: a guest may print one without end."""
    return line if len(line) <= LINE_CAP else f"{line[:LINE_CAP]} [... {len(line) - LINE_CAP} more characters]"


def keep_message(b: Bottle, test: str = "") -> str:
    """What ``--bottle-keep``'s summary says of ``b``, made by ``test`` (a node id)."""
    if not b.kept:
        report = f"the report of {test}" if test else "the test's report"
        return f"{b.name}: not kept: it had stopped before the test ended (its console is in {report})"
    lines = [f"{b.name}: QEMU pid {b.pid}, console log {b.console_log_path}"]
    if test:  # under xdist several failing tests' bottles are listed together
        lines.append(f"  kept for:  {test}")
    try:
        lines.append(f"  reach it:  ssh -F {b.ssh_config} {b.name}")
    except Exception as e:
        lines.append(f"  (no SSH: {e}; read its console log)")
    if b.agent_socket is not None:  # exposing its agent at keep time may have failed
        lines.append(f"  a shell:   bottle shell {b.name}")
    lines.append(f"  stop it:   bottle stop {b.name}")
    return "\n".join(lines)
