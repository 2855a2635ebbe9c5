"""Polling with backoff, for the ``wait_*`` helpers."""

from __future__ import annotations

from collections.abc import Callable

from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_exponential


def poll(attempt: Callable[[], bool], timeout: float) -> bool:
    """Call ``attempt`` until it returns True (backoff from 50 ms up to 1 s);
    False once ``timeout`` seconds have passed.  Its exceptions propagate."""
    try:
        for a in Retrying(
            retry=retry_if_result(lambda ok: not ok),
            stop=stop_after_delay(timeout),
            wait=wait_exponential(multiplier=0.05, max=1.0),
        ):
            with a:
                ok = attempt()
            if a.retry_state.outcome is not None and not a.retry_state.outcome.failed:
                a.retry_state.set_result(ok)
    except RetryError:
        return False
    return True
