"""The export file format: one gzip'd tar whose first member is a manifest.

``bottle-export.json`` lists the images it carries (bottom of the chain
first: a recipe image, then each derived layer on it) and every other member
with its size and sha256, in the order they follow.  Members are files of
cache entries, named as in the cache: ``images/<entry>/<file>``.

The file is untrusted input.  Reading it (``unpack``) never calls
``tarfile``'s extraction: each member must be the next one the manifest
lists, a regular file, of the listed size (bounded), with a plain name from
a fixed set; it is written by us into a private directory, holes kept, and
its sha256 must match.  Anything else raises ``ImageImportError``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import BottleError, ImageImportError

FORMAT = "pytest-bottle-image-export"
VERSION = 1
MANIFEST = "bottle-export.json"
MAX_MANIFEST = 1 << 20
MAX_MEMBERS = 64
MAX_MEMBER_BYTES = 64 << 30  # a raw rootfs is a few GB; nothing we write is near this
MAX_TOTAL_BYTES = 64 << 30  # all members together
CHUNK = 1 << 20
# The largest single read tarfile may make of the decompressed stream: member
# data is read in CHUNKs (through a small buffer), headers in 512-byte blocks.
# A pax or GNU long-name header body is read in one go: this bounds it.
MAX_READ = CHUNK + (64 << 10)
MAX_PAX = 64 << 10  # the pax headers of one member, all together
MIN_FREE = 256 << 20  # an import stops before it leaves less free space than this
_ZEROS = bytes(CHUNK)
# What an image entry may hold (recipe image / derived layer); the first ones are required.
RECIPE_FILES = ("manifest.json", "rootfs.ext4", "vmlinuz", "initrd.img", "kernel-version", "build.log")
DERIVED_FILES = ("manifest.json", "disk.qcow2", "build.log")
REQUIRED = {"recipe": RECIPE_FILES[:4], "derived": DERIVED_FILES[:2]}
ALLOWED = {"recipe": RECIPE_FILES, "derived": DERIVED_FILES}
_ENTRY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageRef:
    """One image of an export: its cache entry, kind, name and key."""

    entry: str
    kind: str  # "recipe" | "derived"
    name: str
    key: str
    parent: str | None = None  # the entry it rests on (derived)

    def to_dict(self) -> dict[str, Any]:
        return {"entry": self.entry, "kind": self.kind, "name": self.name, "key": self.key, "parent": self.parent}


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    sha256: str


def entry_name(kind: str, name: str, key: str) -> str:
    """The cache entry an image of this kind, name and key lives in."""
    return f"derived-{key}" if kind == "derived" else f"{name}-{key}"


def check_member_name(name: object, images: dict[str, ImageRef]) -> str:
    """``name`` if it is ``images/<entry>/<file>`` of a listed entry and a file
    that kind of entry holds; raises otherwise (absolute, ``..``, odd names)."""
    if not isinstance(name, str) or not name.isascii():
        raise ImageImportError("the export", f"a member name is not a plain ASCII path: {name!r}")
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "images" or not _ENTRY_RE.fullmatch(parts[1]):
        raise ImageImportError("the export", f"member {name!r} is not images/<entry>/<file>")
    ref = images.get(parts[1])
    if ref is None:
        raise ImageImportError("the export", f"member {name!r} belongs to no image the manifest lists")
    if parts[2] not in ALLOWED[ref.kind]:
        raise ImageImportError("the export", f"member {name!r}: a {ref.kind} image holds no {parts[2]!r}")
    return name


def parse_manifest(raw: bytes) -> tuple[list[ImageRef], list[Member]]:
    """The images (bottom first) and members an export manifest lists, all checked."""
    bad = "the export"
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise ImageImportError(bad, f"its manifest is not JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ImageImportError(bad, "not a pytest-bottle image export (no manifest of that format)")
    if m.get("version") != VERSION:
        raise ImageImportError(bad, f"export format version {m.get('version')!r}; this version reads {VERSION}")
    images: list[ImageRef] = []
    for i in _list(m, "images", 16):
        ref = _image(i, images[-1].entry if images else None)
        images.append(ref)
    if not images:
        raise ImageImportError(bad, "the manifest lists no image")
    by_entry = {r.entry: r for r in images}
    if len(by_entry) != len(images):
        raise ImageImportError(bad, "the manifest lists an image twice")
    members: list[Member] = []
    for d in _list(m, "members", MAX_MEMBERS):
        if not isinstance(d, dict):
            raise ImageImportError(bad, f"a member entry is not an object: {d!r}")
        name = check_member_name(d.get("name"), by_entry)
        size, sha = d.get("size"), d.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_MEMBER_BYTES:
            raise ImageImportError(bad, f"member {name}: bad size {size!r}")
        if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
            raise ImageImportError(bad, f"member {name}: bad sha256 {sha!r}")
        members.append(Member(name, size, sha))
    names = [x.name for x in members]
    if len(set(names)) != len(names):
        raise ImageImportError(bad, "the manifest lists a member twice")
    if sum(x.size for x in members) > MAX_TOTAL_BYTES:
        raise ImageImportError(bad, f"its members add up to more than {MAX_TOTAL_BYTES >> 30} GiB")
    for ref in images:
        missing = [f for f in REQUIRED[ref.kind] if f"images/{ref.entry}/{f}" not in names]
        if missing:
            raise ImageImportError(bad, f"image {ref.entry} lacks {', '.join(missing)}")
    return images, members


def _list(m: dict[str, Any], field: str, most: int) -> list[Any]:
    value = m.get(field)
    if not isinstance(value, list) or len(value) > most:
        raise ImageImportError("the export", f"the manifest's {field!r} is not a list of at most {most}")
    return value


def _image(d: Any, below: str | None) -> ImageRef:
    bad = "the export"
    if not isinstance(d, dict):
        raise ImageImportError(bad, f"an image entry is not an object: {d!r}")
    kind, name, key = d.get("kind"), d.get("name"), d.get("key")
    if kind not in ("recipe", "derived") or (kind == "recipe") != (below is None):
        raise ImageImportError(bad, f"image {name!r}: a chain is one recipe image, then derived ones ({kind!r})")
    if not (isinstance(name, str) and _ENTRY_RE.fullmatch(name) and isinstance(key, str) and _KEY_RE.fullmatch(key)):
        raise ImageImportError(bad, f"image entry with a bad name or key: {name!r} {key!r}")
    if kind == "recipe" and name.startswith("derived"):
        raise ImageImportError(bad, f"a recipe image may not be named {name!r} (derived images' entries are)")
    entry = entry_name(kind, name, key)
    if d.get("entry") != entry or d.get("parent") != below:
        raise ImageImportError(bad, f"image {name}: entry {d.get('entry')!r} on {d.get('parent')!r} is not {entry}")
    return ImageRef(entry, kind, name, key, below)


def make_manifest(images: list[ImageRef], members: list[Member], extra: dict[str, Any]) -> bytes:
    body = {
        "format": FORMAT,
        "version": VERSION,
        **extra,
        "images": [r.to_dict() for r in images],
        "members": [{"name": x.name, "size": x.size, "sha256": x.sha256} for x in members],
    }
    return json.dumps(body, indent=1, sort_keys=True).encode()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _Hashing:
    """A file object that hashes what passes through it (read or written)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.h, self.count = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        self.count += len(data)
        return data

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.count += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_archive(out: IO[bytes], manifest: bytes, files: list[tuple[Member, Path]], progress: Progress) -> str:
    """Write the export to ``out``; returns the sha256 of the whole file.  A
    file whose bytes differ from its listed sha256 (changed meanwhile) fails."""
    hashed = _Hashing(out)
    with gzip.GzipFile(fileobj=hashed, mode="wb", compresslevel=1, mtime=0) as gz:
        with tarfile.TarFile(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tar:
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode = len(manifest), 0o644
            tar.addfile(info, _BytesReader(manifest))
            for member, path in files:
                progress(f"{member.name} ({member.size / 1e6:.0f} MB)")
                info = tarfile.TarInfo(member.name)
                info.size, info.mode = member.size, 0o644
                with open(path, "rb") as f:
                    src = _Hashing(f)
                    tar.addfile(info, src)
                if src.h.hexdigest() != member.sha256 or src.count != member.size:
                    raise OSError(f"{path} changed while it was exported")
    return hashed.h.hexdigest()


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return out


class _Bounded:
    """The decompressed export for ``tarfile``: refuses any read larger than
    ``MAX_READ`` (a huge pax or long-name header) and any backward seek."""

    def __init__(self, f: gzip.GzipFile) -> None:
        self.f = f

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > MAX_READ:
            raise ImageImportError("the export", f"a tar header or read of {n} bytes (more than {MAX_READ})")
        return self.f.read(n)

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self.f.tell():
            raise ImageImportError("the export", "its members are not in order (a backward seek)")
        return self.f.seek(pos)

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        raise io.UnsupportedOperation("write")

    def close(self) -> None:
        pass


def check_space(dest: Path, need: int = 0) -> None:
    """Refuse to go on if ``dest``'s file system would keep less than ``MIN_FREE`` free."""
    st = os.statvfs(dest)
    free = st.f_bavail * st.f_frsize
    if free < need + MIN_FREE:
        raise ImageImportError("the export", f"only {free >> 20} MiB free in {dest}; the import needs more")


def unpack(
    path: Path, dest: Path, progress: Progress, sha256: str | None = None
) -> tuple[list[ImageRef], list[Member]]:
    """Read the export at ``path`` into ``dest`` (an empty private directory),
    checking everything; returns what its manifest lists.  ``sha256``: the
    whole file must have it (hashed from the same open file as it is read)."""
    check_space(dest)
    try:
        with open(path, "rb") as f:
            raw = _Hashing(f)
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz, tarfile.TarFile(fileobj=_Bounded(gz), mode="r") as tar:
                got = _unpack(tar, dest, progress)
            while raw.read(CHUNK):
                pass
    except BottleError:  # our own refusals (and a SpecError is a ValueError)
        raise
    # tarfile reads a chain of extension headers by recursion, and may trip on
    # a forged number or name: an export from a URL is anyone's.
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, RecursionError, ValueError, OverflowError) as e:
        raise ImageImportError("the export", f"damaged, truncated or forged ({type(e).__name__}: {e})") from None
    if sha256 is not None and raw.h.hexdigest() != sha256.lower():
        raise ImageImportError("the export", f"its sha256 is {raw.h.hexdigest()}, not {sha256}")
    return got


