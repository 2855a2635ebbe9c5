"""The pytest-timeout bookkeeping of first-use work (pure: hooks and clock faked)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pytest_timeout import Settings  # type: ignore[import-untyped]

from pytest_bottle import timeout_pause
from pytest_bottle.host.progress import Reporter
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


def test_first_use_work_stops_the_timer_and_it_goes_on_with_what_was_left(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(timeout_pause, "time", SimpleNamespace(monotonic=lambda: now[0]))
    hooks = Timeouts()
    reporter = Reporter(lambda e: None)
    pause = hooks.pause = TimeoutPause(cast(pytest.Config, SimpleNamespace(hook=hooks)), reporter)
    item = object()

    def at(t: float, busy: bool) -> None:
        now[0] = t
        reporter._tell(busy)

    hooks.pytest_timeout_set_timer(item, Settings(10.0, "signal", False, False))  # pytest-timeout arms it
    at(3, True)  # 7 s left: stopped, with an hour for the work
    at(4, True)  # nested (a task in a lock wait): nothing more
    at(50, False)
    at(60, False)  # the last one: 7 s again
    at(62, True)  # 5 s left
    at(70, False)
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
    hooks.pytest_timeout_cancel_timer(item)  # the test ended
    del hooks.calls[:]
    at(80, True)  # work between tests: no timer to stop
    at(90, False)
    assert hooks.calls == [] and pause.item is None
    at(95, True)  # work a test left unfinished (interrupted in its start): the next test starts afresh
    hooks.pytest_timeout_set_timer(item, Settings(10.0, "signal", False, False))
    at(96, True)
    assert hooks.calls[-2:] == [("cancel", None), ("set", 9 + ALLOWANCE)]


def test_work_in_another_thread_leaves_the_timer_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = Timeouts()
    reporter = Reporter(lambda e: None)
    hooks.pause = TimeoutPause(cast(pytest.Config, SimpleNamespace(hook=hooks)), reporter)
    hooks.pytest_timeout_set_timer(object(), Settings(10.0, "signal", False, False))

    def spare_work() -> None:
        with reporter.work():
            pass

    spare = threading.Thread(target=spare_work)
    spare.start()
    spare.join()
    assert hooks.calls == [("set", 10.0)]
