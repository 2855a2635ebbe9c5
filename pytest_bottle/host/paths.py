"""Where things live: the cache (images, seeds, keys) and the per-user run state."""

from __future__ import annotations

import contextlib
import functools
import grp
import json
import logging
import os
import pwd
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import UnsafeDirectory
from .mounts import detach_under, remove_within

log = logging.getLogger(__name__)

_OTHERS = stat.S_IRWXG | stat.S_IRWXO
_warned: set[Path] = set()


def _xdg(name: str) -> str | None:
    """An XDG base directory variable; a relative one is ignored, as the XDG
    spec says (it would name another cache after a ``chdir``)."""
    value = os.environ.get(name)
    return value if value and os.path.isabs(value) else None


def default_cache_dir() -> Path:
    base = _xdg("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.path.abspath(base)) / "pytest-bottle"


def state_dir() -> Path:
    """Run state shared by every pytest run of this user on this host (leases,
    VM records).

    Per user, not per cache: a run's loopback aliases and TAP names must not
    collide with its other runs', whichever cache they use.  Other users'
    runs lease from their own pools; a clash with them on an address is
    harmless (ports are probed, and QEMU's bind decides), and TAPs live in
    network namespaces of their own.  Whatever its source, it must be
    a real directory of this user with mode 0700 (``UnsafeDirectory`` if not):
    another user who could write into it could make our sweep kill our VMs.
    A place the user chose (``BOTTLE_STATE_DIR``, ``XDG_RUNTIME_DIR``) is
    refused loudly; the fixed name in /tmp, which anyone may take first, is
    given up for a directory under the user's home when someone else has it.
    """
    settable = "BOTTLE_STATE_DIR"  # root's ignores XDG_RUNTIME_DIR
    if env := os.environ.get("BOTTLE_STATE_DIR"):
        if not os.path.isabs(env):  # runs started in other directories would lease from other pools
            raise UnsafeDirectory(env, "it is a relative path", "set BOTTLE_STATE_DIR to an absolute path")
        path, source = Path(os.path.abspath(env)), "BOTTLE_STATE_DIR"
    elif os.geteuid() == 0:
        path, source = Path("/run/pytest-bottle"), "the state directory of root"
    elif xdg := _xdg("XDG_RUNTIME_DIR"):
        path, source = Path(xdg) / "pytest-bottle", "$XDG_RUNTIME_DIR/pytest-bottle"
        settable = "XDG_RUNTIME_DIR or BOTTLE_STATE_DIR"
    else:
        return _fallback_state_dir()
    hint = (
        f"this is {source}; if you made this directory, `chmod 700 {path}`, otherwise remove it "
        f"(as its owner or root) or point {settable} at a directory of your own"
    )
    return private_dir(path, hint=hint)


def _fallback_state_dir() -> Path:
    """Without XDG_RUNTIME_DIR: /tmp/pytest-bottle-UID, or, if another user
    has taken that name, $XDG_STATE_HOME/pytest-bottle (~/.local/state)."""
    tmp = Path(f"/tmp/pytest-bottle-{os.getuid()}")
    hint = f"this is the fallback without XDG_RUNTIME_DIR; `chmod 700 {tmp}` or set XDG_RUNTIME_DIR or BOTTLE_STATE_DIR"
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UnsafeDirectory(str(tmp), f"it cannot be inspected ({e.strerror})", hint) from None
    if st is None or st.st_uid == os.geteuid():
        return private_dir(tmp, hint=hint)  # ours (or free): a mode to fix is the user's to fix
    state_home = _xdg("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    home = Path(state_home) / "pytest-bottle"
    if tmp not in _warned:  # say it once per process, whatever asks again
        _warned.add(tmp)
        log.warning("%s belongs to uid %d, not to us: using %s for run state", tmp, st.st_uid, home)
    hint = f"{tmp} belongs to uid {st.st_uid}, so this is the state dir in your home; set BOTTLE_STATE_DIR"
    try:
        return private_dir(home, hint=hint)
    except OSError as e:
        raise UnsafeDirectory(str(home), f"it cannot be made ({e.strerror})", hint) from None


# What a cache root holds: the only names a root others may read may hold to be made 0700.
CACHE_ENTRIES = frozenset(
    {"images", "seeds", "snapshots", "run", "logs", "locks", "keys", "accel.json", "accel.lock", "lost+found"}
)


def cache_root(path: Path, *, writable: bool = True) -> Path:
    """Make sure the cache root is this user's alone, creating it if needed.

    The cache holds memory states, disks with SSH host keys and the client
    key.  A symlink is followed (a cache moved to a bigger disk); a root that
    others may only read and enter (the mode older versions made) is set to
    0700 if it holds nothing but a cache's entries; one others may write
    into, or of another owner, is refused; so is one this process cannot
    write (a read-only mount), unless not ``writable`` (a sweep, which
    removes only what is there).
    """
    hint = f"pass a cache dir of your own or fix {path}"
    root = private_dir(path, follow_symlink=True, fix_readable=CACHE_ENTRIES, hint=hint)
    if writable and not os.access(root, os.W_OK | os.X_OK):  # else a bare OSError at its first lock
        try:
            read_only = bool(os.statvfs(root).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "it is on a read-only file system" if read_only else "it cannot be written"
        raise UnsafeDirectory(str(path), why, hint)
    return root


def check_cache(path: Path) -> None:
    """Refuse (``UnsafeDirectory``) a cache that is there but not usable; make
    none: reading a cache that is not there yet (a fresh machine) finds it empty.
    A read-only one can be read: what writes to it checks that (``cache_root``)."""
    if os.path.lexists(path):
        cache_root(path, writable=False)


def check_cache_place(path: Path) -> None:
    """Refuse a cache that is not there yet and could never be made safely
    (under another user's directory, or one open to others); makes nothing.
    For ``bottle doctor``: reading such a cache finds it empty all the same."""
    if os.path.lexists(path):
        return
    path = Path(os.path.abspath(path))
    hint = f"pass a cache dir of your own or fix {path}"
    _check_ancestors(path, hint)
    existing = next(p for p in path.parents if os.path.lexists(p))  # "/" at least
    # access(2) also says EROFS: a read-only home in a container, a read-only mount
    if os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK):
        ro = os.statvfs(existing).f_flag & os.ST_RDONLY
        why = "is on a read-only file system" if ro else "is not writable by this user"
        raise UnsafeDirectory(str(path), f"it cannot be made: {existing} {why}", hint)


def private_dir(
    path: Path, *, follow_symlink: bool = False, fix_readable: frozenset[str] | None = None, hint: str = ""
) -> Path:
    """``path`` as a directory only this user can reach, created 0700 if missing.

    Refuses (``UnsafeDirectory``) a symlink (unless ``follow_symlink``), a
    directory of another owner, one whose mode lets others in (unless
    others may not write and it holds only names in ``fix_readable``: then it
    is made 0700), one under a directory that someone else could rename it
    out of, and one that cannot be made.
    """
    path = Path(os.path.abspath(path))
    _check_ancestors(path, hint)
    try:
        _make_parents(path, hint)
        # Again, now that every directory above exists, before anything of ours
        # goes in: one missing at the first look may have been made meanwhile
        # by someone else (in a sticky /tmp/ci, say).
        _check_ancestors(path, hint)
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # whatever the umask; its parent is safe now, so it is still ours
        except FileExistsError:
            pass
        st = os.lstat(path)
    except OSError as e:  # /proc/x, a read-only or full disk: say which and why, not a traceback
        where = "" if e.filename in (None, str(path)) else f"{e.filename}: "
        raise UnsafeDirectory(str(path), f"it cannot be made ({where}{e.strerror})", hint) from None
    if stat.S_ISLNK(st.st_mode) and follow_symlink:
        if st.st_uid not in (0, os.geteuid()):  # its owner could point it elsewhere at any time
            raise UnsafeDirectory(str(path), f"it is a symlink that belongs to uid {st.st_uid}", hint)
        real = Path(os.path.realpath(path))
        _check_ancestors(real, hint)
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            raise UnsafeDirectory(str(path), f"it is a symlink to {real}, which does not exist", hint) from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafeDirectory(str(path), f"it is {kind}", hint)
    if st.st_uid != os.geteuid():
        raise UnsafeDirectory(str(path), f"it belongs to uid {st.st_uid}, not to uid {os.geteuid()}", hint)
    if st.st_mode & _OTHERS:
        mode = stat.S_IMODE(st.st_mode)
        if fix_readable is None or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeDirectory(str(path), f"its mode {mode:04o} lets other users in (want 0700)", hint)
        _make_private(path, mode, fix_readable, hint)
    return path


def _make_private(path: Path, mode: int, names: frozenset[str], hint: str) -> None:
    """0700 for a directory others may read that holds only ``names`` (what an
    older version left), never for one of other things a user pointed us at
    by mistake (``/dev``, a home directory): its mode is not ours to change."""
    lets_in = f"its mode {mode:04o} lets other users in (want 0700)"
    try:
        others = sorted(n for n in set(os.listdir(path)) - names if temporary_owner(n) is None)  # ours: swept
        if others:
            shown = ", ".join(repr(n) for n in others[:3]) + (", ..." if len(others) > 3 else "")
            why = f"{lets_in}, and it holds what no cache does ({shown}): left as it is"
            raise UnsafeDirectory(str(path), why, hint)
        log.info("making %s private (mode %04o -> 0700)", path, mode)
        os.chmod(path, 0o700)
    except OSError as e:  # a read-only mount, /proc
        raise UnsafeDirectory(str(path), f"{lets_in}, and it cannot be changed ({e.strerror})", hint) from None


def _make_parents(path: Path, hint: str) -> None:
    """The missing directories above ``path``, 0700 whatever the umask (0777
    less a umask of 0 would be refused by the next look at them).  Each must
    be a directory of ours once made, before the next goes into it."""
    missing = []
    for anc in path.parents:
        if os.path.lexists(anc):
            break
        missing.append(anc)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:  # made meanwhile: judged as one of ours would be
            pass
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)  # not through a link
        try:
            owner = os.fstat(fd).st_uid
            if owner != os.geteuid():
                raise UnsafeDirectory(str(path), f"{d} above it was made by uid {owner} meanwhile", hint)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)


