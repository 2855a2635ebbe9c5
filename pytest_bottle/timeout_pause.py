"""pytest-timeout and first-use work: an image build, a seed or a wait for
another process's build, made while a test waits, is not counted against
that test's timeout.

pytest-timeout arms a timer per test through its public hooks
(``pytest_timeout_set_timer``/``pytest_timeout_cancel_timer``); this plugin
watches them to know the running test's timer, and the progress reporter's
work (``host.progress``: every build, seed and download runs in a task, and a
wait for a build lock is work too, shown or not) to know when first-use work
runs in the test's thread.  When that work begins, the timer is replaced by
one of an hour more than was left, so a build that hangs is still ended;
when it ends (the outermost of nested work), the timer runs on with what was
left.  Work in another thread (a pre-started spare's) does not pause it: the
signal method's timer can only be handled from the main thread.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from .host import progress

ALLOWANCE = 3600.0  # seconds the timer gets for first-use work (a step without a timeout of its own has as much)


class TimeoutPause:
    """Registered at configure (it does nothing unless pytest-timeout arms timers); watches the reporter."""

    def __init__(self, config: pytest.Config, reporter: progress.Reporter) -> None:
        self.config = config
        self.item: pytest.Item | None = None
        self.settings: Any = None  # pytest_timeout.Settings
        self.armed = (0.0, 0.0)  # when the running timer was armed, and for how long
        self.left: float | None = None  # seconds of the timer left while paused
        self.depth = 0
        self._ours = False  # the hook calls below are ours, not pytest-timeout's
        reporter.watchers.append(self.working)

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings: Any) -> None:
        if not self._ours:  # a test's timer: no work of the test before it can still be running
            self.item, self.settings, self.left, self.depth = item, settings, None, 0
        self.armed = (time.monotonic(), float(settings.timeout))

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_timeout_cancel_timer(self, item: pytest.Item) -> None:
        if not self._ours:
            self.item = self.settings = self.left = None

    def working(self, busy: bool) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if busy:
            self.depth += 1
            if self.depth == 1:
                self._pause()
        elif self.depth:
            self.depth -= 1
            if not self.depth:
                self._resume()

    def _pause(self) -> None:
        if self.item is None or self.left is not None:
            return
        since, length = self.armed
        left = max(0.0, length - (time.monotonic() - since))
        self._hook("pytest_timeout_cancel_timer", item=self.item)
        self._hook("pytest_timeout_set_timer", item=self.item, settings=self._lasting(left + ALLOWANCE))
        self.left = left

    def _resume(self) -> None:
        if self.item is None or self.left is None:
            return
        # At least a moment: a timer of 0 would be no timer at all.
        settings = self._lasting(max(self.left, 0.01))
        self.left = None
        self._hook("pytest_timeout_cancel_timer", item=self.item)
        self._hook("pytest_timeout_set_timer", item=self.item, settings=settings)

    def _lasting(self, seconds: float) -> Any:
        return self.settings._replace(timeout=seconds)

    def _hook(self, name: str, **kwargs: Any) -> None:
        self._ours = True
        try:
            getattr(self.config.hook, name)(**kwargs)
        finally:
            self._ours = False
