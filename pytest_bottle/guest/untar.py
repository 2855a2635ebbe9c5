"""Tar extraction with one policy of our own, shared by the host (``get``) and
the guest agent (``put``); stdlib only, and without ``tarfile``, whose filters
older Pythons lack and whose stream reader buffers headers of any size.

Only regular files, directories, symlinks and hard links to files extracted
earlier by the same stream are written.  Every path is walked component by
component from a descriptor of the destination with ``O_NOFOLLOW``, so no
member is ever written through a symlink or into anything but a real
directory inside the destination; a file or link is written under a
temporary name and renamed over its entry, so an existing link (hard or
symbolic) is replaced, never written through.  Ownership is never changed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import NamedTuple

BLOCK = 512
COPY_CHUNK = 256 * 1024
MAX_PAX = 1 << 20  # bytes of one extended header
MAX_PATH = 4096  # bytes of a member name or link target (PATH_MAX)
MAX_COMPONENT = 255  # bytes of one name component (NAME_MAX)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

TRUNCATED = "the archive ends early"
Read = Callable[[int], bytes]  # up to n bytes; b"" only at the end of the stream


class Policy(NamedTuple):
    """What one direction accepts (a NamedTuple: the guest avoids importing dataclasses)."""

    mode_mask: int  # permission bits kept
    links_anywhere: bool  # a symlink may point anywhere (it is created, never followed)
    max_bytes: int  # file data plus extended headers, in bytes
    max_members: int  # headers, extended ones included


# get(): the guest is not trusted. Set-id and sticky bits go; rwx bits stay.
GET = Policy(mode_mask=0o777, links_anywhere=False, max_bytes=32 << 30, max_members=1_000_000)
# put(): the host made the archive; modes are kept as given.
PUT = Policy(mode_mask=0o7777, links_anywhere=True, max_bytes=1 << 62, max_members=1 << 62)


class Refused(Exception):
    """A member this policy will not write; ``path`` is its name in the archive."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path!r}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class Member(NamedTuple):
    name: bytes
    type: bytes
    mode: int
    size: int
    linkname: bytes
    mtime: float


KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"5": "dir", b"2": "symlink", b"1": "hardlink"}
REFUSED_KINDS = {b"3": "a character device", b"4": "a block device", b"6": "a fifo"}


def show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


class Stream:
    """Headers and data of a ustar/pax stream, every size checked before it is read."""

    def __init__(self, read: Read, policy: Policy) -> None:
        self.source = read
        self.buf = memoryview(b"")  # read in large pieces: a slice per header is cheap, a read is not
        self.policy = policy
        self.members = 0
        self.total = 0
        self.skip = 0  # data of the previous member not consumed

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" only at the end of the stream."""
        if not self.buf:
            self.buf = memoryview(self.source(COPY_CHUNK))
        out, self.buf = self.buf[:n], self.buf[n:]
        return bytes(out)

    def exact(self, n: int, name: bytes = b"") -> bytes:
        parts, left = [], n
        while left:
            data = self.read(min(left, COPY_CHUNK))
            if not data:
                raise Refused(show(name), TRUNCATED)
            parts.append(data)
            left -= len(data)
        return b"".join(parts)

    def budget(self, size: int, name: bytes) -> None:
        self.total += size
        if self.total > self.policy.max_bytes:
            raise Refused(show(name), f"the archive holds more than the limit of {self.policy.max_bytes} bytes")

    def next(self) -> Member | None:
        """The next member, or None at the end of the archive."""
        while self.skip:  # padding, in pieces: never held whole
            self.skip -= len(self.exact(min(self.skip, COPY_CHUNK)))
        pax: dict[bytes, bytes] = {}
        while True:
            first = self.read(BLOCK)
            if not first:
                return None  # no end marker: the sender stopped (its reply says why)
            block = first + self.exact(BLOCK - len(first)) if len(first) < BLOCK else first
            if block == bytes(BLOCK):
                return None
            self.members += 1
            if self.members > self.policy.max_members:
                raise Refused("", f"the archive holds more than the limit of {self.policy.max_members} members")
            _check_header(block)
            kind, size = block[156:157], _number(block[124:136])
            if kind not in (b"x", b"g"):
                break
            if size > MAX_PAX:
                raise Refused("", f"an extended header of {size} bytes (the limit is {MAX_PAX})")
            self.budget(size, b"")
            data = self.exact(_padded(size))[:size]
            if kind == b"x":  # a global header ('g') sets nothing we keep
                pax.update(_pax_records(data))
        name = pax.get(b"path") or _name(block)
        if b"size" in pax:
            size = _decimal(pax[b"size"])
        if any(k.startswith(b"GNU.sparse") for k in pax):
            raise Refused(show(name), "a sparse file")
        mtime: float = _number(block[136:148])
        if b"mtime" in pax:
            try:
                mtime = float(pax[b"mtime"])
            except ValueError:
                raise Refused(show(name), "a malformed mtime") from None
        linkname = pax.get(b"linkpath") or _cstr(block[157:257])
        member = Member(name, kind, _number(block[100:108]), size, linkname, mtime)
        if KINDS.get(kind) == "file":
            self.budget(size, name)
            self.skip = _padded(size)
        return member

    def copy(self, member: Member, fd: int) -> None:
        """Write the member's data to ``fd``."""
        left = member.size
        while left:
            data = self.read(min(left, COPY_CHUNK))
            if not data:
                raise Refused(show(member.name), TRUNCATED)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            left -= len(data)
        self.skip = _padded(member.size) - member.size


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _name(block: bytes) -> bytes:
    name, prefix = _cstr(block[0:100]), _cstr(block[345:500])
    return prefix + b"/" + name if prefix else name


