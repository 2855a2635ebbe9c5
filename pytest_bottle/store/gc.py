"""Removing seeds no current key would produce: old image builds, old seed
formats, an older QEMU, or simply superseded by a newer seed of the same shape.

Every ``--bottle-rebuild``, QEMU upgrade or seed format change would otherwise
leave a full seed (150-160 MB) behind.  When a seed is created, the stale
seeds of its image go; ``bottle image prune`` applies the same rule to all.
A seed some clone is starting from (its lock is held shared) is skipped; one
that running clones were restored from is safe to remove, since Linux keeps
unlinked files for the processes that have them open or mapped.  A seed that
a snapshot under ``<cache>/snapshots`` rests on (its manifest names it as its
parent) is kept, whatever the snapshot's state (a live session's, a kept one,
an orphaned or stale one): its disk is the snapshot's base, and without it
the snapshot cannot be forked.  Once ``Snapshot.remove()``, the end of the
session, the sweep or ``bottle snapshot rm``/``prune`` has removed the last
such snapshot, the next prune frees the seed.  Removal
is ``saved.remove_entry`` (the entries' put-aside-then-delete) under the
state's lock, as everywhere else.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..host.paths import tree_size
from ..images.cache import BuiltImage, last_used
from ..vmm.accel import qemu_version
from ..vmm.qemu import cpu_model, kernel_args
from . import entries
from .saved import SEED_VERSION, SavedState, entry_lock, list_seeds, load, remove_entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Removed:
    path: Path
    size: int
    why: str


def outdated(state: SavedState, image: BuiltImage | None) -> str | None:
    """Why a seed can no longer be produced, or None (``image`` is the current
    build of the image it rests on)."""
    parts, base = state.manifest["key_parts"], state.rests_on
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
    if parts.get("cpu") != cpu_model(str(parts.get("accel"))):
        return f"made for CPU model {parts.get('cpu')}"
    for backing in base.disk_chain:
        if not (state.path / backing).exists():
            return f"its disk rests on {backing}, which is gone"
    if base.parent is not None:
        parent = load(state.path / base.parent)
        if parent is None or parent.manifest.get("created") != base.parent_created:
            return f"the state it was taken from ({base.parent}) is gone or was made again"
    return None


def stale_seeds(
    cache_dir: Path, images: Mapping[str, BuiltImage], only: str | None = None, any_cached: bool = False
) -> list[tuple[SavedState, str]]:
    """Seeds of image ``only`` (all if None) that no current key produces.

    ``images`` maps names to the current cached build.  Of the seeds left
    with the same shape (image, accelerator, memory, cpus, NICs, build seed or not), only the
    newest is current: the others were made with other shared files.
    """
    stale: list[tuple[SavedState, str]] = []
    shapes: dict[tuple[Any, ...], list[SavedState]] = {}
    for seed in list_seeds(cache_dir):
        parts = seed.manifest["key_parts"]
        if only is not None and parts.get("image") != only:
            continue
        image = images.get(str(parts.get("image")))
        if image is None or image.key != parts.get("image_key"):
            # Another key of the name, in use: another checkout's image in a
            # shared cache, not an older build to clear away.
            image = _cached_build(cache_dir, parts, None if any_cached else OTHER_KEY_USED_DAYS) or image
        why = outdated(seed, image)
        if why is not None:
            stale.append((seed, why))
            continue
        shape = tuple(parts.get(k) for k in ("image", "image_key", "accel", "memory_mb", "cpus", "nics", "purpose"))
        shapes.setdefault(shape, []).append(seed)
    for group in shapes.values():
        group.sort(key=lambda s: s.created, reverse=True)
        stale += [(seed, f"superseded by {group[0].path.name}") for seed in group[1:]]
    return stale


OTHER_KEY_USED_DAYS = 1.0  # a seed of another key of a name stays while its image is in use


def _cached_build(cache_dir: Path, parts: Mapping[str, Any], used_within: float | None) -> BuiltImage | None:
    """The cached image (a recipe's entry or a derived layer) of the key a seed
    was made from, if used within ``used_within`` days (None: at all): another
    checkout's or plugin version's image of the same name in a shared cache.
    An edited image's old key is not used any more: its seed goes."""
    name, key = str(parts.get("image")), str(parts.get("image_key"))
    for entry in (f"{name}-{key}", f"derived-{key}"):
        path = cache_dir / "images" / entry
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(manifest, dict) or manifest.get("key") != key:
            continue
        if used_within is not None and time.time() - last_used(path, manifest) > used_within * 86400:
            return None
        return BuiltImage(name, key, path, manifest)
    return None


def prune_seeds(
    cache_dir: Path, images: Mapping[str, BuiltImage], only: str | None = None, any_cached: bool = False
) -> list[Removed]:
    """Remove stale seeds (see ``stale_seeds``), skipping any in use or under a snapshot.
    ``any_cached``: a seed of any image key still cached is current (``bottle image
    prune`` has just judged the images themselves)."""
    removed = []
    held = seeds_under_snapshots(cache_dir)
    for seed, why in stale_seeds(cache_dir, images, only, any_cached):
        holder = held.get(Path(os.path.normpath(seed.path)))
        if holder is not None:
            log.debug("seed %s is stale (%s) but snapshot %s rests on it: kept", seed.path.name, why, holder)
            continue
        size = tree_size(seed.path)
        if _try_remove(seed.path):
            log.info("pytest-bottle: removed seed %s (%s)", seed.path.name, why)
            removed.append(Removed(seed.path, size, why))
        else:
            log.debug("seed %s is stale (%s) but in use: left for later", seed.path.name, why)
    return removed


def seeds_under_snapshots(cache_dir: Path) -> dict[Path, str]:
    """The seeds that snapshots in ``cache_dir`` rest on, each with one such snapshot's name."""
    held: dict[Path, str] = {}
    for d in entries.list_entries(cache_dir / "snapshots"):
        state = load(d)
        parent = state.rests_on.parent if state is not None else None
        if parent:
            held.setdefault(Path(os.path.normpath(d / parent)), d.name)
    return held


def _try_remove(seed_path: Path) -> bool:
    """Remove a seed unless someone holds its lock; True if it went."""
    try:
        with entry_lock(seed_path, wait=False) as held:
            # Not held: a clone is starting from it, or it is being made.
            return held and remove_entry(seed_path, "prune", forget=True)
    except OSError as e:  # e.g. a read-only cache: pruning is only housekeeping
        log.debug("cannot prune seed %s: %s", seed_path.name, e)
        return False


def remove_seeds(cache_dir: Path, image_name: str | None = None, image_key: str | None = None) -> list[Path]:
    """Remove the seeds of ``image_name`` (all images if None), or of the
    image build ``image_key``; waits for clones starting from them."""
    removed = []
    for seed in list_seeds(cache_dir):
        parts = seed.manifest["key_parts"]
        if image_name is not None and parts["image"] != image_name:
            continue
        if image_key is not None and parts.get("image_key") != image_key:
            continue
        with entry_lock(seed.path):
            remove_entry(seed.path, "discard", forget=True)
        removed.append(seed.path)
    return removed
