"""The ``wait_*`` helpers' polling: backoff, and a deadline that is kept."""

from __future__ import annotations

import itertools
import time

import pytest

from pytest_bottle.retry import poll


def test_it_returns_at_the_first_success_with_a_growing_backoff() -> None:
    calls: list[float] = []

    def attempt() -> bool:
        calls.append(time.monotonic())
        return len(calls) == 5

    assert poll(attempt, 30)
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(calls) == 5 and all(gap >= least for gap, least in zip(gaps, [0.05, 0.1, 0.2, 0.4], strict=True)), gaps


@pytest.mark.parametrize("timeout", [0.3, 2.6])  # 2.6: 1 s past it before (a full backoff)
def test_the_last_attempt_is_at_the_deadline_not_a_backoff_past_it(timeout: float) -> None:
    calls: list[float] = []
    started = time.monotonic()

    def attempt() -> bool:
        calls.append(time.monotonic() - started)
        return False

    assert not poll(attempt, timeout)
    took = time.monotonic() - started
    assert timeout <= calls[-1] < timeout + 0.25 and took < timeout + 0.25, (calls, took)


def test_its_exceptions_propagate() -> None:
    def attempt() -> bool:
        raise KeyError("x")

    with pytest.raises(KeyError):
        poll(attempt, 5)
