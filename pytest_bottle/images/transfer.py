"""Moving built images between caches: ``bottle image export`` and ``import``.

An export is one file (see ``archive``): an image and every image under it
(a derived image's disk is a qcow2 layer on its parent's), never seeds: a
seed bakes in this cache's SSH key and this host's QEMU, and is made again
on first use (about a minute).

An import checks the whole file in a private directory inside the cache
(``images/.tmp-import-*``, swept if the importer dies) before anything is
published; then each image's entry goes into place by one rename under its
entry lock, the bottom of the chain first.  An entry already there from the
same build is kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BottleError, ImageImportError, ImageNotFound, SpecError
from ..host.deps import require
from ..host.locks import reporting_lock
from ..host.paths import cache_root, current_umask, remove_tree
from ..host.progress import task
from ..store import entries
from . import archive
from .archive import ImageRef, Member
from .cache import images_dir, list_images, lock_path
from .image import Image, known_names, lookup
from .recipes import get_recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Imported:
    """What an import did to one image entry: ``imported``, ``kept`` or ``replaced``."""

    ref: ImageRef
    action: str


def image_key(name: str) -> str:
    """The cache key of a registered image (what an export of it carries)."""
    target = lookup(name)
    if isinstance(target, Image):
        target = target.resolved()
    return target.key if isinstance(target, Image) else get_recipe(target).key()


def find_entry(name: str, cache_dir: Path) -> Path:
    """The cache entry of ``name``: a registered image (its current key), a
    derived image's shown name, ``derived-KEY`` or a key (prefix of 8+)."""
    root = images_dir(cache_dir)
    if name in known_names():
        target = lookup(name)
        if isinstance(target, Image):
            target = target.resolved()
        entry = root / (f"derived-{target.key}" if isinstance(target, Image) else f"{target}-{image_key(target)}")
        if (entry / "manifest.json").is_file():
            return entry
        raise BottleError(f"image {name} is not built in {cache_dir} (bottle image build {name})")
    shown: set[str] = set()  # the cached derived images' names, which it takes too, as `image rm` lists them
    for path in entries.list_entries(root):
        m = _manifest(path)
        key = str(m.get("key", ""))
        if name in (path.name, m.get("name")) or (len(name) >= 8 and key.startswith(name)):
            return path
        if path.name.startswith("derived-") and isinstance(m.get("name"), str):
            shown.add(m["name"])
    known = known_names()
    raise ImageNotFound(name, known + sorted(shown - set(known)) + [i.path.name for i in list_images(cache_dir)])


def _manifest(path: Path) -> dict[str, Any]:
    try:
        m = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def chain(entry: Path) -> list[ImageRef]:
    """The images ``entry`` rests on and itself, bottom first, from their manifests."""
    refs: list[ImageRef] = []
    path: Path | None = entry
    while path is not None:
        m = _manifest(path)
        if not m:
            raise ImageNotFound(f"{path.name} (no readable manifest)", [])
        if m.get("kind") == "derived":
            pk = str(m["parent_key"])
            below = path.parent / f"derived-{pk}"
            if not below.is_dir():
                below = path.parent / f"{m['parent']}-{pk}"
            refs.append(ImageRef(path.name, "derived", str(m["name"]), str(m["key"]), below.name))
            path = below
        else:
            refs.append(ImageRef(path.name, "recipe", str(m["name"]), str(m["key"]), None))
            path = None
    refs.reverse()
    return refs


def export(name: str, out: Path, cache_dir: Path) -> tuple[list[ImageRef], str]:
    """Write the image ``name`` and what it rests on to ``out`` (replaced whole);
    returns the images and the file's sha256."""
    _check_out(out)  # before the work: a directory was found at its end, as a traceback
    cache_dir = cache_root(cache_dir)
    refs = chain(find_entry(name, cache_dir))
    # Made before the members are hashed: a directory we cannot write to fails now, not after that.
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise SpecError(f"cannot write {out}: {e.strerror or e}", "export") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as stream:
            root = images_dir(cache_dir)
            files: list[tuple[Member, Path]] = []
            for ref in refs:
                for f in archive.ALLOWED[ref.kind]:
                    path = root / ref.entry / f
                    if path.is_file():
                        size = path.stat().st_size
                        files.append((Member(f"images/{ref.entry}/{f}", size, archive.file_sha256(path)), path))
            manifest = archive.make_manifest(
                refs, [m for m, _ in files], {"image": refs[-1].to_dict(), "exported": time.time()}
            )
            with task(f"exporting image {refs[-1].name}", f"{len(refs)} image(s) to {out}") as t:
                sha = archive.write_archive(stream, manifest, files, t.stage)
        tmp.chmod(0o666 & ~current_umask())  # as a plain open would have made it (mkstemp: 0o600)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return refs, sha


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise SpecError(f"{out} is a directory; give the file to write, e.g. {out / 'image.tar.gz'}", "export")
    if not out.parent.is_dir():
        raise SpecError(f"cannot write {out}: {out.parent} is not a directory", "export")
    # The export replaces the name whole: a symlink (to /dev/stdout, say) or a
    # device would be replaced by a file, not written through.
    if out.is_symlink() or (out.exists() and not out.is_file()):
        what = "a symlink" if out.is_symlink() else "not a regular file"
        raise SpecError(f"{out} is {what}; the export replaces it whole: give a new or regular file", "export")


