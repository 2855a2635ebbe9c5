"""The cache of derived images: ``<cache>/images/derived-<key>/``.

An entry holds ``disk.qcow2``, a layer whose backing file is the parent's
disk named by a relative path (so the cache moves as a whole), and
``manifest.json``.  It is built in a ``.tmp-`` directory next to it (same
depth: the relative backing name stays right) and published by one rename,
under the same entry lock as recipe images, so one process builds a key and
the others wait and then use it.  A layer records when its parent was built:
a rebuilt parent makes it stale, and it is built again on the new one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from ..errors import HostDependencyError, ImageBuildError
from ..host.locks import reporting_lock
from ..host.paths import cache_root, tree_size
from ..host.progress import task
from ..store import entries
from ..store.gc import remove_seeds, seeds_under_snapshots
from ..store.saved import list_seeds
from . import builder, failures
from .cache import BuiltImage, ensure_image, images_dir, keep_failed_log, last_used, lock_path, mark_used
from .image import Image, count_steps
from .provision import provision

if TYPE_CHECKING:  # spec builds on images
    from ..spec import AccelRequest
    from ..vmm.qemu import Accel

log = logging.getLogger(__name__)

KEEP_FAILED_LOGS = 5
MAX_CHAIN = 64  # layers looked through for staleness: the manifests are ours, but a loop must end


def entry_dir(cache_dir: Path, image: Image) -> Path:
    return images_dir(cache_dir) / f"derived-{image.key}"


def load(path: Path, image: Image, parent: BuiltImage) -> BuiltImage | None:
    """The published entry at ``path`` if it is whole and rests on ``parent`` as built now."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not (path / "disk.qcow2").is_file() or manifest.get("parent_created") != parent.created:
        return None
    return BuiltImage(image.display_name, image.key, path, manifest, parent)


def ensure_derived(
    image: Image,
    cache_dir: Path,
    *,
    rebuild_before: float | None = None,
    progress: builder.Progress | None = None,
    pull: str | None = None,
    accel: AccelRequest = "auto",
) -> BuiltImage:
    """The built ``image`` (an image with steps), its parents first; built
    once across processes if missing, stale or older than ``rebuild_before``.
    ``pull``: see ``cache.ensure_image`` (a published export brings the parents too)."""
    cache_dir = cache_root(cache_dir)
    final = entry_dir(cache_dir, image)
    template = image.pull_url or pull
    pulled = ""
    if template and rebuild_before is None and not (final / "manifest.json").is_file():
        from .pull import pull_missing

        pulled = pull_missing(template, image.display_name, image.key, cache_dir, (final / "manifest.json").is_file)
    parent = ensure_image(
        image.parent, cache_dir, rebuild_before=rebuild_before, progress=progress, pull=pull, accel=accel
    )

    def usable(found: BuiltImage | None) -> bool:
        return found is not None and (rebuild_before is None or found.created >= rebuild_before)

    built = load(final, image, parent)
    if usable(built):
        assert built is not None
        return mark_used(built)
    from ..lifecycle.probe import accel_for  # probe imports images: not at module level

    # The build boots as its bottles will.  Decided before the build: a host
    # without the KVM asked for is no build failure to record for the others.
    booted_with = accel_for(accel, parent.root or parent, cache_dir).accel
    lock = lock_path(cache_dir, final.name)
    lock.parent.mkdir(parents=True, exist_ok=True)
    waiting = time.time_ns()
    with reporting_lock(lock, f"the build of image {image.display_name}"):
        found = load(final, image, parent)
        if usable(found):
            assert found is not None
            return found  # another process built it while we waited
        if (failed := failures.since(final, cache_dir, waiting, image.display_name)) is not None:
            raise failed
        if rebuild_before is not None:
            why = "rebuild requested"
        elif (final / "manifest.json").is_file():  # there, but made on a parent that has been rebuilt since
            why = "outdated: its parent image was rebuilt (about a minute per step that installs packages)"
        else:
            why = "not cached yet (about a minute per step that installs packages)"
        why += f" ({pulled})" if pulled else ""
        with task(f"building image {image.display_name} on {parent.name} ({count_steps(image)})", why) as t:
            try:
                _build(image, parent, cache_dir, final, t.relay(progress), booted_with)
            except ImageBuildError as e:
                if not _rebuilt_since(parent):  # else the build could not end well (its last step reads the parent)
                    failures.record(final, e)
                    raise
            if _rebuilt_since(parent):  # by another process meanwhile: the new layer is a diff of its old disk
                entries.remove(final, "stale")
                raise ImageBuildError(
                    image.display_name,
                    f"its parent image {parent.name} was rebuilt or removed (by another process) while this image "
                    "was built on it: its next use builds it again",
                )
        built = load(final, image, parent)  # under the lock: no rm or prune in between
    if built is None:
        raise ImageBuildError(image.display_name, "the built entry did not load (removed or unreadable)")
    return mark_used(built)


