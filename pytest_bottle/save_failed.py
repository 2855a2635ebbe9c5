"""pytest glue for ``--bottle-save-failed``: a failed test's bottles saved as
kept snapshots, and the list of them with how to open each (xdist ships the
lines from workers in ``report.user_properties``, as ``--bottle-keep`` does)."""

from __future__ import annotations

import logging
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from .bottle import Bottle
from .host.paths import default_cache_dir, tree_size
from .lifecycle.manager import BottleManager
from .snapshot import Snapshot

log = logging.getLogger(__name__)

PROPERTY = "bottle_saved"


class SaveFailed:
    def __init__(self, manager: BottleManager) -> None:
        self.manager = manager
        self.saved: list[str] = []

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.failed and report.when in ("setup", "call"):
            for b in _bottles(item, self.manager):
                report.user_properties.append((PROPERTY, _save(b, item.nodeid)))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in report.user_properties:
            if key == PROPERTY and str(value) not in self.saved:
                self.saved.append(str(value))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.saved:
            terminalreporter.section("bottles saved as snapshots (--bottle-save-failed)")
            for text in self.saved:
                terminalreporter.write_line(text)


def _bottles(item: pytest.Item, manager: BottleManager) -> list[Bottle]:
    """The test's bottles still running: its fixtures' and its factories'."""
    found: dict[int, Bottle] = {id(b): b for b in manager.bottles(item.nodeid)}
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Bottle):
            found[id(value)] = value
    return [b for b in found.values() if b.alive()]


def _save(b: Bottle, nodeid: str) -> str:
    try:
        snap = b._snapshot(saved_for=nodeid)
    except Exception as e:  # the report must go on: say why this one was not saved
        log.warning("--bottle-save-failed: %s", e)
        return f"{b.name} ({nodeid}): not saved: {e}"
    return saved_message(snap, nodeid)


def saved_message(snap: Snapshot, nodeid: str) -> str:
    cache = snap.spec.cache_dir
    opt = "" if cache == default_cache_dir().absolute() else f" --cache-dir {cache}"
    return "\n".join(
        [
            f"{snap.name}: bottle {snap.source} of {nodeid} ({tree_size(Path(snap.path)) / 1e6:.0f} MB)",
            f"  run a command:  bottle{opt} run --snapshot {snap.name} -- CMD",
            f"  open a shell:   bottle{opt} shell {snap.name}",
            f"  remove it:      bottle{opt} snapshot rm {snap.name}",
        ]
    )
