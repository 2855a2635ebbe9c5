"""Tar extraction with one policy of our own, shared by the host (``get``) and
the guest agent (``put``); stdlib only.  ``tarstream`` reads the stream, this
module writes it.

Only regular files, directories, symlinks and hard links to files extracted
earlier by the same stream are written.  Every path is walked component by
component from a descriptor of the destination with ``O_NOFOLLOW``, so no
member is ever written through a symlink or into anything but a real
directory inside the destination (``put()`` alone follows the guest's own
links to directories, like cp and tar, never one the stream made); a file or
link is written under a temporary name and renamed over its entry, so an
existing link (hard or symbolic) is replaced, never written through.
Ownership is never changed, and modes are set only on directories this
extraction created.
"""

from __future__ import annotations

import errno
import os
import stat

try:  # on the host, as part of the package
    from . import tarstream as ts
except ImportError:  # in the guest, files side by side
    import tarstream as ts  # type: ignore[import-not-found,no-redef]

Policy = ts.Policy
Refused = ts.Refused
Skipped = ts.Skipped
GET, PUT, TRUNCATED = ts.GET, ts.PUT, ts.TRUNCATED
show = ts.show

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# get(): what the host's own side says (its disk, its permissions, its limits),
# not the archive: an OSError naming the host file, as a file's get() raises.
HOST_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE}
)
SHOWN_SKIPS = 20  # skipped members kept for the error; the rest are counted
ENTRY_COST = 256  # bytes one tracked name costs besides its own (dict entry, objects)