def _rebuilt_since(image: BuiltImage) -> bool:
    """Whether ``image``'s cache entry is no longer the build ``image`` was loaded from."""
    try:
        return float(json.loads((image.path / "manifest.json").read_text()).get("created", 0.0)) != image.created
    except (OSError, ValueError, TypeError, AttributeError):
        return True


def _build(
    image: Image,
    parent: BuiltImage,
    cache_dir: Path,
    final: Path,
    progress: builder.Progress | None,
    accel: Accel,
) -> None:
    """Build into a tmp entry and publish it (the caller holds the lock);
    on failure nothing is published and the build log is kept."""
    started = time.monotonic()
    with entries.building(final) as tmp:
        try:
            has_sshd = provision(image, parent, cache_dir, tmp, progress, accel)
            manifest = _manifest(image, parent, tmp, started, has_sshd)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
            entries.commit(tmp, final)
        except HostDependencyError:
            raise  # the host's to fix, not the image's failure: no failed-build log (tmp goes, with its log)
        except Exception as e:  # not Ctrl-C or a test's timeout: stopped, not failed (no log; tmp goes)
            kept = keep_failed_log(cache_dir, tmp, final.name)
            if isinstance(e, ImageBuildError):
                raise ImageBuildError(e.name, e.reason, e.log_tail, kept) from None
            raise ImageBuildError(image.display_name, f"{type(e).__name__}: {e}", "", kept) from e
    log.debug("built %s (%s) in %.1fs", image.display_name, final.name, time.monotonic() - started)


def _manifest(image: Image, parent: BuiltImage, tmp: Path, started: float, has_sshd: bool) -> dict[str, Any]:
    chain = [image.key]
    node: BuiltImage | None = parent
    while node is not None:
        chain.append(node.key)
        node = node.parent
    disk = tmp / "disk.qcow2"
    return {
        "kind": "derived",
        "name": image.display_name,
        "key": image.key,
        "parent": parent.name,
        "parent_key": parent.key,
        "parent_created": parent.created,
        "root": (parent.root or parent).name,
        "steps": [s.describe() for s in image.steps],
        "sshd": has_sshd,
        "chain": chain,
        "allocated_bytes": disk.stat().st_blocks * 512,
        "build_seconds": round(time.monotonic() - started, 2),
        "created": time.time(),
    }


@dataclass(frozen=True)
class DerivedEntry:
    """A derived image in the cache, as ``bottle image list`` shows it."""

    path: Path
    manifest: dict[str, Any]
    size: int
    last_used: float

    stale: str = ""  # why it can no longer be used (its parent gone or rebuilt), or ""

    @property
    def key(self) -> str:
        return str(self.manifest.get("key", ""))


def list_derived(cache_dir: Path) -> list[DerivedEntry]:
    paths = entries.list_entries(images_dir(cache_dir))
    found = [_entry(cache_dir, p) for p in paths if p.name.startswith("derived-")]
    return [e for e in found if e is not None]


