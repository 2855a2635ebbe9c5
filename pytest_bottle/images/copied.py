"""What ``Image.copy`` reads on the host: the entries of a tree it copies
(what Python and pytest write into a tree while the run goes on, and the
caller's ``exclude`` patterns, left out) and the digest of them that goes
into the image's key."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..arguments import matches_any
from ..errors import SpecError

# What Python and pytest write into a source tree on the host while the run
# goes on (importing, collecting): left out of a copied directory and its key,
# or the tree would change under its Image and fail the build.
COPY_SKIP = ("__pycache__", ".pytest_cache")


def check_exclude(exclude: object) -> tuple[str, ...]:
    """``.copy``'s ``exclude``: names or glob patterns of one name (no ``/``),
    sorted and without repeats (their order changes nothing, nor the key)."""
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
        raise SpecError(f"copy(): exclude must be a list of names or glob patterns, not {exclude!r}")
    patterns = list(exclude)
    for p in patterns:
        if not isinstance(p, str) or not p or "/" in p or "\0" in p:
            raise SpecError(f"copy(): an exclude pattern is a name or a glob pattern of a name (no '/'), not {p!r}")
    return tuple(sorted(set(patterns)))


def tree_digest(path: Path, exclude: tuple[str, ...] = ()) -> str:
    """Hash of what ``.copy`` sends: each entry's relative path, mode and
    bytes (or link target), directories walked in sorted order, what
    ``COPY_SKIP`` and ``exclude`` match left out."""
    h = hashlib.sha256()
    top = Path(os.path.realpath(path))
    if not top.is_dir():  # a file lands as dst/<its name> when dst is a directory:
        # the name given (a link's own, as put() names it), not its target's
        h.update(os.fsencode(f"name\0{path.name}\0"))  # fsencode: a name need not be UTF-8
    for rel, st, entry in _walk(top, "", COPY_SKIP + exclude):
        if isinstance(entry, Path):  # a regular file: read in chunks, not whole
            h.update(os.fsencode(f"{rel}\0{st.st_mode:o}\0{st.st_size}\0"))
            _hash_file(h, entry)
        else:
            h.update(os.fsencode(f"{rel}\0{st.st_mode:o}\0{len(entry)}\0"))
            h.update(entry)
    return h.hexdigest()[:32]


def _hash_file(h: hashlib._Hash, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise SpecError(f"copy(): cannot read {str(path)!r}: {e.strerror}") from None


def _walk(path: Path, rel: str, skip: tuple[str, ...]) -> Iterable[tuple[str, os.stat_result, bytes | Path]]:
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            yield rel, st, os.fsencode(os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            yield rel, st, b""
            for child in sorted(os.listdir(path)):
                if not matches_any(child, skip):
                    yield from _walk(path / child, f"{rel}/{child}", skip)
        elif stat.S_ISREG(st.st_mode):
            yield rel, st, path
        else:
            raise SpecError(f"copy(): {str(path)!r} is not a file, directory or symlink")
    except OSError as e:
        raise SpecError(f"copy(): cannot read {str(path)!r}: {e.strerror}") from None