def _check_ancestors(path: Path, hint: str) -> None:
    """Every directory above ``path`` must be root's or ours, and not open to
    everyone for writing unless sticky (like /tmp), nor to a group with
    anyone else in it (Debian's /var/local is root:staff 2775): whoever may
    write in a directory may rename what is in it and put their own in its
    place.  A symlink among them must be root's or ours too (in a sticky dir
    anyone may plant one), and what it leads to is checked the same way."""
    euid = os.geteuid()
    linked = False
    for anc in path.parents:
        try:
            st = os.lstat(anc)
        except FileNotFoundError:
            continue  # created below, by us
        except OSError as e:
            reason = f"the directory above it, {anc}, cannot be inspected ({e.strerror})"
            raise UnsafeDirectory(str(path), reason, hint) from None
        if not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            raise UnsafeDirectory(str(path), f"{anc} on its path is not a directory", hint)
        if st.st_uid not in (0, euid):
            raise UnsafeDirectory(str(path), f"the directory above it, {anc}, belongs to uid {st.st_uid}", hint)
        if stat.S_ISLNK(st.st_mode):
            linked = True  # a link's own mode means nothing
        elif st.st_mode & stat.S_ISVTX:
            pass  # only an entry's owner may rename it
        elif st.st_mode & stat.S_IWOTH:
            raise UnsafeDirectory(str(path), f"the directory above it, {anc}, is writable by everyone", hint)
        elif st.st_mode & stat.S_IWGRP and (why := group_others(st.st_gid)):
            raise UnsafeDirectory(str(path), f"the directory above it, {anc}, is {why}", hint)
    if linked:  # the resolved parent and everything above it, links gone
        _check_ancestors(Path(os.path.realpath(path.parent)) / path.name, hint)


