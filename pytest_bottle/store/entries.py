"""Cache entries: directories that appear whole or not at all.

An entry ``<parent>/<name>`` is built in ``<parent>/.tmp-<name>-<pid>`` and
published by one rename, so a reader never sees a half-written entry and a
killed builder leaves only a ``.tmp-`` directory, which the next builder of
that name (or ``bottle sweep``) removes.  An entry is taken away by renaming
it aside to ``.tmp-<name>-<tag>-<pid>`` first and deleting it there: it stops
being an entry at once, however long the delete takes.

Images (``images/cache``) and saved machine states (``store/saved``) both
keep their entries this way; neither knows the names used here.  Who may
build, replace or remove an entry is decided by the caller's lock: these
functions expect the entry's lock to be held where they say so.

A durable commit flushes the entry's files and directories to disk before
the rename, and the rename after it: an entry that survives a host crash is
whole, since later uses trust a file whose size and times did not change
without hashing it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..host.paths import remove_tree

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def is_tmp(path: Path) -> bool:
    """A directory being built or removed, not an entry."""
    return path.name.startswith(TMP_PREFIX)


def tmp_path(final: Path, tag: str | None = None) -> Path:
    """Where this process builds ``final`` (no tag) or puts it aside (``tag``)."""
    middle = f"-{tag}" if tag else ""
    return final.with_name(f"{TMP_PREFIX}{final.name}{middle}-{os.getpid()}")


def entry_of(tmp_name: str) -> str:
    """The entry a tmp directory's name belongs to (``.tmp-X-old-12`` -> ``X``)."""
    rest = tmp_name.removeprefix(TMP_PREFIX).rsplit("-", 1)[0]
    return rest.removesuffix("-old").removesuffix("-discard").removesuffix("-prune").removesuffix("-rm")


def list_entries(parent: Path) -> list[Path]:
    """The published entries under ``parent``, sorted by name."""
    if not parent.is_dir():
        return []
    return [p for p in sorted(parent.iterdir()) if p.is_dir() and not is_tmp(p)]


def clean_stale(final: Path) -> list[Path]:
    """Remove the tmp directories of ``final`` that dead builds left.

    Only safe while holding the entry's lock: a live builder of this name
    holds it too, so whatever is found is not anybody's work in progress.
    """
    stale = sorted(final.parent.glob(f"{TMP_PREFIX}{final.name}-*"))
    for path in stale:
        log.debug("removing stale build directory %s", path)
        remove_tree(path)
    return stale


@contextlib.contextmanager
def building(final: Path, mode: int = 0o777) -> Iterator[Path]:
    """A fresh tmp directory (``mode``, less the umask) to build ``final`` in
    (stale ones of dead builds removed first; hold the entry's lock).  Call
    ``commit`` inside to publish it; whatever is left of it when the block
    ends, normally or not, goes."""
    clean_stale(final)
    tmp = tmp_path(final)
    tmp.mkdir(mode=mode, parents=True)
    try:
        yield tmp
    finally:
        remove_tree(tmp)  # a no-op once committed


def commit(tmp: Path, final: Path, *, durable: bool = True) -> None:
    """Publish ``tmp`` as ``final`` in one rename, replacing what was there.

    Readers see the old entry or the new one, never a mix.  Should ``final``
    reappear between putting it aside and the rename (someone committing
    without the lock), it is put aside again: the last commit wins.
    ``durable``: on disk first (see the module doc); a session's own entry,
    gone with the session, need not wait for the disk.
    """
    if durable:
        sync_tree(tmp)
    while True:
        try:
            os.rename(tmp, final)
            break
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        remove(final, "old")
    if durable:
        _sync(final.parent, directory=True)


def sync_tree(root: Path) -> None:
    """Flush every regular file under ``root``, and its directories, to disk."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _sync(Path(dirpath, name), directory=False)
        _sync(Path(dirpath), directory=True)


def _sync(path: Path, *, directory: bool) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0))
    except OSError as e:
        # A symlink (ENOTDIR where a directory was asked for): a linked directory,
        # such as a cache whose images are on another disk, is flushed where it is.
        if e.errno == errno.ELOOP or (directory and e.errno == errno.ENOTDIR and path.is_symlink()):
            if directory and path.is_dir():
                _sync(Path(os.path.realpath(path)), directory=True)
            return
        raise
    try:
        if directory:
            os.fsync(fd)
        else:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def remove(final: Path, tag: str) -> bool:
    """Take ``final`` away at once (renamed aside, then deleted); False if it
    was already gone.  ``tag`` says why, in the aside name (hold the lock)."""
    aside = tmp_path(final, tag)
    try:
        os.rename(final, aside)
    except FileNotFoundError:
        return False
    remove_tree(aside)
    return True


@contextlib.contextmanager
def flock(lock_file: Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold a flock on ``lock_file`` (created if missing); yields False
    (holding nothing) if ``wait`` is False and someone else holds it.

    ``filelock.FileLock`` on Unix takes the same kind of lock, so the two
    exclude each other.  Locks of one process on two descriptors exclude each
    other too: never nest it inside a hold of the same file's lock.
    """
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
