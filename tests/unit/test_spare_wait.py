"""A test's wait for a pre-started spare that is interrupted (a test timeout,
Ctrl-C) does not lose the spare: it is closed once it is ready (the
manager's bookkeeping; the bottle is a stand-in)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from types import FrameType

import pytest

from pytest_bottle.lifecycle.manager import BottleManager
from pytest_bottle.snapshot import close_snapshot_scope
from pytest_bottle.spec import resolve


class Interrupted(BaseException):
    """What pytest-timeout's signal method raises: not an ``Exception``."""


class Spare:
    def __init__(self) -> None:
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


@pytest.fixture
def manager() -> Iterator[BottleManager]:
    m = BottleManager(prestart=1)
    yield m
    close_snapshot_scope(m.snapshots)


def test_an_interrupted_wait_for_a_spare_closes_the_spare_when_it_is_ready(manager: BottleManager) -> None:
    spec = resolve([])
    pending: Future[Spare] = Future()
    manager._spares.append((spec, pending))  # type: ignore[arg-type]  # a spare still starting

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            manager._take_spare(spec)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not manager._spares  # taken: no one else will close it
    spare = Spare()
    pending.set_result(spare)  # it finishes starting after the test gave up on it
    assert spare.closed.wait(5), "the spare of an interrupted wait was left running"


def test_spares_not_started_yet_are_cancelled_not_booted_to_be_closed(manager: BottleManager) -> None:
    # A spec change, and the session's end: queued spares were booted one by one only to be closed.
    old, new = resolve([("marker", {"memory": "1G"})]), resolve([])
    started: Future[Spare] = Future()
    started.set_running_or_notify_cancel()  # booting now: closed when it is ready
    queued: Future[Spare] = Future()  # behind it
    manager._spares.extend([(old, started), (old, queued)])  # type: ignore[list-item]
    assert manager._take_spare(new) is None
    assert queued.cancelled() and not started.cancelled()
    spare = Spare()
    started.set_result(spare)
    assert spare.closed.is_set()
    later: Future[Spare] = Future()
    manager._spares.append((new, later))  # type: ignore[arg-type]
    manager.close_all()
    assert later.cancelled()