def _entry(cache_dir: Path, path: Path) -> DerivedEntry | None:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return DerivedEntry(path, manifest, tree_size(path), last_used(path, manifest), _stale(cache_dir, manifest))


def _stale(cache_dir: Path, manifest: dict[str, Any], depth: int = 0) -> str:
    """Why a layer rests on nothing usable any more (``load`` would refuse it,
    or its parent, so it is built again), or ""."""
    parent, key = str(manifest.get("parent")), manifest.get("parent_key")
    if not key:
        return ""
    for d in (images_dir(cache_dir) / f"derived-{key}", images_dir(cache_dir) / f"{parent}-{key}"):
        try:
            found = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if found.get("created") != manifest.get("parent_created"):
            return f"its parent {parent} was rebuilt"
        under = _stale(cache_dir, found, depth + 1) if depth < MAX_CHAIN else ""  # a recipe's: no parent_key
        return f"the layer it rests on, {parent}, is stale ({under})" if under else ""
    return f"its parent {parent} is gone"


def prune_derived(cache_dir: Path, older_than_days: float = 0.0) -> list[tuple[Path, int, str]]:
    """Remove derived images not used for ``older_than_days``, or whose parent
    is gone or was rebuilt (with their seeds), unless a kept derived image or a
    snapshot in the cache rests on them; returns what went."""
    found = list_derived(cache_dir)
    cutoff = time.time() - older_than_days * 86400
    keep = {e.key for e in found if e.last_used >= cutoff and not e.stale}
    held = set(seeds_under_snapshots(cache_dir))  # a snapshot's fork needs its seed, and that its image
    # held's paths are normalised: a --cache-dir given as "proj/../cache" must match too
    ours = [s for s in list_seeds(cache_dir) if Path(os.path.normpath(s.path)) in held]
    keep |= {str(s.manifest["key_parts"].get("image_key")) for s in ours}
    for e in found:  # what a kept layer rests on stays too
        if e.key in keep:
            keep.update(str(k) for k in e.manifest.get("chain", []))
    removed = []
    for e in found:
        if e.key in keep:
            continue
        with FileLock(str(lock_path(cache_dir, e.path.name))):
            # Judged again under its lock: a run may have just rebuilt or used it.
            now = _entry(cache_dir, e.path)
            if now is None or (now.last_used >= cutoff and not now.stale):
                continue
            entries.remove(e.path, "prune")
        unused = f"not used for {_duration(time.time() - now.last_used)}"
        why = f"derived image {now.manifest.get('name')}: {now.stale or unused}"
        removed.append((e.path, e.size, why))
        sizes = {s.path: tree_size(s.path) for s in list_seeds(cache_dir)}
        removed += [(p, sizes.get(p, 0), f"seed of {why}") for p in remove_seeds(cache_dir, image_key=e.key)]
    return removed


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} seconds"


def remove_derived(cache_dir: Path, name: str, *, root: bool = False) -> list[Path]:
    """Remove the derived images called ``name`` (their ``.named()`` or shown
    name, ``derived-KEY`` or a key prefix of 8+ characters; with ``root``,
    those built on the recipe image ``name``), the layers that rest on them
    and the seeds of all of those; returns what went."""
    found = list_derived(cache_dir)

    def matches(e: DerivedEntry) -> bool:
        if root:
            return e.manifest.get("root") == name
        return name in (e.manifest.get("name"), e.path.name) or (len(name) >= 8 and e.key.startswith(name))

    gone = {e.key for e in found if matches(e)}
    gone |= {e.key for e in found if gone & {str(k) for k in e.manifest.get("chain", [])}}
    removed: list[Path] = []
    for e in found:
        if e.key in gone:
            with FileLock(str(lock_path(cache_dir, e.path.name))):
                entries.remove(e.path, "rm")
            removed += [e.path, *remove_seeds(cache_dir, image_key=e.key)]
    return removed
