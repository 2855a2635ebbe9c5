"""A seed entry on disk: its files, manifest, checksums, lock and removal.

Everything that touches a seed directory other than creating it goes through
here: ``entry_lock`` is the one way to take a seed's lock, ``remove_entry``
the one way to take a seed away (discard, ``bottle seed rm``, pruning).
Creating seeds is ``seeds``; which seeds are stale is ``seed_gc``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BootError
from ..host.paths import remove_tree, write_private

log = logging.getLogger(__name__)

# 2: guest RAM in its own file; 3: caches kept and warmed, identity placeholders, no announce;
# 4: the disk names its image by a relative path (a moved cache keeps working)
SEED_VERSION = 4
TMP_PREFIX = ".tmp-"
SEED_FILES = ("disk.qcow2", "memory.state", "memory.ram")
CHUNK = 1 << 20
ZERO_CHUNK = hashlib.sha256(bytes(CHUNK)).digest()
STAMP = "verified.json"

_verified: set[tuple[Any, ...]] = set()
_verified_lock = threading.Lock()


class SeedCorrupt(BootError):
    pass


@dataclass(frozen=True)
class Seed:
    path: Path
    manifest: dict[str, Any]

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def memory(self) -> Path:
        """Device state (small): what ``-incoming`` loads."""
        return self.path / "memory.state"

    @property
    def ram(self) -> Path:
        """Guest RAM (sparse): clones map it copy-on-write."""
        return self.path / "memory.ram"

    @property
    def console(self) -> Path:
        return self.path / "console.log"

    @property
    def nic_count(self) -> int:
        return int(self.manifest["key_parts"]["nics"])

    @property
    def nic_names(self) -> tuple[str, ...]:
        """The guest's interface names, in device order (none known: empty)."""
        return tuple(self.manifest.get("nic_names") or ())


def seeds_dir(cache_dir: Path) -> Path:
    return cache_dir / "seeds"


def digest(path: Path) -> str:
    """sha256 over 1 MiB chunk digests, skipping holes.

    A hole and a chunk of written zeros digest alike, so the result depends on
    the content only, while a sparse 512 MB RAM file reads just its data.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        for pos in range(0, size, CHUNK):
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here on
                data_at = size
            if data_at >= min(pos + CHUNK, size):
                h.update(ZERO_CHUNK if size - pos >= CHUNK else hashlib.sha256(bytes(size - pos)).digest())
                continue
            f.seek(pos)
            h.update(hashlib.sha256(f.read(CHUNK)).digest())
    return h.hexdigest()


def signature(path: Path) -> list[Any]:
    """What changes whenever a file is written (ctime cannot be set back)."""
    out: list[Any] = []
    for f in SEED_FILES:
        st = (path / f).stat()
        out += [f, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def verify(seed: Seed) -> None:
    """Raise SeedCorrupt if the files do not match the manifest.

    Sizes are checked on every use.  Checksums are checked when the files
    changed since they were last verified (a stamp of size, mtime, ctime and
    inode in the seed directory), since hashing costs more than a restore.
    """
    files = seed.manifest.get("files", {})
    for name in SEED_FILES:
        want = files.get(name)
        try:
            size = (seed.path / name).stat().st_size
        except OSError as e:
            raise SeedCorrupt(f"seed {seed.path.name}: {name} is missing ({e.strerror})") from None
        if not want or size != want["size"]:
            raise SeedCorrupt(f"seed {seed.path.name}: {name} has {size} bytes, the manifest says {want}")
    sig = signature(seed.path)
    key = (str(seed.path), tuple(sig))
    with _verified_lock:
        if key in _verified:
            return
    try:
        stamped = json.loads((seed.path / STAMP).read_text()) == sig
    except (OSError, ValueError):
        stamped = False
    if not stamped:
        for name in SEED_FILES:
            if digest(seed.path / name) != files[name]["sha256"]:
                raise SeedCorrupt(f"seed {seed.path.name}: {name} does not match its checksum")
        write_stamp(seed.path, sig)
    with _verified_lock:
        _verified.add(key)


def write_stamp(path: Path, sig: list[Any]) -> None:
    try:
        write_private(path / STAMP, json.dumps(sig))
    except OSError as e:  # a read-only cache still works, it just hashes again
        log.debug("cannot stamp seed %s: %s", path.name, e)


def load(path: Path) -> Seed | None:
    try:
        seed = Seed(path, json.loads((path / "manifest.json").read_text()))
        seed.manifest["files"], seed.manifest["key_parts"], seed.manifest["created"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not there, or not a manifest we wrote: rebuilt under the lock
    return seed


def list_seeds(cache_dir: Path) -> list[Seed]:
    root = seeds_dir(cache_dir)
    if not root.is_dir():
        return []
    found = [load(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(TMP_PREFIX)]
    return [s for s in found if s is not None]


def lock_path(seed_path: Path) -> Path:
    """The seed's lock: held exclusively to create, discard or prune it, and
    shared by every clone while its QEMU opens the seed's files."""
    return seed_path.parent / f"{seed_path.name}.lock"


@contextlib.contextmanager
def entry_lock(seed_path: Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold the seed's lock; yields False (holding nothing) if ``wait`` is
    False and someone else holds it.

    A plain flock: ``filelock.FileLock`` on Unix takes the same kind of lock,
    so the creation lock in ``seeds.ensure_seed`` and this one exclude each
    other.  Locks of one process on two descriptors exclude each other too:
    never nest it inside a hold of the same seed's lock.
    """
    fd = os.open(lock_path(seed_path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def remove_entry(seed_path: Path, tag: str, *, forget: bool = False) -> bool:
    """Take the seed away at once (renamed aside, then deleted); the caller
    holds its lock.  ``forget`` also removes the lock file: no key produces
    this seed again.  False if it was already gone."""
    trash = seed_path.with_name(f"{TMP_PREFIX}{seed_path.name}-{tag}-{os.getpid()}")
    try:
        os.rename(seed_path, trash)
    except FileNotFoundError:
        return False
    remove_tree(trash)
    if forget:
        lock_path(seed_path).unlink(missing_ok=True)
    return True


def discard(seed_path: Path, reason: str, created: float | None = None) -> None:
    """Remove a bad seed (only the one found bad: another process may have
    rebuilt it meanwhile), then warn once."""
    with entry_lock(seed_path):
        current = load(seed_path)
        if current is None or (created is not None and current.manifest.get("created") != created):
            return
        remove_entry(seed_path, "discard")
    message = f"pytest-bottle: discarded seed {seed_path.name}, it will be built again: {reason}"
    log.warning("%s", message)
    with warnings.catch_warnings():
        # A self-healing cache is not an error, even under -W error.
        warnings.simplefilter("default")
        warnings.warn(message, stacklevel=3)


@contextlib.contextmanager
def in_use(seed: Seed) -> Iterator[None]:
    """Hold ``seed`` against pruning while a clone starts from it.

    Once QEMU has opened and mapped the files, removing them is harmless
    (Linux keeps an unlinked file for whoever has it open); before that it
    is not, so a pruner skips a seed whose lock it cannot take at once.
    """
    with entry_lock(seed.path, shared=True):  # waits only while it is created or discarded
        # Pruned or discarded while we waited?  (A missing memory.ram would
        # even be created, empty, by QEMU.)
        missing = [f for f in SEED_FILES if not (seed.path / f).exists()]
        if missing:
            raise SeedCorrupt(f"seed {seed.path.name} lost {', '.join(missing)} before its clone could start")
        yield
