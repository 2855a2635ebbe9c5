"""The ``wait_*`` helpers' polling: backoff, and a deadline that is kept."""

from __future__ import annotations

import itertools
import time

import pytest

from pytest_bottle import retry
from pytest_bottle.errors import WaitTimeout
from pytest_bottle.results import ExecResult
from pytest_bottle.retry import poll


def test_it_returns_at_the_first_success_with_a_growing_backoff() -> None:
    calls: list[float] = []

    def attempt() -> bool:
        calls.append(time.monotonic())
        return len(calls) == 5

    assert poll(attempt, 30)
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(calls) == 5 and all(gap >= least for gap, least in zip(gaps, [0.05, 0.1, 0.2, 0.4], strict=True)), gaps


class _Clock:
    """The module's ``time`` with a clock that moves only by its sleeps: the
    attempts' times are exact, whatever else the host is doing."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, seconds
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("timeout", [0.3, 2.6])  # 2.6: 1 s past it before (a full backoff)
def test_the_last_attempt_is_at_the_deadline_not_a_backoff_past_it(
    timeout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(retry, "time", clock)
    calls: list[float] = []

    def attempt() -> bool:
        calls.append(clock.now - 100.0)
        return False

    assert not poll(attempt, timeout)
    assert calls[-1] == pytest.approx(timeout) and clock.now - 100.0 == pytest.approx(timeout), calls
    full = list(itertools.takewhile(lambda s: s < timeout, itertools.accumulate([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])))
    assert calls[:-1] == pytest.approx([0.0, *full]), calls  # the backoff, then the cut last wait


def test_its_exceptions_propagate() -> None:
    def attempt() -> bool:
        raise KeyError("x")

    with pytest.raises(KeyError):
        poll(attempt, 5)


def test_a_try_that_said_nothing_is_named_without_an_empty_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "time", _Clock())
    silent = ExecResult(["false"], 1)
    with pytest.raises(WaitTimeout) as info:
        retry.until_succeeds(lambda left: silent, 1.0, "'false' succeeding")
    assert info.value.last == "exit 1, no output", info.value
    said = ExecResult(["x"], 2, b"out\n", b"why\n")
    with pytest.raises(WaitTimeout, match=r"last attempt: exit 2: why$"):
        retry.until_succeeds(lambda left: said, 1.0, "'x' succeeding")
    blank = ExecResult(["x"], 2, b"out\n", b"  \n")  # stderr of blanks only: stdout says more
    with pytest.raises(WaitTimeout, match=r"last attempt: exit 2: out$"):
        retry.until_succeeds(lambda left: blank, 1.0, "'x' succeeding")
