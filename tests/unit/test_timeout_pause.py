"""The pytest-timeout bookkeeping of first-use work (pure: hooks and clock faked)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pytest_timeout import Settings  # type: ignore[import-untyped]

from pytest_bottle import timeout_pause
from pytest_bottle.host.progress import Event, Kind, Reporter
from pytest_bottle.timeout_pause import ALLOWANCE, TimeoutPause


class Timeouts:
    """pytest-timeout's two hooks as pluggy calls them: ours first, then its own (which records)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None]] = []
        self.pause: TimeoutPause | None = None

    def pytest_timeout_set_timer(self, item: object, settings: Any) -> None:
        assert self.pause is not None
        self.pause.pytest_timeout_set_timer(cast(pytest.Item, item), settings)
        self.calls.append(("set", settings.timeout))

    def pytest_timeout_cancel_timer(self, item: object) -> None:
        assert self.pause is not None
        self.pause.pytest_timeout_cancel_timer(cast(pytest.Item, item))
        self.calls.append(("cancel", None))


def _event(kind: Kind, origin: str = "") -> Event:
    return Event(kind, "building image x", "", 0.0, origin=origin)


def test_first_use_work_stops_the_timer_and_it_goes_on_with_what_was_left(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(timeout_pause, "time", SimpleNamespace(monotonic=lambda: now[0]))
    hooks, seen = Timeouts(), list[Event]()
    reporter = Reporter(seen.append)
    pause = hooks.pause = TimeoutPause(cast(pytest.Config, SimpleNamespace(hook=hooks)), reporter)
    sink = reporter.sink
    item = object()

    def at(t: float, kind: Kind, origin: str = "") -> None:
        now[0] = t
        sink(_event(kind, origin))

    hooks.pytest_timeout_set_timer(item, Settings(10.0, "signal", False, False))  # pytest-timeout arms it
    at(3, "start")  # 7 s left: stopped, with an hour for the work
    at(4, "start")  # nested (a lock wait in a build): nothing more
    at(50, "end")
    at(60, "end")  # the last one: 7 s again
    at(62, "start")  # 5 s left
    at(62.5, "start", origin="gw1")  # a worker's line on the controller: not this thread's work
    at(70, "failed")
    assert hooks.calls == [
        ("set", 10.0),
        ("cancel", None),
        ("set", 7 + ALLOWANCE),
        ("cancel", None),
        ("set", 7.0),
        ("cancel", None),
        ("set", 5 + ALLOWANCE),
        ("cancel", None),
        ("set", 5.0),
    ]
    assert len(seen) == 7  # every event reaches the terminal all the same
    hooks.pytest_timeout_cancel_timer(item)  # the test ended
    del hooks.calls[:]
    at(80, "start")  # work between tests (a spare's, say): no timer to stop
    at(90, "end")
    assert hooks.calls == [] and pause.item is None


def test_work_in_another_thread_leaves_the_timer_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = Timeouts()
    reporter = Reporter(lambda e: None)
    hooks.pause = TimeoutPause(cast(pytest.Config, SimpleNamespace(hook=hooks)), reporter)
    hooks.pytest_timeout_set_timer(object(), Settings(10.0, "signal", False, False))
    sink = reporter.sink
    spare = threading.Thread(target=lambda: (sink(_event("start")), sink(_event("end"))))
    spare.start()
    spare.join()
    assert hooks.calls == [("set", 10.0)]
