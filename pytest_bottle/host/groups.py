"""A process group that dies with its owner, however the owner dies.

PR_SET_PDEATHSIG reaches only the child it is set on.  An image build's
mmdebstrap gets it, but not the apt, dpkg and maintainer scripts it runs:
after a ``kill -9`` of pytest they went on installing, as root, for 15 s.
So the build runs in a process group of its own, and a watcher in a session
of its own (a kill of the owner's group does not reach it) holds the read end
of a pipe whose write end is the owner's, and a pidfd of the owner.  When the
owner dies, the kernel closes that end and the pidfd turns readable; the
watcher kills the group, at once, as the owner died.  An owner that is done
writes a byte first: then the watcher just exits.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

# -I -S: no site, no user paths; it needs only the standard library.  It
# watches the owner's pidfd too: a child the owner forked without an exec (a
# user's multiprocessing) holds a copy of the write end, and EOF would wait for it.
_WATCH = """\
import os, select, signal, sys
for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):  # the owner's terminal and group are not its concern
    signal.signal(sig, signal.SIG_IGN)
pgid, owner = int(sys.argv[1]), int(sys.argv[2])
try:
    watched = [0, os.pidfd_open(owner)]
except (AttributeError, OSError):  # no pidfd (Linux < 5.3), or the owner is gone already
    watched = [0]
if os.getppid() == owner:  # else the owner died before the pidfd was open
    ready = select.select(watched, [], [])[0]
    if 0 in ready and os.read(0, 1):  # "done", perhaps just before the owner ended
        sys.exit(0)
try:
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


@contextlib.contextmanager
def killed_with_owner(pgid: int) -> Iterator[None]:
    """While inside, the process group ``pgid`` is killed if this process dies.
    Leaving (normally or by an exception) releases the watcher without a kill:
    the caller ends the group itself when it stops early, and reaps its leader
    only after leaving, so that the group id cannot be another's while armed."""
    read, write = os.pipe()  # both close-on-exec: no other child inherits the write end
    try:
        watcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCH, str(pgid), str(os.getpid())],
            stdin=read,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    try:
        yield
    finally:
        try:
            with contextlib.suppress(OSError):  # a watcher that is gone (killed by someone) cannot read it
                os.write(write, b"x")
        finally:
            os.close(write)
            watcher.wait()
