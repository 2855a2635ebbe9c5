"""Removing seeds no current key would produce: old image builds, old seed
formats, an older QEMU, or simply superseded by a newer seed of the same shape.

Every ``--bottle-rebuild``, QEMU upgrade or seed format change would otherwise
leave a full seed (150-160 MB) behind.  When a seed is created, the stale
seeds of its image go; ``bottle image prune`` applies the same rule to all.
A seed some clone is starting from (its lock is held shared) is skipped; one
that running clones were restored from is safe to remove, since Linux keeps
unlinked files for the processes that have them open or mapped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images.cache import Image
from .paths import remove_tree, tree_size
from .seeds import SEED_FILES, SEED_VERSION, TMP_PREFIX, Seed, SeedCorrupt, list_seeds, lock_path
from .vmm.accel import qemu_version
from .vmm.qemu import kernel_args

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Removed:
    path: Path
    size: int
    why: str


def outdated(parts: Mapping[str, Any], image: Image | None) -> str | None:
    """Why a seed with these key parts can no longer be produced, or None."""
    if parts.get("seed_version") != SEED_VERSION:
        return f"seed format {parts.get('seed_version')} (now {SEED_VERSION})"
    if image is None:
        return f"image {parts.get('image')!r} is no longer cached"
    if parts.get("image_key") != image.key or parts.get("image_built") != image.manifest.get("created"):
        return f"made from an older build of {image.name}"
    if parts.get("qemu") != qemu_version():
        return f"made by {parts.get('qemu')}"
    if parts.get("kernel_args") != " ".join(kernel_args(str(parts.get("accel")))):
        return "made with an older kernel command line"
    return None


def stale_seeds(cache_dir: Path, images: Mapping[str, Image], only: str | None = None) -> list[tuple[Seed, str]]:
    """Seeds of image ``only`` (all if None) that no current key produces.

    ``images`` maps names to the current cached build.  Of the seeds left
    with the same shape (image, accelerator, memory, cpus, NICs), only the
    newest is current: the others were made with other shared files.
    """
    stale: list[tuple[Seed, str]] = []
    shapes: dict[tuple[Any, ...], list[Seed]] = {}
    for seed in list_seeds(cache_dir):
        parts = seed.manifest["key_parts"]
        if only is not None and parts.get("image") != only:
            continue
        why = outdated(parts, images.get(str(parts.get("image"))))
        if why is not None:
            stale.append((seed, why))
            continue
        shape = tuple(parts.get(k) for k in ("image", "accel", "memory_mb", "cpus", "nics"))
        shapes.setdefault(shape, []).append(seed)
    for group in shapes.values():
        group.sort(key=lambda s: float(s.manifest["created"]), reverse=True)
        stale += [(seed, f"superseded by {group[0].path.name}") for seed in group[1:]]
    return stale


def prune_seeds(cache_dir: Path, images: Mapping[str, Image], only: str | None = None) -> list[Removed]:
    """Remove stale seeds (see ``stale_seeds``), skipping any in use."""
    removed = []
    for seed, why in stale_seeds(cache_dir, images, only):
        size = tree_size(seed.path)
        if try_remove(seed.path):
            log.info("pytest-bottle: removed seed %s (%s)", seed.path.name, why)
            removed.append(Removed(seed.path, size, why))
        else:
            log.debug("seed %s is stale (%s) but in use: left for later", seed.path.name, why)
    return removed


@contextlib.contextmanager
def in_use(seed: Seed) -> Iterator[None]:
    """Hold ``seed`` against pruning while a clone starts from it.

    Once QEMU has opened and mapped the files, removing them is harmless
    (Linux keeps an unlinked file for whoever has it open); before that it
    is not, so a pruner skips a seed whose lock it cannot take at once.
    """
    fd = os.open(lock_path(seed.path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while it is created or discarded
        # Pruned or discarded while we waited?  (A missing memory.ram would
        # even be created, empty, by QEMU.)
        missing = [f for f in SEED_FILES if not (seed.path / f).exists()]
        if missing:
            raise SeedCorrupt(f"seed {seed.path.name} lost {', '.join(missing)} before its clone could start")
        yield
    finally:
        os.close(fd)


def try_remove(seed_path: Path) -> bool:
    """Remove a seed unless someone holds its lock; True if it went."""
    lock = lock_path(seed_path)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a clone is starting from it, or it is being made
        trash = seed_path.with_name(f"{TMP_PREFIX}{seed_path.name}-prune-{os.getpid()}")
        try:
            os.rename(seed_path, trash)
        except FileNotFoundError:
            return False
        remove_tree(trash)
        lock.unlink(missing_ok=True)  # no key produces this seed again
        return True
    finally:
        os.close(fd)