@functools.lru_cache(maxsize=16)
def group_others(gid: int) -> str:
    """Why a directory group ``gid`` may write in is not this user's alone ("" if
    it is: the user's own group, nobody else found in it; root does not count)."""
    try:
        group = grp.getgrgid(gid)
        name, members = f"{group.gr_name} (gid {gid})", set(group.gr_mem)
    except KeyError:
        name, members = f"gid {gid}", set()
    if gid != os.getegid():  # a directory service need not list its users: only our own group is ours
        return f"writable by group {name}, which is not this user's own group"
    me = os.geteuid()
    try:
        own = {pwd.getpwuid(me).pw_name, "root"}
    except KeyError:
        own = {"root"}
    # Members as the group lists them (all of them, listed or not in passwd),
    # and the users whose own group it is (asked only for this user's group).
    others = (members - own) | {u.pw_name for u in pwd.getpwall() if u.pw_gid == gid and u.pw_uid not in (me, 0)}
    if others:
        listed = ", ".join(sorted(others)[:5]) + (", ..." if len(others) > 5 else "")
        return f"writable by group {name}, which has {listed} in it"
    return ""


def write_private(path: Path, data: str | bytes) -> None:
    """Replace ``path`` atomically with ``data``, mode 0600.

    The temporary file gets a fresh unpredictable name (O_EXCL), so a symlink
    planted at a fixed name cannot redirect the write.
    """
    # The pid in the name: what a writer killed here leaves, the sweep knows for a dead one's.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with naming(path), open(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An ``OSError`` that names no file (a write's or a close's: a full disk) as one
    naming ``path``, so that a start can say which file found no room."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def temporary_owner(name: str) -> int | None:
    """The pid in the name of a ``write_private`` temporary (``.NAME.PID.XXXXXXXX.tmp``), or None."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[: -len(".tmp")].rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and re.fullmatch(r"[0-9]{1,9}", parts[1]) else None


def write_json(path: Path, obj: object) -> None:
    """``obj`` as compact JSON, written as ``write_private`` writes."""
    write_private(path, json.dumps(obj))


def remove_tree(path: Path) -> list[str]:
    """Remove a file or a directory tree, even one a killed mmdebstrap left
    mounts in: those are detached first (deepest first), and the delete never
    descends into a mount point, so what one could not detach (or one made
    meanwhile) is left whole, with the directories above it; so is ``path``
    if it is a mount point itself.  Returns the mount points left; ``path``
    then remains."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return []
    detach_under(path)  # what it could not detach, the walk below meets and reports
    left = remove_within(path)
    if left:  # mounted while we walked: once more, then it is the caller's to report
        detach_under(path)
        left = remove_within(path)
    if left:
        log.warning("could not remove %s: mounts under it could not be detached: %s", path, ", ".join(left))
    return left


def tree_size(path: Path) -> int:
    """Bytes actually allocated (sparse files count for what they hold).

    Mounts below ``path`` (a build in progress has /proc and /dev mounted in
    its root) are not entered, and what vanishes or cannot be read meanwhile
    is not counted."""
    try:
        total = path.lstat().st_blocks * 512
    except OSError:
        return 0
    for root, dirs, files in os.walk(path, onerror=lambda e: None):
        dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(root, d))]
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def current_umask() -> int:
    """The process's umask, from /proc: ``os.umask`` reads it only by setting
    it, for every thread of the process at once."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022  # a kernel before 4.7, or no /proc
