"""SIGTERM and SIGHUP unwound like Ctrl-C, so that ``with`` blocks and
finalizers stop their VMs instead of leaving them to the next sweep (the
pytest plugin; ``bottle run`` and ``bottle shell``)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable


def unwind_on(*signums: int, pass_on: Callable[[int], None] | None = None) -> Callable[[], None]:
    """Make each of ``signums`` raise ``KeyboardInterrupt`` in this process,
    after ``pass_on(signum)`` (an xdist controller hands it to its workers).

    Only a signal at its default is taken: one ignored (``nohup``) or handled
    by someone else stays so.  The first one taken ignores the others.  Only
    the main thread may set handlers; from another nothing changes.  Returns
    what puts the defaults back (a process that runs ``pytest.main()`` lives on)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    taken = tuple(s for s in signums if signal.getsignal(s) == signal.SIG_DFL)
    handler = functools.partial(_unwind, os.getpid(), taken, pass_on)
    for signum in taken:
        signal.signal(signum, handler)

    def restore() -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in taken:
            if signal.getsignal(signum) in (handler, signal.SIG_IGN):  # ours (ignored once taken), not a later one's
                signal.signal(signum, signal.SIG_DFL)

    return restore


def exit_status(e: KeyboardInterrupt) -> int:
    """128 + the signal that raised ``e`` (SIGINT for Ctrl-C), as a shell reports it."""
    return 128 + int(getattr(e, "signum", signal.SIGINT))


def _unwind(
    owner: int, taken: tuple[int, ...], pass_on: Callable[[int], None] | None, signum: int, frame: object
) -> None:
    if os.getpid() != owner:
        # A forked child (pyroute2's netns helper, a user's multiprocessing)
        # inherits this handler; unwinding there would run *our* finalizers
        # on copies of our VMs. Die the default way instead.
        os._exit(128 + signum)
    # Once: a second signal would cut short the cleanup it started (closing
    # a terminal sends SIGHUP twice); SIGKILL still ends us.
    for s in taken:
        signal.signal(s, signal.SIG_IGN)
    if pass_on is not None:
        with contextlib.suppress(Exception):  # our own unwinding comes first
            pass_on(signum)
    e = KeyboardInterrupt(f"signal {signum}")  # not a subclass: pytest reports it as Ctrl-C
    e.signum = signum  # type: ignore[attr-defined]
    raise e
