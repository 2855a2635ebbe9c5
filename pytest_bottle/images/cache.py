"""The content-addressed image cache: ``<cache>/images/<name>-<key>/``.

An entry counts as built only once its directory has been renamed into
place (``store.entries``), and the rename happens after ``manifest.json`` is
written inside it, so a killed build never leaves something a later run
mistakes for an image.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from ..errors import HostDependencyError, ImageBuildError, SpecError
from ..host.locks import reporting_lock
from ..host.paths import cache_root, remove_tree
from ..host.progress import task, work
from ..store import entries
from ..vmm.qemu import DiskFormat
from . import builder, failures
from .image import Image, lookup
from .recipes import RECIPES, Recipe, get_recipe

if TYPE_CHECKING:  # spec builds on images
    from ..spec import AccelRequest

USED_STAMP = "last-used"  # in an image's cache entry: touched at each use

log = logging.getLogger(__name__)

KEEP_FAILED_LOGS = 5  # per image entry: enough to compare, not a pile


@dataclass(frozen=True)
class BuiltImage:
    """A built image in the cache: a recipe's (raw root file system, kernel,
    initrd) or a derived image's (a qcow2 layer on its ``parent``'s disk,
    booted with the kernel and initrd of the recipe image at the bottom)."""

    name: str
    key: str
    path: Path
    manifest: dict[str, Any] = field(repr=False)  # every package's version: too long to show
    parent: BuiltImage | None = field(default=None, repr=False)

    @property
    def root(self) -> BuiltImage | None:
        """The recipe image at the bottom of a derived image's chain (None for a recipe image)."""
        if self.parent is None:
            return None
        return self.parent.root or self.parent

    @property
    def disk_chain(self) -> tuple[Path, ...]:
        """The disk and every file under it, nearest first."""
        return (self.disk, *(self.parent.disk_chain if self.parent is not None else ()))

    @property
    def rootfs(self) -> Path:
        """The raw root file system: a derived image's is its base's, under its layers (``disk``)."""
        return self.root.rootfs if self.root is not None else self.path / "rootfs.ext4"

    @property
    def disk(self) -> Path:
        """What a machine of this image boots on (under its own overlay)."""
        return self.path / "disk.qcow2" if self.root is not None else self.path / "rootfs.ext4"

    @property
    def disk_format(self) -> DiskFormat:
        return "qcow2" if self.root is not None else "raw"

    @property
    def kernel(self) -> Path:
        return self.root.kernel if self.root is not None else self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.root.initrd if self.root is not None else self.path / "initrd.img"

    @property
    def created(self) -> float:
        return float(self.manifest.get("created", 0.0))

    @property
    def has_sshd(self) -> bool:
        """Whether its bottles get SSH: the recipe's openssh-server, or one a derived image's steps installed."""
        return self.recipe.has_sshd if self.parent is None else bool(self.manifest.get("sshd"))

    @property
    def recipe(self) -> Recipe:
        """The recipe at the bottom of the chain (what the kernel and the suite come from)."""
        return self.root.recipe if self.root is not None else get_recipe(self.name)


def images_dir(cache_dir: Path) -> Path:
    return cache_dir / "images"


def entry_dir(cache_dir: Path, recipe: Recipe) -> Path:
    return images_dir(cache_dir) / f"{recipe.name}-{recipe.key()}"


def lock_path(cache_dir: Path, entry: str) -> Path:
    """Held to build, replace or remove the entry ``entry``."""
    return cache_dir / "locks" / f"image-{entry}.lock"


def _load(path: Path) -> BuiltImage | None:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not all((path / f).is_file() for f in ("rootfs.ext4", "vmlinuz", "initrd.img")):
        return None
    return BuiltImage(manifest["name"], manifest["key"], path, manifest)


def find_image(name: str, cache_dir: Path) -> BuiltImage | None:
    """The cached image for the current recipe of ``name``, or None.  No locking: fast."""
    return _load(entry_dir(cache_dir, get_recipe(name)))