def _check_header(info: tarfile.TarInfo) -> tarfile.TarInfo:
    pax = sum(len(k) + len(v) for k, v in info.pax_headers.items())
    if pax > MAX_PAX or len(info.name) > 512 or info.sparse is not None:
        raise ImageImportError("the export", "a member with an oversized or sparse tar header")
    return info


def _unpack(tar: tarfile.TarFile, dest: Path, progress: Progress) -> tuple[list[ImageRef], list[Member]]:
    members = _members(tar)
    first = next(members, None)
    if first is None or first.name != MANIFEST or not first.isreg() or first.size > MAX_MANIFEST:
        raise ImageImportError("the export", f"its first member is not a {MANIFEST} of at most 1 MB")
    raw = _read_all(tar, first)
    images, listed = parse_manifest(raw)
    for want in listed:
        got = next(members, None)
        if got is None:
            raise ImageImportError("the export", f"it ends before {want.name}")
        if got.name != want.name:
            raise ImageImportError("the export", f"member {got.name!r} where the manifest lists {want.name!r}")
        if not got.isreg():
            raise ImageImportError("the export", f"member {got.name} is not a regular file (a link or device?)")
        if got.size != want.size:
            raise ImageImportError("the export", f"member {got.name}: {got.size} bytes, listed {want.size}")
        progress(f"{want.name} ({want.size / 1e6:.0f} MB)")
        target = dest / want.name
        for d in reversed(target.relative_to(dest).parents[:-1]):
            (dest / d).mkdir(mode=0o700, exist_ok=True)
        digest = _write_sparse(tar, got, target, dest)
        if digest != want.sha256:
            raise ImageImportError("the export", f"member {want.name} does not match its sha256 (tampered or damaged)")
    extra = next(members, None)
    if extra is not None:
        raise ImageImportError("the export", f"member {extra.name!r} is not in the manifest")
    return images, listed


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (info := tar.next()) is not None:
        yield _check_header(info)


def _read_all(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    assert f is not None
    data = f.read(info.size)
    if len(data) != info.size:
        raise ImageImportError("the export", f"member {info.name} is truncated")
    return data


def _write_sparse(tar: tarfile.TarFile, info: tarfile.TarInfo, target: Path, dest: Path) -> str:
    """Copy a member to a new private file of ours (no links followed),
    leaving holes for zero chunks and keeping ``MIN_FREE``; returns its sha256."""
    src = tar.extractfile(info)
    assert src is not None
    h = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        left, written = info.size, 0
        while left:
            chunk = src.read(min(CHUNK, left))
            if not chunk:
                raise ImageImportError("the export", f"member {info.name} is truncated")
            h.update(chunk)
            left -= len(chunk)
            if chunk == _ZEROS[: len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
                written += len(chunk)
                if written >= 256 * CHUNK:
                    check_space(dest)
                    written = 0
        out.truncate(info.size)
    return h.hexdigest()
