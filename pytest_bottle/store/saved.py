"""Saved machine state: a disk layer chain + a memory state + a manifest.

A saved state is a cache entry (see ``entries``) holding ``disk.qcow2`` (the
top layer; its backing chain ends at an image's rootfs), ``memory.state``
(device state, what ``-incoming`` loads), ``memory.ram`` (guest RAM,
sparse; clones map it copy-on-write) and ``manifest.json``: the checksums of
those files, ``key_parts`` (what a restore must match and what it was made
from: image build, QEMU, accelerator, CPU, memory, device layout) and
``rests_on`` (the disk's backing chain and, for a state taken from another,
that parent; paths relative to the entry, so a moved cache keeps working).
Pruning reads both to tell a state whose base has changed or gone.

This module creates (``create``), verifies, loads, lists, guards
(``in_use``) and removes them.  Who uses it:

- A **work seed** (``seeds``) is a state made from a freshly booted image:
  its capture boots the image with the machine's files in the new entry,
  runs the clone steps, and saves; ``rests_on`` names the image.
- A **snapshot of a live bottle** (``snapshots``) is ``create`` with a
  capture that pauses the bottle, puts a fresh overlay on top of its disk
  (the bottle runs on in it), writes its memory into the entry and resumes
  it; the frozen disk becomes the entry's ``disk.qcow2`` (a hard link when
  it is one layer on the seed's disk, else a copy of its layers collapsed
  into one on the seed's).  Its ``key_parts`` are its seed's (a fork needs
  the same machine), and ``RestsOn.on_state(seed, entry)`` records the seed
  and the chain seed disk -> image rootfs.  Forks restore it as clones
  restore a seed.  ``remove_entry`` removes it at ``Snapshot.remove()`` or
  the end of its session (the sweep, when that session died); a kept one
  (``--bottle-save-failed``) stays until ``bottle snapshot rm`` or prune.
- A **derived image's seed** is a work seed whose image is the derived
  image (a disk layer on its parent's): ``seeds.ensure_seed`` unchanged;
  ``key_parts`` name the derived image's key and build, and its disk chain
  is that image's layer(s) down to the base rootfs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import BootError
from ..host.paths import write_json
from ..vmm.forks import ForkSafeLock
from . import entries

log = logging.getLogger(__name__)

# 2: guest RAM in its own file; 3: caches kept and warmed, identity placeholders, no announce;
# 4: the disk names its image by a relative path (a moved cache keeps working)
SEED_VERSION = 4
STATE_FILES = ("disk.qcow2", "memory.state", "memory.ram")
SCRATCH_FILES = ("qemu.log", "qemu.argv")  # what the machine that made it leaves, not part of it
CHUNK = 1 << 20
ZERO_CHUNK = hashlib.sha256(bytes(CHUNK)).digest()
STAMP = "verified.json"

_verified: set[tuple[Any, ...]] = set()
_verified_lock = ForkSafeLock()


class StateCorrupt(BootError):
    pass


@dataclass(frozen=True)
class RestsOn:
    """What a saved state's disk rests on, beyond the image build its
    ``key_parts`` name: when that changes or goes, so does the state."""

    disk_chain: tuple[str, ...] = ()  # backing files of disk.qcow2, nearest first, relative to the entry
    parent: str | None = None  # the state it was taken from, relative to the entry
    parent_created: float | None = None

    @classmethod
    def image_layer(cls, disks: Sequence[Path], entry: Path) -> RestsOn:
        """A state whose disk is one layer on an image's disk (``disks``: it and
        what it rests on, nearest first)."""
        return cls(tuple(os.path.relpath(d, entry) for d in disks))

    @classmethod
    def on_state(cls, parent: SavedState, entry: Path) -> RestsOn:
        """A state whose disk is a new layer on ``parent``'s disk."""
        chain = [os.path.relpath(parent.disk, entry)]
        chain += [os.path.relpath(os.path.normpath(parent.path / p), entry) for p in parent.rests_on.disk_chain]
        return cls(tuple(chain), os.path.relpath(parent.path, entry), parent.created)


