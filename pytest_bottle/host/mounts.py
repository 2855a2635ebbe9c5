"""Mounts below our own directories: finding them, detaching them, and
removing a tree without ever descending into one.

mmdebstrap ``--mode=root`` mounts in the host's mount namespace for its
hooks: a fresh proc, sysfs and devpts in the build root, and a bind of the
host's ``/dev/shm`` (where sysfs cannot be mounted it binds the host's
``/sys`` and ``/proc`` recursively instead).  A build killed with SIGKILL
leaves them there, and a delete that walks through such a bind deletes the
host's files: hence detach first, and a walker that stops at any mount
point it meets (a mount it may not detach, or one made meanwhile).  As
non-root (``--mode=unshare``) the mounts live in mmdebstrap's own namespace
and die with it: nothing is found here, and the walker is a plain delete.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
SYS_OPENAT2 = 437  # the same number on every architecture but alpha
RESOLVE_NO_XDEV = 0x01  # fail with EXDEV rather than cross a mount point, bind mounts included
RESOLVE_NO_SYMLINKS = 0x04
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_openat2_works: bool | None = None  # unknown until first tried


def unescape_mount_field(field: str) -> str:
    """A path as /proc/self/mountinfo writes it, back as it is: the kernel
    escapes space, tab, newline and backslash as octal (``\\040``...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def parse_mount_points(mountinfo: str) -> list[str]:
    """The mount points in a mountinfo text, in its order (oldest mount first)."""
    return [unescape_mount_field(line.split(" ")[4]) for line in mountinfo.splitlines() if line.count(" ") >= 4]


def below(points: list[str], path: str) -> list[str]:
    """The mount points strictly below ``path``, in the order to detach them:
    deepest first, a point once per mount on it (a detach by path takes the top one)."""
    prefix = path.rstrip("/") + "/"
    found = [(p.count("/"), i, p) for i, p in enumerate(points) if p.startswith(prefix)]
    return [p for _, _, p in sorted(found, reverse=True)]


def mounts_under(path: Path) -> list[str]:
    """The mount points strictly below ``path`` as this process sees them
    (symlinks in ``path`` resolved, as the kernel lists them)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return []
    return below(parse_mount_points(text), os.path.realpath(path))


def detach(mount_point: str) -> int:
    """Lazily unmount ``mount_point`` without following a symlink there; 0 or the errno."""
    if _libc.umount2(os.fsencode(mount_point), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
        return 0
    return ctypes.get_errno()


def detach_under(path: Path) -> list[str]:
    """Detach every mount below ``path``; the mount points still there."""
    for point in mounts_under(path):
        if err := detach(point):
            log.debug("cannot detach %s: %s", point, os.strerror(err))
    return mounts_under(path)


def remove_within(path: Path) -> list[str]:
    """Delete the directory ``path`` and all below it, never descending into a
    mount point (nor following a symlink); returns the mount points it met,
    which stay (and so do the directories above them).  What cannot be
    deleted otherwise (permissions) stays silently, as ``rmtree`` would
    leave it with ``ignore_errors``."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:  # gone, or not ours to enter: it stays, for the caller to see
        return []
    met: list[str] = []
    try:
        known = set(mounts_under(path)) if not _openat2_usable(fd) else set()
        _empty(fd, os.path.realpath(path), known, met)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass
    return met


def _empty(fd: int, shown: str, known: set[str], met: list[str]) -> None:
    """Delete what the directory open as ``fd`` (at ``shown``) holds, within its mount."""
    try:
        names = os.listdir(fd)
    except OSError:
        return
    for name in names:
        try:
            os.unlink(name, dir_fd=fd)
            continue
        except IsADirectoryError:
            pass
        except OSError as e:
            if e.errno == errno.EBUSY:  # a file with a mount on it
                met.append(f"{shown}/{name}")
            continue
        try:
            child = _open_within(fd, name, f"{shown}/{name}", known)
        except OSError:
            continue
        if child is None:
            met.append(f"{shown}/{name}")
            continue
        try:
            _empty(child, f"{shown}/{name}", known, met)
        finally:
            os.close(child)
        try:
            os.rmdir(name, dir_fd=fd)
        except OSError:
            pass  # something below it stayed


def _open_within(fd: int, name: str, shown: str, known: set[str]) -> int | None:
    """The directory ``name`` in ``fd`` opened, or None if it is a mount point
    (OSError if there is nothing to enter: gone meanwhile, or not a directory).

    openat2's RESOLVE_NO_XDEV has the kernel refuse the step onto another
    mount, even a bind of the same file system; without it, a different
    st_dev or a mount point listed before the walk tells."""
    if _openat2_works:
        how = _OpenHow(_DIR_FLAGS, 0, RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS)
        child = _libc.syscall(SYS_OPENAT2, fd, os.fsencode(name), ctypes.byref(how), ctypes.sizeof(how))
        if child >= 0:
            return int(child)
        err = ctypes.get_errno()
        if err == errno.EXDEV:
            return None
        raise OSError(err, os.strerror(err), shown)
    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
    if os.fstat(child).st_dev != os.fstat(fd).st_dev or shown in known:
        os.close(child)
        return None
    return child


def _openat2_usable(fd: int) -> bool:
    """Whether this kernel (and any seccomp filter) lets openat2 through: tried once."""
    global _openat2_works
    if _openat2_works is None:
        how = _OpenHow(_DIR_FLAGS, 0, RESOLVE_NO_XDEV)
        probe = _libc.syscall(SYS_OPENAT2, fd, b".", ctypes.byref(how), ctypes.sizeof(how))
        if probe >= 0:
            os.close(probe)
        _openat2_works = probe >= 0 or ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM)
    return _openat2_works
