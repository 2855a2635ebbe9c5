"""A machine's serial console log: read a bounded tail, and keep the file
bounded on disk while the machine runs.

QEMU appends the guest's serial output to a file with no limit of its own,
and a guest may write as fast as it likes (0.5 MB/s under TCG here, ~2 GB
an hour).  So nothing here reads more than ``READ_CAP`` bytes of it, and a
watcher cuts the head off a file past ``DISK_CAP`` (in place, as QEMU keeps
appending to it), keeping the last ``KEEP`` bytes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

READ_CAP = 8 << 20  # the most of a console any reader holds in memory
DISK_CAP = 64 << 20  # a console file past this is cut ...
KEEP = 16 << 20  # ... to about its last this many bytes
CHECK_EVERY = 2.0  # seconds between looks (0.5 MB/s for 2 s: 1 MB past the cap at most, under TCG)

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_COLLAPSE_RANGE = 0x01, 0x02, 0x08
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def read_tail(path: Path, cap: int | None = None) -> tuple[str, int]:
    """The last ``cap`` (``READ_CAP``) bytes of the log at ``path`` as text, and
    how many bytes of the file before them are not in it.  Of a line that CRs
    overwrote (a progress bar) only what came after the last one is kept, as
    a terminal ends up showing it; a CR before a line's end is dropped."""
    try:
        data, size = _tail(path, READ_CAP if cap is None else cap)
    except OSError:
        return "", 0
    text = data.decode("utf-8", "replace")
    if "\r" in text:
        text = "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))
    return text, size - len(data)


def copy_tail(src: Path, dst: Path) -> None:
    """``dst``: the last ``READ_CAP`` bytes of the log ``src`` (a snapshot's copy of its source's)."""
    dst.write_bytes(_tail(src, READ_CAP)[0])


def _tail(path: Path, cap: int) -> tuple[bytes, int]:
    """The file's last ``cap`` bytes, a punched head (zeros) left out, and its size."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - cap))
        return f.read(cap).lstrip(b"\0"), size


def trim(path: Path, keep: int = KEEP) -> int:
    """Cut the head of the file at ``path`` so that about ``keep`` bytes stay,
    while its writer appends (``O_APPEND``): the range is collapsed where the
    file system can (ext4, xfs), else punched to a hole (btrfs, tmpfs), else
    the file is emptied.  Returns the bytes the file no longer holds: a
    punched hole is still part of it (``read_tail`` counts it), so 0 then."""
    with open(path, "rb+") as f:
        fd = f.fileno()
        st = os.fstat(fd)
        block = st.st_blksize or 4096
        cut = (st.st_size - keep) // block * block
        if cut <= 0:
            return 0
        if _libc.fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, cut) == 0:
            return cut
        _unsupported(ctypes.get_errno(), path)
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, cut) == 0:
            return 0
        _unsupported(ctypes.get_errno(), path)
        os.ftruncate(fd, 0)
        return st.st_size


def _unsupported(err: int, path: Path) -> None:
    if err not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
        raise OSError(err, os.strerror(err), str(path))


class _Watcher:
    """One daemon thread for every console of this process, started with the first."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Anew (a forked child: it has no watcher thread, and may have a lock held at the fork)."""
        self.paths: weakref.WeakKeyDictionary[object, Path] = weakref.WeakKeyDictionary()
        self.cut: dict[str, int] = {}  # bytes cut off each file so far (a file cut in place forgets)
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()

    def watch(self, owner: object, path: Path) -> None:
        with self.lock:
            self.paths[owner] = path
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="bottle-console-watch", daemon=True)
                self.thread.start()

    def forget(self, owner: object) -> None:
        with self.lock:
            path = self.paths.pop(owner, None)
            if path is not None:
                self.cut.pop(str(path), None)

    def _run(self) -> None:
        while not self.wake.wait(CHECK_EVERY):
            with self.lock:
                paths = list(self.paths.values())
            for path in paths:
                try:
                    if os.stat(path).st_blocks * 512 > DISK_CAP:  # on disk: a punched head is not
                        n = trim(path, KEEP)
                        with self.lock:
                            if path in self.paths.values():  # not forgotten meanwhile
                                self.cut[str(path)] = self.cut.get(str(path), 0) + n
                        log.debug("console %s: cut %d bytes off its head", path, n)
                except OSError as e:  # gone with its run directory, or a file system's refusal
                    log.debug("console %s: %s", path, e)


_watcher = _Watcher()
os.register_at_fork(after_in_child=_watcher.reset)
watch = _watcher.watch
forget = _watcher.forget


def cut_bytes(path: Path) -> int:
    """How much the watcher cut off the head of ``path`` while its machine ran here."""
    with _watcher.lock:
        return _watcher.cut.get(str(path), 0)


PANIC = "Kernel panic - not syncing"  # how Linux starts (and ends) its last words
HALTED = "the guest halted"

# What Linux prints last as it ends, and what that means for a bottle's user.
_ENDINGS = (
    (PANIC, "the guest kernel panicked"),
    ("reboot: Restarting system", "the guest rebooted"),
    ("sysrq: Resetting", "the guest rebooted"),
    ("reboot: Power down", "the guest powered off"),
    ("reboot: System halted", HALTED),
)


def last_words(tail: str) -> str:
    """How the guest ended, from a console ``tail`` ("" if it does not say):
    a hint for an error message only, as the guest writes its console."""
    for line in reversed(tail.splitlines()[-40:]):
        for mark, words in _ENDINGS:
            if mark in line:
                said = "".join(c if c.isprintable() else "?" for c in line[line.index(mark) :][:200])
                return f"{words}: {said!r} on its console"
    return ""