@dataclass(frozen=True)
class SavedState:
    """A published saved state: its entry directory and manifest (see the module doc)."""

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
    def kind(self) -> str:
        return str(self.manifest.get("kind", "seed"))

    @property
    def created(self) -> float:
        return float(self.manifest["created"])

    @property
    def nic_count(self) -> int:
        return int(self.manifest["key_parts"]["nics"])

    @property
    def nic_names(self) -> tuple[str, ...]:
        """The guest's interface names, in device order (none known: empty)."""
        return tuple(self.manifest.get("nic_names") or ())

    @property
    def rests_on(self) -> RestsOn:
        r = self.manifest.get("rests_on") or {}  # none in seeds made before states said
        return RestsOn(tuple(r.get("disk_chain", ())), r.get("parent"), r.get("parent_created"))


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
    for f in STATE_FILES:
        st = (path / f).stat()
        out += [f, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def create(
    final: Path,
    capture: Callable[[Path], Mapping[str, Any]],
    key_parts: Mapping[str, Any],
    rests_on: RestsOn,
    *,
    durable: bool = True,
) -> SavedState:
    """Capture a machine's state into a new entry ``final`` and publish it
    whole (replacing what was there); hold ``lock_path(final)``.

    ``capture(tmp)`` leaves the three state files in ``tmp`` (the directory
    that becomes ``final``, at the same depth, so relative backing paths
    stay right) and returns manifest fields of its own.  ``durable``: see
    ``entries.commit``.
    """
    # The user's alone, as the clone's own files are: a snapshot's disk holds its SSH host key.
    with entries.building(final, 0o700) as tmp:
        started = time.monotonic()
        learned = capture(tmp)
        _dig_holes(tmp / "memory.ram")
        for scratch in SCRATCH_FILES:
            (tmp / scratch).unlink(missing_ok=True)
        files = {n: {"size": (tmp / n).stat().st_size, "sha256": digest(tmp / n)} for n in STATE_FILES}
        manifest = {
            **learned,
            "key_parts": dict(key_parts),
            "rests_on": asdict(rests_on),
            "files": files,
            "creation_seconds": round(time.monotonic() - started, 2),
            "created": time.time(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        write_stamp(tmp, signature(tmp))
        entries.commit(tmp, final, durable=durable)
    log.debug("saved state %s created in %.1fs", final.name, manifest["creation_seconds"])
    state = load(final)
    assert state is not None
    return state


def verify(state: SavedState) -> None:
    """Raise StateCorrupt if the files do not match the manifest.

    Sizes are checked on every use.  Checksums are checked when the files
    changed since they were last verified (a stamp of size, mtime, ctime and
    inode in the entry), since hashing costs more than a restore.
    """
    files = state.manifest.get("files", {})
    what = f"{state.kind} {state.path.name}"
    for name in STATE_FILES:
        want = files.get(name)
        try:
            size = (state.path / name).stat().st_size
        except OSError as e:
            raise StateCorrupt(f"{what}: {name} is missing ({e.strerror})") from None
        if not want or size != want["size"]:
            raise StateCorrupt(f"{what}: {name} has {size} bytes, the manifest says {want}")
    sig = signature(state.path)
    key = (str(state.path), tuple(sig))
    with _verified_lock:
        if key in _verified:
            return
    try:
        stamp = json.loads((state.path / STAMP).read_text())
    except (OSError, ValueError):
        stamp = None
    if stamp != sig:
        # Only the files whose part of the stamp changed: a snapshot's disk is
        # a hard link of its source's frozen layer, so the source's close
        # changes its ctime (the link count) and nothing else; hashing that
        # layer again, not the RAM file, keeps the guarantee for less.
        for name in STATE_FILES:
            changed = _stamp_part(stamp, name) != _stamp_part(sig, name)
            if changed and digest(state.path / name) != files[name]["sha256"]:
                raise StateCorrupt(f"{what}: {name} does not match its checksum")
        write_stamp(state.path, sig)
    with _verified_lock:
        _verified.add(key)


def _stamp_part(sig: Any, name: str) -> list[Any] | None:
    """One file's part of a stamp (see ``signature``), None if it has none."""
    if not isinstance(sig, list) or name not in sig:
        return None
    at = sig.index(name)
    return list(sig[at : at + 5])


def write_stamp(path: Path, sig: list[Any]) -> None:
    try:
        write_json(path / STAMP, sig)
    except OSError as e:  # a read-only cache still works, it just hashes again
        log.debug("cannot stamp saved state %s: %s", path.name, e)


def load(path: Path) -> SavedState | None:
    try:
        state = SavedState(path, json.loads((path / "manifest.json").read_text()))
        state.manifest["files"], state.manifest["key_parts"], state.manifest["created"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not there, or not a manifest we wrote: rebuilt under the lock
    return state


def list_states(root: Path) -> list[SavedState]:
    found = [load(p) for p in entries.list_entries(root)]
    return [s for s in found if s is not None]


def list_seeds(cache_dir: Path) -> list[SavedState]:
    return list_states(seeds_dir(cache_dir))


def lock_path(state_path: Path) -> Path:
    """The state's lock: held exclusively to create, discard or prune it, and
    shared by every clone while its QEMU opens the state's files."""
    return state_path.parent / f"{state_path.name}.lock"


def entry_lock(state_path: Path, *, shared: bool = False, wait: bool = True) -> contextlib.AbstractContextManager[bool]:
    """Hold the state's lock (see ``entries.flock``): the creation lock in
    ``seeds.ensure_seed`` and this one exclude each other."""
    return entries.flock(lock_path(state_path), shared=shared, wait=wait)


def remove_entry(state_path: Path, tag: str, *, forget: bool = False) -> bool:
    """Take the state away at once; the caller holds its lock.  ``forget``
    also removes the lock file: no key produces this state again.  False if
    it was already gone."""
    gone = entries.remove(state_path, tag)
    if gone and forget:
        lock_path(state_path).unlink(missing_ok=True)
    return gone


def discard(state: SavedState, reason: str) -> None:
    """Remove a bad state (only the one found bad: another process may have
    made it again meanwhile), then warn once."""
    with entry_lock(state.path):
        current = load(state.path)
        if current is None or current.manifest.get("created") != state.manifest.get("created"):
            return
        remove_entry(state.path, "discard")
    message = f"pytest-bottle: discarded {state.kind} {state.path.name}, it will be built again: {reason}"
    log.warning("%s", message)
    with warnings.catch_warnings():
        # A self-healing cache is not an error, even under -W error.
        warnings.simplefilter("default")
        warnings.warn(message, stacklevel=3)


@contextlib.contextmanager
def in_use(state: SavedState) -> Iterator[None]:
    """Hold ``state`` against pruning while a clone starts from it.

    Once QEMU has opened and mapped the files, removing them is harmless
    (Linux keeps an unlinked file for whoever has it open); before that it
    is not, so a pruner skips a state whose lock it cannot take at once.
    """
    with entry_lock(state.path, shared=True):  # waits only while it is created or discarded
        # Pruned or discarded while we waited?  (A missing memory.ram would
        # even be created, empty, by QEMU.)
        missing = [f for f in STATE_FILES if not (state.path / f).exists()]
        if missing:
            raise StateCorrupt(f"{state.kind} {state.path.name} lost {', '.join(missing)} before its clone could start")
        yield


def _dig_holes(path: Path) -> None:
    """Give the zero pages of a RAM file back to the file system.

    The guest kernel zeroes all free memory at boot (init_on_free), so the
    file is fully written; most of it is zeros that need not take disk space
    or page cache.
    """
    try:
        subprocess.run(["fallocate", "--dig-holes", str(path)], check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:  # only space is lost
        log.debug("fallocate --dig-holes %s: %s", path, e)
