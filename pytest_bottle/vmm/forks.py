"""What a forked child (multiprocessing) must do for itself: it has none of
its parent's threads, so work queued on the parent's pool would wait for ever,
and multiprocessing ends it with ``os._exit``, so ``atexit`` never runs there."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

_pools: weakref.WeakSet[ForkSafePool] = weakref.WeakSet()
_locks: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()
_exits: list[tuple[int, Callable[[], None]]] = []


class ForkSafePool:
    """A ``ThreadPoolExecutor`` made at the first ``submit`` (again in a forked child)."""

    def __init__(self, workers: int, prefix: str) -> None:
        self._workers, self._prefix = workers, prefix
        self._lock = ForkSafeLock()
        self._pool: ThreadPoolExecutor | None = None
        _pools.add(self)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=self._prefix)
            return self._pool.submit(fn, *args, **kwargs)

    def _forked(self) -> None:
        self._pool = None


class ForkSafeLock:
    """A ``threading.Lock`` that a forked child gets anew, unheld: one another
    thread held at the fork would stay held there for ever."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _locks.add(self)

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def _forked(self) -> None:
        self._lock = threading.Lock()


def at_exit(fn: Callable[[], None], priority: int) -> None:
    """``fn`` (idempotent) at this process's exit, higher ``priority`` first,
    and so at a multiprocessing child's, through multiprocessing's own
    finalizers.  One ``atexit`` handler, registered by the first call: it
    runs before those registered earlier (qmp's, which closing needs)."""
    if not _exits:
        atexit.register(_run_exits)
    _exits.append((priority, fn))


def _run_exits() -> None:
    for _, fn in sorted(_exits, key=lambda e: -e[0]):
        try:
            fn()
        except Exception as e:  # the others still run
            log.warning("pytest-bottle: at exit, %s failed: %s", fn.__name__, e)


class _Anchor:
    """What multiprocessing's after-fork registry holds (weakly) for us."""


_anchor = _Anchor()


def _finalizers(_: object) -> None:
    sys.modules["multiprocessing.util"].Finalize(None, _run_exits, exitpriority=0)


def _forked() -> None:
    for pool in list(_pools):
        pool._forked()
    for lock in list(_locks):
        lock._forked()
    mp = sys.modules.get("multiprocessing.util")  # imported by the parent of any multiprocessing child
    # Its child clears the finalizers made before its after-fork calls: they are made in one
    # (once: a grandchild inherits its parent's registration).
    if mp is not None and _anchor not in getattr(mp, "_afterfork_registry", {}).values():
        mp.register_after_fork(_anchor, _finalizers)


os.register_at_fork(after_in_child=_forked)