class Extractor:
    """Writes members under one open destination directory."""

    def __init__(self, root: int, policy: ts.Policy) -> None:
        self.root = root
        self.policy = policy
        self.files: dict[bytes, tuple[int, int]] = {}  # files written here: (st_dev, st_ino)
        self.created: dict[bytes, tuple[int, float]] = {}  # directories made here: mode, mtime (set last)
        self.links: set[bytes] = set()  # symlinks made here (put): never followed
        self.own_root = False  # put() into a directory it just made: the root member's mode counts
        self.source: list[bytes] | None = None  # get(): the guest directory copied, by component
        self.dst = ""  # what an error names the member under
        self.root_mode: tuple[int, float] | None = None
        self.tracked = 0
        self.chain: list[tuple[bytes, int]] = []  # the last parent walked: a descriptor per component
        self.skipped: list[ts.Refused] = []
        self.stream: ts.Stream | None = None
        self.nskipped = 0
        self.serial = 0
        self.prefix = b".bottle-%d-%s-" % (os.getpid(), os.urandom(4).hex().encode())

    def close(self) -> None:
        self.forget(())

    def forget(self, parts: tuple[bytes, ...]) -> None:
        """Drop cached descriptors of ``parts`` and below (it is being replaced)."""
        keep = len(parts) - 1 if parts else 0
        if len(self.chain) > keep and tuple(c for c, _ in self.chain[: len(parts)]) == parts:
            for _, fd in self.chain[keep:]:
                os.close(fd)
            del self.chain[keep:]

    def track(self, name: bytes, key: bytes) -> None:
        """Count a name newly kept in memory against the policy's bound."""
        self.tracked += len(key) + ENTRY_COST
        if self.tracked > self.policy.max_tracked:
            limit = self.policy.max_tracked
            raise ts.Refused(show(name), f"the archive's names take more than the limit of {limit} bytes to track")

    def step(self, fd: int, path: tuple[bytes, ...], i: int, name: bytes, create: bool) -> int:
        """A new descriptor of directory ``path[i]`` inside ``fd`` (``path[:i]``)."""
        part = path[i]
        try:
            return os.open(part, DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
            if self.stream is not None:  # each costs an inode: counted as a member
                self.stream.count(name)
            os.mkdir(part, 0o755, dir_fd=fd)  # a parent the archive did not list
            return os.open(part, DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise  # EACCES, EMFILE...: not what the path is made of
        if self.policy.trusted and b"/".join(path[: i + 1]) not in self.links:
            try:  # the guest's own link to a directory (/lib -> usr/lib): followed, like cp and tar
                return os.open(part, FOLLOW_DIR, dir_fd=fd)
            except OSError:
                pass
        raise ts.Refused(show(name), f"{show(part)!r} on its path is a symlink or not a directory")

    def walk(self, path: tuple[bytes, ...], name: bytes, create: bool) -> int:
        """A new descriptor of ``root/path``, every component a real directory."""
        fd = os.dup(self.root)
        try:
            for i in range(len(path)):
                nfd = self.step(fd, path, i, name, create)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def parent(self, name: bytes, parts: tuple[bytes, ...]) -> int:
        """A descriptor of the directory holding ``parts[-1]`` (owned by the cache),
        reusing the descriptors of the path it shares with the last one."""
        path = parts[:-1]
        keep = 0
        while keep < min(len(path), len(self.chain)) and self.chain[keep][0] == path[keep]:
            keep += 1
        for _, fd in self.chain[keep:]:
            os.close(fd)
        del self.chain[keep:]
        fd = self.chain[-1][1] if self.chain else self.root
        for i in range(keep, len(path)):
            fd = self.step(fd, path, i, name, create=True)
            self.chain.append((path[i], fd))
        return fd

    def temp(self) -> bytes:
        """A fresh name (created with O_EXCL or symlink(), never reused)."""
        self.serial += 1
        return b"%s%d.part" % (self.prefix, self.serial)

    def place(self, member: ts.Member, parts: tuple[bytes, ...], pfd: int, tmp: bytes) -> None:
        self.forget(parts)
        try:
            os.rename(tmp, parts[-1], src_dir_fd=pfd, dst_dir_fd=pfd)
        except IsADirectoryError:
            os.unlink(tmp, dir_fd=pfd)
            raise ts.Refused(show(member.name), "a directory of that name is in the way") from None
        except BaseException:
            os.unlink(tmp, dir_fd=pfd)
            raise

    def extract(self, stream: ts.Stream) -> None:
        self.stream = stream
        while (member := stream.next()) is not None:
            try:
                self.member(member, stream)
            except ts.Skipped as e:
                if self.policy.trusted:
                    raise
                self.nskipped += 1  # nothing written for it: go on, and say so at the end
                if len(self.skipped) < SHOWN_SKIPS:
                    self.skipped.append(e)
            except OSError as e:
                if e.errno is None or isinstance(e, ConnectionAbortedError):  # the stream's: a cancel, a timeout
                    raise
                if self.policy.trusted or e.errno in HOST_ERRNOS:  # put(): the guest's own (a GuestOSError)
                    where = os.path.join(self.dst, *(ts.show(p) for p in ts.parts(member.name)))
                    raise OSError(e.errno, e.strerror, where) from None  # the file, not a temporary name
                raise ts.Refused(show(member.name), f"could not be written: {e.strerror or e}") from None

    def member(self, member: ts.Member, stream: ts.Stream) -> None:
        kind = ts.KINDS.get(member.type)
        if kind is None:
            if member.type in ts.REFUSED_KINDS:
                what = ts.REFUSED_KINDS[member.type]
                raise ts.Skipped(show(member.name), f"{what}: only files, directories and links are copied")
            raise ts.Refused(show(member.name), f"an unsupported member type {member.type!r}")
        parts = ts.parts(member.name)
        if not parts:
            if kind != "dir":
                raise ts.Refused(show(member.name), "the archive's root is not a directory")
            if self.own_root:
                self.root_mode = (member.mode, member.mtime)
            return
        pfd = self.parent(member.name, parts)
        getattr(self, "put_" + kind)(member, stream, parts, pfd)

    def put_dir(self, member: ts.Member, stream: ts.Stream, parts: tuple[bytes, ...], pfd: int) -> None:
        key, last = b"/".join(parts), parts[-1]
        try:
            os.mkdir(last, 0o700, dir_fd=pfd)  # writable until its mode is set, last
        except FileExistsError:
            st = os.stat(last, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if key in self.created:  # made by this stream: the last member's mode wins
                    self.created[key] = (member.mode, member.mtime)
                return  # not ours: its mode stays
            if stat.S_ISLNK(st.st_mode) and self.policy.trusted and key not in self.links and _is_dir(last, pfd):
                return  # the guest's own link to a directory (merged /usr): kept and followed
            self.forget(parts)
            os.unlink(last, dir_fd=pfd)  # a file or link of that name: replaced, not followed
            self.files.pop(key, None)
            self.links.discard(key)
            os.mkdir(last, 0o700, dir_fd=pfd)
        if key not in self.created:
            self.track(member.name, key)
        self.created[key] = (member.mode, member.mtime)

    def put_file(self, member: ts.Member, stream: ts.Stream, parts: tuple[bytes, ...], pfd: int) -> None:
        tmp = self.temp()
        fd = os.open(tmp, NEW_FILE, 0o600, dir_fd=pfd)
        try:
            stream.copy(member, fd)
            os.fchmod(fd, member.mode & self.policy.mode_mask)
            _utime(fd, member.mtime)
            st = os.fstat(fd)
        except BaseException:
            os.unlink(tmp, dir_fd=pfd)
            raise
        finally:
            os.close(fd)
        self.place(member, parts, pfd, tmp)
        self.remember(member.name, b"/".join(parts), (st.st_dev, st.st_ino))

    def remember(self, name: bytes, key: bytes, ino: tuple[int, int]) -> None:
        self.links.discard(key)
        if key not in self.files:
            self.track(name, key)
        self.files[key] = ino

    def put_symlink(self, member: ts.Member, stream: ts.Stream, parts: tuple[bytes, ...], pfd: int) -> None:
        target = member.linkname
        if not target or len(target) > ts.MAX_PATH or b"\0" in target:
            raise ts.Refused(show(member.name), "an empty, overlong or malformed symlink target")
        if not self.policy.trusted:
            target = self.relative(parts, target)
            ts.link_stays_inside(member.name, parts, target)
        tmp = self.temp()
        os.symlink(target, tmp, dir_fd=pfd)
        self.place(member, parts, pfd, tmp)
        key = b"/".join(parts)
        self.files.pop(key, None)
        if self.policy.trusted and key not in self.links:
            self.track(member.name, key)
            self.links.add(key)

    def relative(self, parts: tuple[bytes, ...], target: bytes) -> bytes:
        """An absolute ``target`` inside the directory the stream copies
        (``source``, get()'s guest path) as the relative one that leads to the
        same entry of the copy; any other target (one with a '..', or too long
        once relative) as it is."""
        src = self.source
        if src is None or not target.startswith(b"/"):
            return target
        comps = _components(target)
        if b".." in comps or comps[: len(src)] != src:
            return target  # elsewhere in the guest: skipped
        rel = b"/".join([b".."] * (len(parts) - 1) + comps[len(src) :]) or b"."
        return rel if len(rel) < ts.MAX_PATH else target  # symlink(2) takes less than PATH_MAX

    def put_hardlink(self, member: ts.Member, stream: ts.Stream, parts: tuple[bytes, ...], pfd: int) -> None:
        """Only to a file this stream wrote (and that is still that file)."""
        target = ts.parts(member.linkname, "hard link target")
        want = self.files.get(b"/".join(target))
        gone = f"a hard link to {show(member.linkname)!r}, which is gone"
        if want is None:
            raise ts.Refused(
                show(member.name), f"a hard link to {show(member.linkname)!r}, not a file copied before it"
            )
        tmp = self.temp()
        try:
            tfd = self.walk(target[:-1], member.name, create=False)
        except FileNotFoundError:
            raise ts.Refused(show(member.name), gone) from None
        try:
            os.link(target[-1], tmp, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise ts.Refused(show(member.name), gone) from None
        finally:
            os.close(tfd)
        st = os.stat(tmp, dir_fd=pfd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != want or not stat.S_ISREG(st.st_mode):
            os.unlink(tmp, dir_fd=pfd)
            raise ts.Refused(show(member.name), f"a hard link to {show(member.linkname)!r}, which was replaced")
        self.place(member, parts, pfd, tmp)
        self.remember(member.name, b"/".join(parts), want)

    def finish(self) -> None:
        """Modes and times of the directories made here, children before parents
        (a read-only one stayed writable until now); never of one that was there."""
        for key in sorted(self.created, reverse=True):
            mode, mtime = self.created[key]
            parts = tuple(key.split(b"/"))
            try:
                fd = os.open(parts[-1], DIR_FLAGS, dir_fd=self.parent(b"", parts))
            except (OSError, ts.Refused):
                continue  # replaced by a later member: nothing of ours to set
            # get(): a directory the host user could not enter or empty (0o000 from
            # the guest) would outlive every plain rm -r; its owner keeps rwx.
            keep = 0 if self.policy.trusted else 0o700
            try:
                _set_mode(fd, (mode & self.policy.mode_mask) | keep, mtime)
            finally:
                os.close(fd)
        if self.root_mode is not None:
            _set_mode(self.root, self.root_mode[0] & self.policy.mode_mask, self.root_mode[1])


def _components(path: bytes) -> list[bytes]:
    """``path``'s names, ``//`` and ``.`` left out (a ``..`` kept: it is never resolved here)."""
    return [c for c in path.split(b"/") if c not in (b"", b".")]


def _is_dir(name: bytes, dfd: int) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dfd).st_mode)
    except OSError:
        return False


def _set_mode(fd: int, mode: int, mtime: float) -> None:
    os.fchmod(fd, mode)
    _utime(fd, mtime)


def _utime(fd: int, mtime: float) -> None:
    try:
        os.utime(fd, (mtime, mtime))
    except (OverflowError, ValueError, OSError):
        pass  # a time the file system cannot hold: the data matters, not the time


def extract(
    read: ts.Read, dst: str | bytes, policy: ts.Policy, own_root: bool = False, source: bytes | None = None
) -> tuple[int, list[ts.Refused]]:
    """Extract the tar stream ``read`` into the existing directory ``dst``.

    Raises ``Refused`` at the first member the policy does not allow; the
    members before it stay, nothing is written outside ``dst``, and the rest
    of the stream is left for the caller to drain.  Members that are merely
    not copied (``Skipped``: a link leading out, a device; ``get()`` only) are
    counted and returned, at most ``SHOWN_SKIPS`` of them.  ``own_root``: the caller just made ``dst``, so the archive's
    root gives it its mode (``dst`` is never chmodded otherwise).  ``source``:
    the absolute guest path of the directory the stream copies; a symlink to
    an absolute path inside it is made relative.
    """
    root = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # dst itself may be a link
    extractor = Extractor(root, policy)
    extractor.own_root = own_root
    extractor.source = None if source is None else _components(source)
    extractor.dst = ts.show(os.fsencode(dst))
    try:
        extractor.extract(ts.Stream(read, policy))
    finally:
        try:
            extractor.finish()
        finally:
            extractor.close()
            os.close(root)
    return extractor.nskipped, extractor.skipped
