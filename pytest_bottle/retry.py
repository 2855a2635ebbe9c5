"""Polling with backoff, for the ``wait_*`` helpers."""

from __future__ import annotations

import time
from collections.abc import Callable

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
