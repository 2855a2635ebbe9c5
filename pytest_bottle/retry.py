"""Polling with backoff, for the ``wait_*`` helpers."""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import ExecTimeout, WaitTimeout
from .results import ExecResult

FIRST_WAIT = 0.05
MAX_WAIT = 1.0


def poll(attempt: Callable[[], bool], timeout: float) -> bool:
    """Call ``attempt`` until it returns True (backoff from 50 ms up to 1 s);
    False once ``timeout`` seconds have passed.  The last wait is cut short so
    that the last attempt starts at the deadline, not up to a backoff after
    it.  Its exceptions propagate."""
    deadline = time.monotonic() + timeout
    wait = FIRST_WAIT
    while not attempt():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(wait, left))
        wait = min(2 * wait, MAX_WAIT)
    return True


def until_succeeds(run: Callable[[float], ExecResult], timeout: float, what: str) -> ExecResult:
    """``run(limit)`` (a command given ``limit`` seconds) until it exits 0;
    ``WaitTimeout`` naming the last try after ``timeout`` s.  A hanging try must
    not outlive the wait itself: each gets what is left (0.5 s at least)."""
    last: list[ExecResult | ExecTimeout] = []
    deadline = time.monotonic() + timeout

    def attempt() -> bool:
        try:
            r = run(max(0.5, deadline - time.monotonic()))
        except ExecTimeout as e:
            last[:] = [e]
            return False
        last[:] = [r]
        return r.ok

    if poll(attempt, timeout):
        assert isinstance(last[0], ExecResult)
        return last[0]
    detail, tried = "", last[0] if last else None
    if isinstance(tried, ExecTimeout):
        detail = f"the last try was still running after {tried.timeout:.1f} s (killed)"
    elif tried is not None:
        said = (tried.stderr.strip() or tried.stdout.strip())[-300:]
        detail = f"exit {tried.returncode}: {said}" if said else f"exit {tried.returncode}, no output"
    raise WaitTimeout(what, timeout, detail)