def ensure_image(
    image: str | Image,
    cache_dir: str | os.PathLike[str],
    *,
    rebuild_before: float | None = None,
    progress: builder.Progress | None = None,
    pull: str | None = None,
    accel: AccelRequest = "auto",
) -> BuiltImage:
    """Return the cached image (a registered name or an ``Image``), building
    it once across processes if needed; a derived image's parents first.

    ``pull``: a URL template (``images.pull``) to fetch a missing image from
    before building it; a recipe's or ``Image``'s own ``pull_url`` comes first.

    ``rebuild_before``: an entry created before this time is rebuilt (how
    ``--rebuild`` works under xdist: the first worker rebuilds, the others
    then find an entry newer than the run's start and reuse it).

    ``accel``: what a derived image's build boots with (as for the bottles
    that asked for it: ``tcg`` does not probe KVM).
    """
    if not isinstance(image, (str, Image)):
        raise SpecError(f"image must be an image name or an Image, not {image!r}", "ensure_image()")
    cache_dir = Path(cache_dir)
    target = lookup(image) if isinstance(image, str) else image
    if isinstance(target, Image):
        target = target.resolved()
    if isinstance(target, Image):
        from .derived import ensure_derived  # derived builds on this module

        return ensure_derived(
            target, cache_dir, rebuild_before=rebuild_before, progress=progress, pull=pull, accel=accel
        )
    return mark_used(_ensure_recipe(target, cache_dir, rebuild_before, progress, pull))


def mark_used(built: BuiltImage) -> BuiltImage:
    """Stamp the entry as used now (what prune and the seeds of another key go by)."""
    try:
        (built.path / USED_STAMP).touch()
    except OSError:  # a read-only cache: the stamp is only housekeeping
        pass
    return built


def last_used(path: Path, manifest: dict[str, Any]) -> float:
    """When the entry at ``path`` was last used: its stamp, else its build."""
    try:
        return (path / USED_STAMP).stat().st_mtime
    except OSError:  # built before stamps were kept, or being removed
        return float(manifest.get("created", 0.0))


def _ensure_recipe(
    name: str, cache_dir: Path, rebuild_before: float | None, progress: builder.Progress | None, pull: str | None
) -> BuiltImage:
    recipe = get_recipe(name)
    final = entry_dir(cache_root(cache_dir), recipe)
    built = _load(final)
    if built and (rebuild_before is None or built.created >= rebuild_before):
        return built
    pulled = ""
    if (recipe.pull_url or pull) and built is None and rebuild_before is None:
        from .pull import pull_missing  # pull builds on this module

        pulled = pull_missing(str(recipe.pull_url or pull), name, recipe.key(), cache_dir, lambda: bool(_load(final)))
        if not pulled and (built := _load(final)) is not None:
            return built
    lock = lock_path(cache_dir, final.name)
    lock.parent.mkdir(parents=True, exist_ok=True)
    waiting = time.time_ns()
    with reporting_lock(lock, f"the build of image {name}"):
        built = _load(final)
        if built and (rebuild_before is None or built.created >= rebuild_before):
            return built  # another process built it while we waited
        if (failed := failures.since(final, cache_dir, waiting, name)) is not None:
            raise failed
        why = _why_build(name, final, built) + (f" ({pulled})" if pulled else "")
        with entries.building(final) as tmp:  # stale ones of dead builds go first: we hold the lock
            try:
                with work():  # until it is committed (pytest-timeout's pause)
                    with task(f"building image {name} (key {recipe.key()})", why) as t:
                        manifest = builder.build(recipe, tmp, t.relay(progress))
                    remove_tree(tmp / ".work")
                    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
                    entries.commit(tmp, final)
            except HostDependencyError:
                raise  # the host's to fix, not the image's failure: no failed-build log (tmp goes, with its log)
            except Exception as e:  # not Ctrl-C or a test's timeout: stopped, not failed (no log; tmp goes)
                kept_log = keep_failed_log(cache_dir, tmp, final.name)
                failed = (  # pointing at the log where it now lives
                    ImageBuildError(e.name, e.reason, e.log_tail, kept_log)
                    if isinstance(e, ImageBuildError)
                    else ImageBuildError(name, f"{type(e).__name__}: {e}", "", kept_log)
                )
                failures.record(final, failed)
                raise failed from (None if isinstance(e, ImageBuildError) else e)
        log.debug("built %s in %.1fs", final.name, manifest["build_seconds"])
        loaded = _load(final)
        assert loaded is not None
        return loaded