def _check_header(block: bytes) -> None:
    if block[257:262] != b"ustar":
        raise Refused("", "not a ustar or pax archive")
    want = _number(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if want == unsigned:
        return
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b & 0x80)  # old tars
    if want != signed:
        raise Refused("", "a header with a bad checksum")


def _number(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256
        return int.from_bytes(field[1:], "big")
    if field[:1] and field[0] & 0x80:
        raise Refused("", "a negative number in a header")
    text = _cstr(field).strip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise Refused("", f"a malformed number in a header: {text!r}") from None


def _decimal(text: bytes) -> int:
    if not text.isdigit() or len(text) > 20:
        raise Refused("", f"a malformed size in an extended header: {text[:40]!r}")
    return int(text)


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``"<len> <key>=<value>\\n"`` records; ``len`` counts the whole record."""
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.find(b" ", pos, pos + 21)
        if space < 0:
            raise Refused("", "a malformed extended header")
        length = _decimal(data[pos:space])
        record = data[space + 1 : pos + length]
        if pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise Refused("", "a malformed extended header")
        key, value = record[:-1].split(b"=", 1)
        out[key] = value
        pos += length
    return out


def _parts(name: bytes, what: str = "member") -> tuple[bytes, ...]:
    """The components of a member name relative to the destination."""
    if not name or len(name) > MAX_PATH or b"\0" in name:
        raise Refused(show(name[:200]), f"an empty, overlong or malformed {what} name")
    if name.startswith(b"/"):
        raise Refused(show(name), f"an absolute {what} name")
    parts = tuple(p for p in name.split(b"/") if p not in (b"", b"."))
    for part in parts:
        if part == b"..":
            raise Refused(show(name), f"a {what} name with '..'")
        if len(part) > MAX_COMPONENT:
            raise Refused(show(name), f"a name component longer than {MAX_COMPONENT} bytes")
    return parts


def _link_stays_inside(name: bytes, parts: tuple[bytes, ...], target: bytes) -> None:
    """A symlink target is accepted when it is relative and its '..' components
    all lead: they climb real directories (every parent was walked without
    following links) no higher than the destination, and the rest only descends.
    A '..' after a name is refused, since that name may itself be a symlink."""
    if target.startswith(b"/"):
        raise Refused(show(name), f"a symlink to an absolute path ({show(target)!r})")
    comps = [c for c in target.split(b"/") if c not in (b"", b".")]
    ups = 0
    while ups < len(comps) and comps[ups] == b"..":
        ups += 1
    if b".." in comps[ups:]:
        raise Refused(show(name), f"a symlink whose target has '..' after a name ({show(target)!r})")
    if ups > len(parts) - 1:
        raise Refused(show(name), f"a symlink pointing outside the destination ({show(target)!r})")


class Extractor:
    """Writes members under one open destination directory."""

    def __init__(self, root: int, policy: Policy) -> None:
        self.root = root
        self.policy = policy
        self.files: dict[tuple[bytes, ...], tuple[int, int]] = {}  # extracted here: (st_dev, st_ino)
        self.dirs: list[tuple[tuple[bytes, ...], int, float]] = []  # modes set last, deepest first
        self.cached: tuple[tuple[bytes, ...], int] | None = None  # the last parent walked
        self.serial = 0
        self.prefix = b".bottle-%d-%s-" % (os.getpid(), os.urandom(4).hex().encode())

    def close(self) -> None:
        if self.cached is not None:
            os.close(self.cached[1])
            self.cached = None

    def parent(self, name: bytes, parts: tuple[bytes, ...]) -> int:
        """A descriptor of the real directory holding ``parts[-1]`` (owned by the cache)."""
        path = parts[:-1]
        if self.cached is not None and self.cached[0] == path:
            return self.cached[1]
        fd = walk(self.root, path, name, create=True)
        self.close()
        self.cached = (path, fd)
        return fd

    def temp(self) -> bytes:
        """A fresh name (created with O_EXCL or symlink(), never reused)."""
        self.serial += 1
        return b"%s%d.part" % (self.prefix, self.serial)

    def place(self, member: Member, pfd: int, tmp: bytes, last: bytes) -> None:
        try:
            os.rename(tmp, last, src_dir_fd=pfd, dst_dir_fd=pfd)
        except IsADirectoryError:
            os.unlink(tmp, dir_fd=pfd)
            raise Refused(show(member.name), "a directory of that name is in the way") from None
        except BaseException:
            os.unlink(tmp, dir_fd=pfd)
            raise

    def extract(self, stream: Stream) -> None:
        while (member := stream.next()) is not None:
            kind = KINDS.get(member.type)
            if kind is None:
                what = REFUSED_KINDS.get(member.type, f"an unsupported member type {member.type!r}")
                raise Refused(show(member.name), f"{what}: only files, directories and links are copied")
            parts = _parts(member.name)
            if not parts:
                if kind != "dir":
                    raise Refused(show(member.name), "the archive's root is not a directory")
                self.dirs.append(((), member.mode, member.mtime))
                continue
            pfd = self.parent(member.name, parts)
            getattr(self, "put_" + kind)(member, stream, parts, pfd)

    def put_dir(self, member: Member, stream: Stream, parts: tuple[bytes, ...], pfd: int) -> None:
        try:
            os.mkdir(parts[-1], 0o700, dir_fd=pfd)  # writable until its mode is set, last
        except FileExistsError:
            if not stat.S_ISDIR(os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False).st_mode):
                os.unlink(parts[-1], dir_fd=pfd)  # a file or link of that name: replaced, not followed
                os.mkdir(parts[-1], 0o700, dir_fd=pfd)
        self.dirs.append((parts, member.mode, member.mtime))

    def put_file(self, member: Member, stream: Stream, parts: tuple[bytes, ...], pfd: int) -> None:
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
        self.place(member, pfd, tmp, parts[-1])
        self.files[parts] = (st.st_dev, st.st_ino)

    def put_symlink(self, member: Member, stream: Stream, parts: tuple[bytes, ...], pfd: int) -> None:
        target = member.linkname
        if not target or len(target) > MAX_PATH or b"\0" in target:
            raise Refused(show(member.name), "an empty, overlong or malformed symlink target")
        if not self.policy.links_anywhere:
            _link_stays_inside(member.name, parts, target)
        tmp = self.temp()
        os.symlink(target, tmp, dir_fd=pfd)
        self.place(member, pfd, tmp, parts[-1])
        self.files.pop(parts, None)

    def put_hardlink(self, member: Member, stream: Stream, parts: tuple[bytes, ...], pfd: int) -> None:
        """Only to a file this stream wrote (and that is still that file)."""
        target = _parts(member.linkname, "hard link target")
        want = self.files.get(target)
        if want is None:
            raise Refused(show(member.name), f"a hard link to {show(member.linkname)!r}, not a file copied before it")
        tmp = self.temp()
        try:
            tfd = walk(self.root, target[:-1], member.name, create=False)
        except FileNotFoundError:
            raise Refused(show(member.name), f"a hard link to {show(member.linkname)!r}, which is gone") from None
        try:
            os.link(target[-1], tmp, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise Refused(show(member.name), f"a hard link to {show(member.linkname)!r}, which is gone") from None
        finally:
            os.close(tfd)
        st = os.stat(tmp, dir_fd=pfd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != want or not stat.S_ISREG(st.st_mode):
            os.unlink(tmp, dir_fd=pfd)
            raise Refused(show(member.name), f"a hard link to {show(member.linkname)!r}, which was replaced")
        self.place(member, pfd, tmp, parts[-1])
        self.files[parts] = want

    def finish(self) -> None:
        """Directory modes and times, deepest first (a read-only one was writable until now)."""
        for parts, mode, mtime in reversed(self.dirs):
            try:
                fd = walk(self.root, parts, b"", create=False)
            except (OSError, Refused):
                continue  # replaced by a later member: nothing of ours to set
            try:
                os.fchmod(fd, mode & self.policy.mode_mask)
                _utime(fd, mtime)
            finally:
                os.close(fd)


def walk(root: int, path: tuple[bytes, ...], name: bytes, create: bool) -> int:
    """A new descriptor of ``root/path``, every component a real directory (no link followed)."""
    fd = os.dup(root)
    try:
        for part in path:
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)  # a parent the archive did not list
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError:  # ELOOP or ENOTDIR: never followed, never written into
                raise Refused(show(name), f"{show(part)!r} on its path is a symlink or not a directory") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _utime(fd: int, mtime: float) -> None:
    try:
        os.utime(fd, (mtime, mtime))
    except (OverflowError, ValueError, OSError):
        pass  # a time the file system cannot hold: the data matters, not the time


def extract(read: Read, dst: str | bytes, policy: Policy) -> None:
    """Extract the tar stream ``read`` into the existing directory ``dst``.

    Raises ``Refused`` at the first member the policy does not allow; the
    members before it stay, nothing is written outside ``dst``, and the rest
    of the stream is left for the caller to drain.
    """
    root = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # dst itself may be a link
    extractor = Extractor(root, policy)
    try:
        extractor.extract(Stream(read, policy))
    finally:
        try:
            extractor.finish()
        finally:
            extractor.close()
            os.close(root)
