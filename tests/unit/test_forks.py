"""What a forked child gets anew: locks held at the fork, pools and the console
watcher whose threads it does not have (real os.fork, real threads)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pytest_bottle.vmm import console
from pytest_bottle.vmm.forks import ForkSafeLock, ForkSafePool


def _in_child(check: Callable[[], bool], within: float = 10.0) -> int:
    """Fork; the child exits 0 when ``check()`` is true, 1 when false; -1 if it hangs past ``within``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os._exit(0 if check() else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -1


def test_a_lock_held_by_another_thread_at_the_fork_is_free_in_the_child() -> None:
    lock, held, release = ForkSafeLock(), threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)

    def take() -> bool:
        with lock:
            return True

    try:
        assert _in_child(take) == 0  # a plain Lock: the child waits for ever (-1)
    finally:
        release.set()
        t.join()


def test_a_pool_started_in_the_parent_runs_work_in_the_child() -> None:
    pool = ForkSafePool(1, "test-pool")
    assert pool.submit(lambda: 1).result(timeout=10) == 1  # its thread is the parent's
    assert _in_child(lambda: pool.submit(lambda: 2).result(timeout=5) == 2) == 0


def test_the_console_watcher_starts_anew_in_a_child(tmp_path: Path) -> None:
    class Owner:
        pass

    owner = Owner()
    console.watch(owner, tmp_path / "console.log")
    assert console._watcher.thread is not None
    try:
        assert _in_child(lambda: console._watcher.thread is None and not console._watcher.paths) == 0
    finally:
        console.forget(owner)
