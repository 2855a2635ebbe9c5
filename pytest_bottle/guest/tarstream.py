"""Reading a ustar/pax stream for ``untar``: headers, extended headers and
member names, every size checked before it is read; stdlib only, and without
``tarfile``, whose stream reader buffers extended headers of any size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

BLOCK = 512
COPY_CHUNK = 256 * 1024
MAX_PAX = 1 << 20  # bytes of the extended headers of one member
PAX_KEYS = (b"path", b"linkpath", b"size", b"mtime")
MAX_PATH = 4096  # bytes of a member name or link target (PATH_MAX)
MAX_COMPONENT = 255  # bytes of one name component (NAME_MAX)
MAX_DEPTH = 128  # components of a member name: each costs a directory walk step

TRUNCATED = "the archive ends early"
Read = Callable[[int], bytes]  # up to n bytes; b"" only at the end of the stream


class Policy(NamedTuple):
    """What one direction accepts (a NamedTuple: the guest avoids importing dataclasses)."""

    mode_mask: int  # permission bits kept
    trusted: bool  # the host made the archive: links anywhere, existing directory links followed
    max_bytes: int  # file data, headers and extended headers, in bytes
    max_members: int  # headers, extended ones included
    max_tracked: int  # bytes of names kept in memory (files for hard links, directory modes)


# get(): the guest is not trusted. Set-id, sticky and group/other-write bits go.
GET = Policy(mode_mask=0o755, trusted=False, max_bytes=32 << 30, max_members=100_000, max_tracked=64 << 20)
# put(): the host made the archive; modes are kept as given.
PUT = Policy(mode_mask=0o7777, trusted=True, max_bytes=1 << 62, max_members=1 << 62, max_tracked=1 << 62)


class Refused(Exception):
    """A member this policy will not write; ``path`` is its name in the archive."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path!r}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class Skipped(Refused):
    """A member that is not written, but that is safe to continue past: a symlink
    pointing outside, a device, a fifo (``get()`` copies the rest)."""


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

    def count(self, name: bytes) -> None:
        """One more entry: a header (they cost work too: an archive of empty members
        is not free), or a parent directory a member needs that the archive did not list."""
        self.members += 1
        if self.members > self.policy.max_members:
            raise Refused(show(name), f"the archive holds more than the limit of {self.policy.max_members} members")
        self.budget(BLOCK, name)

    def next(self) -> Member | None:
        """The next member, or None at the end of the archive."""
        while self.skip:  # padding, in pieces: never held whole
            self.skip -= len(self.exact(min(self.skip, COPY_CHUNK)))
        pax: dict[bytes, bytes] = {}
        pax_bytes = 0  # of all the extended headers before this member: each is small, a run of them is not
        while True:
            first = self.read(BLOCK)
            if not first:
                return None  # no end marker: the sender stopped (its reply says why)
            block = first + self.exact(BLOCK - len(first)) if len(first) < BLOCK else first
            if block == bytes(BLOCK):
                return None
            self.count(b"")
            _check_header(block)
            kind, size = block[156:157], _number(block[124:136])
            if kind not in (b"x", b"g"):
                break
            pax_bytes += size
            if pax_bytes > MAX_PAX:
                raise Refused("", f"extended headers of {pax_bytes} bytes for one member (the limit is {MAX_PAX})")
            self.budget(size, b"")
            data = self.exact(_padded(size))[:size]
            if kind == b"x":  # a global header ('g') sets nothing we keep; of 'x', only what we read
                pax.update(
                    (k, v) for k, v in _pax_records(data).items() if k in PAX_KEYS or k.startswith(b"GNU.sparse")
                )
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
    if text.strip(b"01234567"):  # int() would also take a sign, "0o" and "_"
        raise Refused("", f"a malformed number in a header: {text!r}")
    return int(text or b"0", 8)


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


def parts(name: bytes, what: str = "member") -> tuple[bytes, ...]:
    """The components of a member name relative to the destination."""
    if not name or len(name) > MAX_PATH or b"\0" in name:
        raise Refused(show(name[:200]), f"an empty, overlong or malformed {what} name")
    if name.startswith(b"/"):
        raise Refused(show(name), f"an absolute {what} name")
    out = tuple(p for p in name.split(b"/") if p not in (b"", b"."))
    if len(out) > MAX_DEPTH:
        raise Refused(show(name[:200]), f"a {what} name deeper than {MAX_DEPTH} components")
    for part in out:
        if part == b"..":
            raise Refused(show(name), f"a {what} name with '..'")
        if len(part) > MAX_COMPONENT:
            raise Refused(show(name), f"a name component longer than {MAX_COMPONENT} bytes")
    return out


def link_stays_inside(name: bytes, where: tuple[bytes, ...], target: bytes) -> None:
    """A symlink target is accepted when it is relative and its '..' components
    all lead: they climb real directories (every parent was walked without
    following links) no higher than the destination, and the rest only descends.
    A '..' after a name is refused, since that name may itself be a symlink."""
    if target.startswith(b"/"):
        raise Skipped(show(name), f"a symlink to an absolute path ({show(target)!r})")
    comps = [c for c in target.split(b"/") if c not in (b"", b".")]
    ups = 0
    while ups < len(comps) and comps[ups] == b"..":
        ups += 1
    if b".." in comps[ups:]:
        raise Skipped(show(name), f"a symlink whose target has '..' after a name ({show(target)!r})")
    if ups > len(where) - 1:
        raise Skipped(show(name), f"a symlink pointing outside the destination ({show(target)!r})")
