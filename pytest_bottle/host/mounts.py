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
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
SYS_OPENAT2 = 437  # the same number on every architecture but alpha
RESOLVE_NO_XDEV = 0x01  # fail with EXDEV rather than cross a mount point, bind mounts included
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_openat2_works: bool | None = None  # unknown until first tried


def unescape_mount_field(field: str) -> str:
    """A path as /proc/self/mounts writes it, back as it is: the kernel
    escapes space, tab, newline and backslash as octal (``\\040``...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _unescape_bytes(field: bytes) -> str:
    return os.fsdecode(re.sub(rb"\\([0-3][0-7]{2})", lambda m: bytes([int(m[1], 8)]), field))


def parse_mount_points(mountinfo: bytes) -> list[str]:
    """The mount points in a mountinfo text, in its order (oldest mount first).

    Bytes, split at ``\n`` and spaces only: the kernel escapes just space,
    tab, newline and backslash, so a ``\r``, ``\x0b`` or U+2028 in a name is
    there raw (``splitlines`` would end the line at it), and a name need not
    be UTF-8."""
    fields = (line.split(b" ") for line in mountinfo.split(b"\n"))
    return [_unescape_bytes(f[4]) for f in fields if len(f) > 4]


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
        with open("/proc/self/mountinfo", "rb") as f:
            text = f.read()
    except OSError:
        return []
    return below(parse_mount_points(text), os.path.realpath(path))


def detach(root_fd: int, rel: str, point: str) -> int:
    """Lazily unmount the top mount at ``rel`` below the directory open as
    ``root_fd`` (``point`` is where that is); 0 or the errno.

    With openat2 the mount point is opened (O_PATH) beneath the root without
    following any symlink on the way, and detached through /proc/self/fd:
    UMOUNT_NOFOLLOW alone guards only the last component of a path.  Without
    openat2 (before Linux 5.6) that path is all there is."""
    if _openat2_usable(root_fd):
        try:
            fd = _openat2(root_fd, rel, _PATH_FLAGS, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
        except OSError as e:
            return e.errno or errno.EIO
        try:
            return 0 if _libc.umount2(f"/proc/self/fd/{fd}".encode(), MNT_DETACH) == 0 else ctypes.get_errno()
        finally:
            os.close(fd)
    if _libc.umount2(os.fsencode(point), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
        return 0
    return ctypes.get_errno()


def detach_under(path: Path) -> list[str]:
    """Detach every mount below ``path``; the mount points still there.

    Rounds go on while they free some: a mount hidden under another one
    (mounted over a directory above it) is reached only once that went."""
    points = mounts_under(path)
    if not points:
        return []
    root = os.path.realpath(path)
    try:
        root_fd = os.open(root, _PATH_FLAGS | os.O_DIRECTORY)
    except OSError:
        return points
    try:
        while True:
            for point in points:
                if err := detach(root_fd, os.path.relpath(point, root), point):
                    log.debug("cannot detach %s: %s", point, os.strerror(err))
            left = mounts_under(path)
            if not left or len(left) >= len(points):
                return left
            points = left
    finally:
        os.close(root_fd)


def remove_within(path: Path) -> list[str]:
    """Delete the directory ``path`` and all below it, never descending into a
    mount point (nor following a symlink); returns the mount points it met,
    which stay (and so do the directories above them), ``path`` itself if it
    is one.  What cannot be deleted otherwise (permissions) stays silently,
    as ``rmtree`` would leave it with ``ignore_errors``."""
    whole = os.path.abspath(path)
    parent_path, name = os.path.split(whole)
    shown = os.path.join(os.path.realpath(parent_path), name)
    try:  # from its parent, so that a mount on path itself is seen as one
        parent = os.open(parent_path, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError:  # gone, or not ours to enter: it stays, for the caller to see
        return []
    try:
        openat2 = _openat2_usable(parent)
        known = set() if openat2 else set(mounts_under(path))
        fd = _open_within(parent, name, shown, known)
    except OSError:
        return []
    finally:
        os.close(parent)
    if fd is None:
        return [shown]
    met: list[str] = []
    try:
        _empty(fd, shown, known, met)
    except OSError as e:  # the tree moved under us: what is left stays
        log.warning("stopped removing %s: %s", shown, e)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass
    return met


@dataclass
class _Level:
    name: str  # in the directory above
    shown: str
    ident: tuple[int, int]  # st_dev, st_ino: to know the way back up is the way we came
    names: list[str]  # still to delete


def _level(fd: int, name: str, shown: str) -> _Level:
    st = os.fstat(fd)
    try:
        names = os.listdir(fd)
    except OSError:
        names = []
    return _Level(name, shown, (st.st_dev, st.st_ino), names)


def _empty(top: int, shown: str, known: set[str], met: list[str]) -> None:
    """Delete what the directory open as ``top`` (at ``shown``) holds, within its mount.

    Depth first with a stack of names rather than recursion (no
    RecursionError past 1000 levels) and with one directory open at a time
    (no fd per level): the way back up is "..", checked to be the directory
    we came down from (OSError if the tree was moved meanwhile)."""
    fd = os.dup(top)
    stack = [_level(fd, "", shown)]
    try:
        while stack:
            level = stack[-1]
            if level.names:
                name = level.names.pop()
                child = _delete_or_enter(fd, name, f"{level.shown}/{name}", known, met)
                if child is not None:
                    os.close(fd)
                    fd = child
                    stack.append(_level(fd, name, f"{level.shown}/{name}"))
                continue
            stack.pop()
            if stack:
                up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = up
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != stack[-1].ident:
                    raise OSError(errno.ESTALE, "moved while being removed", stack[-1].shown)
                try:
                    os.rmdir(level.name, dir_fd=fd)
                except OSError:
                    pass  # something below it stayed
    finally:
        os.close(fd)


def _delete_or_enter(fd: int, name: str, shown: str, known: set[str], met: list[str]) -> int | None:
    """Unlink ``name`` in ``fd``; a directory is opened instead (its fd
    returned) unless it is a mount point (noted in ``met``)."""
    try:
        os.unlink(name, dir_fd=fd)
        return None
    except IsADirectoryError:
        pass
    except OSError as e:
        if e.errno == errno.EBUSY:  # a file with a mount on it
            met.append(shown)
        return None
    try:
        child = _open_within(fd, name, shown, known)
    except OSError:
        return None
    if child is None:
        met.append(shown)
    return child


def _open_within(fd: int, name: str, shown: str, known: set[str]) -> int | None:
    """The directory ``name`` in ``fd`` opened, or None if it is a mount point
    (OSError if there is nothing to enter: gone meanwhile, or not a directory).

    openat2's RESOLVE_NO_XDEV has the kernel refuse the step onto another
    mount, even a bind of the same file system.  Without it, the mount ids
    of parent and child tell (a bind of the same file system has the same
    st_dev, and may be made after any list of mounts was read); only where
    those cannot be read, st_dev and the mount points listed before the walk."""
    if _openat2_works:
        try:
            return _openat2(fd, name, _DIR_FLAGS, RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS)
        except OSError as e:
            if e.errno == errno.EXDEV:
                return None
            raise OSError(e.errno, e.strerror, shown) from None
    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
    ids = _mount_id(fd), _mount_id(child)
    if ids[0] is not None and ids[1] is not None:
        crossed = ids[0] != ids[1]
    else:
        crossed = os.fstat(child).st_dev != os.fstat(fd).st_dev or shown in known
    if crossed:
        os.close(child)
        return None
    return child


def _mount_id(fd: int) -> int | None:
    """The id of the mount ``fd`` is on (Linux 3.15+), None if unreadable."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _openat2(fd: int, name: str, flags: int, resolve: int) -> int:
    """openat2(2) with ``resolve``: the new fd, or OSError."""
    how = _OpenHow(flags, 0, resolve)
    got = _libc.syscall(SYS_OPENAT2, fd, os.fsencode(name), ctypes.byref(how), ctypes.sizeof(how))
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
    return int(got)


def _openat2_usable(fd: int) -> bool:
    """Whether this kernel (and any seccomp filter) lets openat2 through:
    known once a probe succeeded, or failed with ENOSYS or EPERM (a seccomp
    filter's answer); another failure says nothing, and is tried again."""
    global _openat2_works
    if _openat2_works is None:
        how = _OpenHow(_DIR_FLAGS, 0, RESOLVE_NO_XDEV)
        probe = _libc.syscall(SYS_OPENAT2, fd, b".", ctypes.byref(how), ctypes.sizeof(how))
        if probe >= 0:
            os.close(probe)
            _openat2_works = True
        elif ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _openat2_works = False
    return bool(_openat2_works)