def _why_build(name: str, final: Path, found: BuiltImage | None) -> str:
    """Why the entry ``final`` is being built, for the progress line."""
    if found is not None:
        return "rebuild requested"
    others = (
        p for p in final.parent.glob(f"{name}-*") if p != final and p.is_dir() and "-" not in p.name[len(name) + 1 :]
    )
    if any(others):
        return "outdated: its recipe or the builder changed; first build of this version (minutes)"
    return "not cached yet; the first build takes minutes"


def keep_failed_log(cache_dir: Path, tmp: Path, entry: str) -> str | None:
    """Move a failed build's log out of its tmp entry into ``logs/`` (the newest few per entry stay)."""
    src = tmp / "build.log"
    if not src.is_file():
        return None
    logs = cache_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    dst = logs / f"{entry}-failed-{time.time_ns()}.log"
    os.replace(src, dst)
    prune_logs(cache_dir, entry)
    return str(dst)


def prune_logs(cache_dir: Path, entry: str | None = None, keep: int = KEEP_FAILED_LOGS) -> list[tuple[Path, int]]:
    """Keep the newest ``keep`` failed-build logs per image entry (of ``entry``,
    or of all); logs of entries no current recipe builds go.  Returns what
    was removed, with sizes."""
    logs = cache_dir / "logs"
    if not logs.is_dir():
        return []
    current = {f"{r.name}-{r.key()}" for r in RECIPES.values()}
    cached = {i.name for i in list_images(cache_dir)}
    groups: dict[str, list[tuple[float, Path, int]]] = {}
    for path in logs.glob("*-failed-*.log"):
        name = path.name.rsplit("-failed-", 1)[0]
        if entry is not None and name != entry:
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        groups.setdefault(name, []).append((st.st_mtime, path, st.st_size))
    removed = []
    for name, found in groups.items():
        found.sort(reverse=True)
        # A derived image's key is not known here, nor that of a recipe this process did
        # not register (the `bottle` command does not read conftest.py) while it has an
        # image cached: their newest are kept too.
        recipe = name.rsplit("-", 1)[0]
        theirs = recipe not in RECIPES and recipe in cached
        kept = keep if name in current or name.startswith("derived-") or theirs else 0
        for _, path, size in found[kept:]:
            path.unlink(missing_ok=True)
            removed.append((path, size))
    return removed


def list_images(cache_dir: Path) -> list[BuiltImage]:
    found = [_load(p) for p in entries.list_entries(images_dir(cache_dir))]
    return [i for i in found if i is not None]


def prune_images(cache_dir: Path, older_than_days: float) -> list[Path]:
    """Remove cached entries of registered recipes that are not their current key.
    A name not registered here (a recipe ``register()``-ed in a conftest.py is
    unknown to the `bottle` command unless given with ``--from``) keeps the entry
    used last; its others go once not used for ``older_than_days``."""
    current = {f"{r.name}-{r.key()}" for r in RECIPES.values()}
    found = list_images(cache_dir)
    used = {image.path: last_used(image.path, image.manifest) for image in found}
    newest: dict[str, float] = {}
    for image in found:
        newest[image.name] = max(newest.get(image.name, used[image.path]), used[image.path])
    cutoff = time.time() - older_than_days * 86400
    removed = []
    for image in found:
        if image.name in RECIPES:
            old = image.path.name not in current
        else:
            old = used[image.path] < newest[image.name] and used[image.path] < cutoff
        if old:
            with FileLock(str(lock_path(cache_dir, image.path.name))):
                entries.remove(image.path, "rm")
            removed.append(image.path)
    return removed


def remove_image(name: str, cache_dir: Path) -> list[Path]:
    """Remove every cached entry (any key) for ``name``; return what was removed."""
    if name not in RECIPES and not any(i.name == name for i in list_images(cache_dir)):
        get_recipe(name)  # raises ImageNotFound with the known names
    removed = []
    for image in list_images(cache_dir):
        if image.name == name:
            with FileLock(str(lock_path(cache_dir, image.path.name))):
                entries.remove(image.path, "rm")
            removed.append(image.path)
    return removed
