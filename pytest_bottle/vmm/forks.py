"""What a forked child (multiprocessing) must do for itself: it has none of
its parent's threads, so work queued on the parent's pool would wait for ever,
and multiprocessing ends it with ``os._exit``, so ``atexit`` never runs there."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_pools: weakref.WeakSet[ForkSafePool] = weakref.WeakSet()
_exits: list[tuple[int, Callable[[], None]]] = []


class ForkSafePool:
    """A ``ThreadPoolExecutor`` made at the first ``submit`` (again in a forked child)."""

    def __init__(self, workers: int, prefix: str) -> None:
        self._workers, self._prefix = workers, prefix
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        _pools.add(self)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=self._prefix)
            return self._pool.submit(fn, *args, **kwargs)

    def _forked(self) -> None:
        # A lock another thread held at the fork stays held in the child: a new one.
        self._lock, self._pool = threading.Lock(), None


def at_exit(fn: Callable[[], None], priority: int) -> None:
    """``fn`` (idempotent) at this process's exit, and at a multiprocessing
    child's, through multiprocessing's own finalizers (higher ``priority``
    first; ``atexit`` runs the last registered first)."""
    atexit.register(fn)
    _exits.append((priority, fn))


class _Anchor:
    """What multiprocessing's after-fork registry holds (weakly) for us."""


_anchor = _Anchor()


def _finalizers(_: object) -> None:
    mp = sys.modules["multiprocessing.util"]
    for priority, fn in _exits:
        mp.Finalize(None, fn, exitpriority=priority)


def _forked() -> None:
    for pool in list(_pools):
        pool._forked()
    mp = sys.modules.get("multiprocessing.util")  # imported by the parent of any multiprocessing child
    if mp is not None:  # its child clears the finalizers made before its after-fork calls: made in one
        mp.register_after_fork(_anchor, _finalizers)


os.register_at_fork(after_in_child=_forked)