def import_file(
    path: Path,
    cache_dir: Path,
    *,
    source: str | None = None,
    want_key: str | None = None,
    replace: bool = True,
    sha256: str | None = None,
) -> list[Imported]:
    """Check the export at ``path`` whole, then publish its images in ``cache_dir``.

    ``want_key``: the top image must have this key.  ``replace``: an entry
    of the same key from another build is replaced (else the import is refused).
    ``sha256``: the whole file must have it (hashed as it is unpacked).
    Raises ``ImageImportError`` (nothing published) when anything is off.
    """
    cache_dir = cache_root(cache_dir)
    source = source or str(path)
    root = images_dir(cache_dir)
    token = secrets.token_hex(4)
    work = root / f"{entries.TMP_PREFIX}import-{token}-{os.getpid()}"
    lock = lock_path(cache_dir, f"import-{token}")  # held: the sweep leaves a live import alone
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with reporting_lock(lock, "an import"):
            work.mkdir(parents=True, mode=0o700)
            with task("checking the image export", source) as t:
                try:
                    refs, _ = archive.unpack(path, work, t.stage, sha256)
                    _check_images(refs, work / "images")
                except ImageImportError as e:
                    raise ImageImportError(source, e.reason) from None
            if want_key is not None and refs[-1].key != want_key:
                raise ImageImportError(source, f"it holds {refs[-1].name} with key {refs[-1].key}, not {want_key}")
            return _publish(refs, work / "images", cache_dir, source, replace)
    finally:
        remove_tree(work)
        lock.unlink(missing_ok=True)


def _check_images(refs: list[ImageRef], unpacked: Path) -> None:
    """Each image's own manifest agrees with the export's; a recipe image's
    disk is raw (as qemu-img probes it: not a qcow2 naming a host file); a
    derived disk is a qcow2 naming exactly its parent's disk, in its format,
    as its backing file (nothing else on the host), with no external data file."""
    seen: dict[str, dict[str, Any]] = {}
    for ref in refs:
        m = _manifest(unpacked / ref.entry)
        if m.get("name") != ref.name or m.get("key") != ref.key:
            raise ImageImportError("the export", f"{ref.entry}: its manifest names {m.get('name')!r} {m.get('key')!r}")
        if not _finite(m.get("created")):
            raise ImageImportError("the export", f"{ref.entry}: its manifest's created is not a time")
        seen[ref.entry] = m
        if ref.kind == "recipe":
            if m.get("kind", "recipe") != "recipe":
                raise ImageImportError("the export", f"{ref.entry} is listed as a recipe image, not {m.get('kind')!r}")
            info = _qemu_img_info(unpacked / ref.entry / "rootfs.ext4", None)
            if info.get("format") != "raw":
                raise ImageImportError(
                    "the export", f"{ref.entry}/rootfs.ext4 is a {info.get('format')!r} image, not raw"
                )
            continue
        assert ref.parent is not None
        parent = seen[ref.parent]
        below_chain = parent.get("chain") if parent.get("kind") == "derived" else [parent.get("key")]
        if (
            m.get("kind") != "derived"
            or not _finite(m.get("parent_created"))
            or m.get("parent_created") != parent.get("created")
            or m.get("parent_key") != parent.get("key")
            or not isinstance(below_chain, list)
            or m.get("chain") != [ref.key, *below_chain]
        ):
            raise ImageImportError("the export", f"{ref.entry} was not built on the {ref.parent} it carries")
        on_derived = ref.parent.startswith("derived-")
        below, fmt = ("disk.qcow2", "qcow2") if on_derived else ("rootfs.ext4", "raw")
        info = _qemu_img_info(unpacked / ref.entry / "disk.qcow2", "qcow2")
        want = f"../{ref.parent}/{below}"
        if info.get("format") != "qcow2" or info.get("backing-filename") != want:
            raise ImageImportError(
                "the export", f"{ref.entry}/disk.qcow2 must be a layer on {want}, not {info.get('backing-filename')!r}"
            )
        data = (info.get("format-specific") or {}).get("data") or {}
        if data.get("data-file") or info.get("backing-filename-format") != fmt:
            raise ImageImportError(
                "the export",
                f"{ref.entry}/disk.qcow2 names other files or its backing's format wrong",
            )


def _finite(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def _qemu_img_info(path: Path, fmt: str | None) -> dict[str, Any]:
    """``qemu-img info`` of ``path`` read as ``fmt`` (``None``: as qemu-img probes it)."""
    argv = [require("qemu-img", "check imported disks"), "info", "--output=json", "-U"]
    argv += ["-f", fmt, str(path)] if fmt else [str(path)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, "LC_ALL": "C"})
        info = json.loads(r.stdout) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        info = None
    if not isinstance(info, dict):
        raise ImageImportError("the export", f"{path.parent.name}/{path.name} is not a disk image qemu-img reads")
    return info


def _publish(refs: list[ImageRef], unpacked: Path, cache_dir: Path, source: str, replace: bool) -> list[Imported]:
    """Move each checked entry into place, bottom first, under its lock."""
    root = images_dir(cache_dir)
    done: list[Imported] = []
    if not replace:  # refuse before publishing any of the chain
        for ref in refs:
            old = _manifest(root / ref.entry)
            if old and old.get("created") != _manifest(unpacked / ref.entry).get("created"):
                raise ImageImportError(source, f"the cache holds another build of {ref.entry}")
    for ref in refs:
        final = root / ref.entry
        new = unpacked / ref.entry
        with reporting_lock(lock_path(cache_dir, ref.entry), f"the image entry {ref.entry}"):
            old = _manifest(final)
            if old and old.get("key") == ref.key and old.get("created") == _manifest(new).get("created"):
                done.append(Imported(ref, "kept"))
                continue
            if old and not replace:  # built here since the check above: keep it, publish nothing on it
                raise ImageImportError(source, f"the cache holds another build of {ref.entry} (made meanwhile)")
            entries.clean_stale(final)
            entries.commit(new, final)  # same file system: one rename (the old entry put aside)
            done.append(Imported(ref, "replaced" if old else "imported"))
            log.debug("imported %s from %s", ref.entry, source)
    return done
