"""The ``bottle image`` (build, list, rm, prune; export, import and key in
``transfer_cli``) and ``bottle seed`` commands; ``--from`` and the
``conftest.py`` files read without it are ``user_images``'."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import transfer_cli
from .arguments import check_days
from .errors import ImageNotFound, SpecError
from .host.paths import tree_size
from .images import RECIPES, BuiltImage, ensure_image, list_images, prune_images, remove_image
from .images.cache import prune_logs
from .images.derived import list_derived, prune_derived, remove_derived
from .images.image import NAMED, check_pull_template
from .store import unsettled
from .store.gc import prune_seeds, remove_seeds
from .store.saved import seeds_dir
from .store.seeds import BUILD, list_seeds
from .user_images import find_images, load_images, needs_from

FROM_HELP = "a Python file or module defining images (Image(...).named(NAME), or pytest_bottle_images())"


def column_widths(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    """Each of ``header``'s columns as wide as its longest entry, its title included."""
    return [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def age(t: float) -> str:
    s = time.time() - t
    return f"{s / 86400:.1f}d" if s > 86400 else f"{s / 3600:.1f}h" if s > 3600 else f"{s / 60:.0f}m"


def cmd_image_build(args: argparse.Namespace) -> int:
    started = time.time()
    read = find_images(args.name, args.source)

    worked: list[str] = []  # a build or a pull reports stages; a cached image none

    def progress(stage: str, elapsed: float) -> None:
        worked.append(stage)
        print(f"[{elapsed:6.1f}s] {stage}", flush=True)

    rebuild_before = started if args.rebuild else None
    try:
        image = ensure_image(
            args.name, args.cache_dir, rebuild_before=rebuild_before, progress=progress, pull=args.pull
        )
    except ImageNotFound:
        if not args.source:
            print(needs_from(args.name, "build it", read), file=sys.stderr)
        raise
    if args.rebuild:
        remove_seeds(args.cache_dir, args.name)
    m = image.manifest
    when = "built" if worked else f"found in the cache: built {age(float(m.get('created', 0)))} ago"
    print(f"{image.name} {image.key}: {image.path} ({when} in {m['build_seconds']}s, log {image.path / 'build.log'})")
    return 0


def _pull_url(value: str) -> str:
    try:
        return check_pull_template(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_image_list(args: argparse.Namespace) -> int:
    if getattr(args, "source", None):  # `bottle seed list` has no --from
        load_images(args.source)
    cached: dict[str, list[BuiltImage]] = {}
    for i in list_images(args.cache_dir):
        cached.setdefault(i.name, []).append(i)
    print(f"{'NAME':28} {'KEY':18} {'SIZE':>9} {'AGE':>6}  DESCRIPTION")
    for name, recipe in sorted(RECIPES.items()):
        entries = cached.pop(name, [])
        # The entry of the current key is the image; any other is a leftover for ``prune``.
        current = next((i for i in entries if i.key == recipe.key()), None)
        image = current or max(entries, key=lambda i: i.created, default=None)
        size = mb(tree_size(image.path)) if image else "-"
        built = age(image.created) if image else "-"
        key = (image.key if image else recipe.key()) + ("" if current or not image else " (stale)")
        print(f"{name:28} {key:18} {size:>9} {built:>6}  {recipe.description}{'' if image else ' (not built)'}")
        for old in entries:
            if old is not image:
                print(f"  stale entry {old.key} {mb(tree_size(old.path))} {age(old.created)} (bottle image prune)")
    for name, entries in sorted(cached.items()):  # recipes registered in the user's code (conftest.py)
        for i in sorted(entries, key=lambda i: i.created, reverse=True):
            print(f"{name:28} {i.key:18} {mb(tree_size(i.path)):>9} {age(i.created):>6}  (not registered here; --from)")
    rows = []
    for d in list_derived(args.cache_dir):
        m = d.manifest
        label = f"{m.get('name')} ({d.key[:12]})" if not str(m.get("name", "")).endswith(d.key[:12]) else m.get("name")
        steps = f"{len(m.get('steps', []))}" + (f" (stale: {d.stale}; bottle image prune)" if d.stale else "")
        rows.append((str(label), str(m.get("parent")), mb(d.size), age(d.last_used), steps))
    # Columns as wide as the longest name: a layer on a layer has a long one.
    w1, w2 = column_widths(("DERIVED IMAGE", "PARENT"), rows)
    if rows:
        print(f"\n{'DERIVED IMAGE':{w1}} {'PARENT':{w2}} {'SIZE':>9} {'USED':>6}  STEPS")
    for label, parent, size, used, steps in sorted(rows):  # by name: a chain's layers follow their base
        print(f"{label:{w1}} {parent:{w2}} {size:>9} {used:>6}  {steps}")
    for seed in list_seeds(args.cache_dir):
        kp = seed.manifest["key_parts"]
        print(
            f"  seed of {kp['image']}: {kp['accel']} {kp['memory_mb']}M {kp['cpus']}cpu {kp['nics']}nic "
            f"{mb(tree_size(seed.path))} {age(seed.manifest['created'])}{_purpose(kp)}"
        )
    return 0


def _purpose(key_parts: dict[str, object]) -> str:
    return " (builds derived images)" if key_parts.get("purpose") == BUILD else ""


def _cached_derived_names(cache_dir: Path) -> set[str]:
    return {str(d.manifest.get("name") or d.path.name) for d in list_derived(cache_dir)}


def cmd_image_rm(args: argparse.Namespace) -> int:
    read = find_images(args.name, args.source)
    # its key: an entry first built unnamed has no name
    named = NAMED.get(args.name) if args.source or read else None
    removed = remove_derived(args.cache_dir, named.key) if named is not None else []
    removed += remove_derived(args.cache_dir, args.name)  # older layers cached under the name too
    if not removed and named is None:  # a derived image's name or key, then a recipe's
        try:
            removed = remove_image(args.name, args.cache_dir) + remove_seeds(args.cache_dir, args.name)
        except ImageNotFound as e:  # the cached derived images are names rm takes too
            if not args.source:
                print(needs_from(args.name, "remove it", read), file=sys.stderr)
            raise ImageNotFound(args.name, [*e.known, *sorted(_cached_derived_names(args.cache_dir))]) from None
        if removed:  # what was built on it rests on nothing now
            removed += remove_derived(args.cache_dir, args.name, root=True)
    for p in removed:
        print(f"removed {p}")
    if not removed:
        print(f"{args.name}: nothing cached")
    return 0


# "What nothing used lately" (DESIGN): a derived image rebuilds on its next use.
DERIVED_UNUSED_DAYS = 7.0


def cmd_image_prune(args: argparse.Namespace) -> int:
    check_days(args.older_than, "bottle image prune")
    if args.source:  # its recipes are judged by their keys too, not by their last use
        load_images(args.source)
    cache = args.cache_dir
    sizes = {i.path: tree_size(i.path) for i in list_images(cache)}
    rows = [(p, sizes.get(p, 0), "image of an old recipe") for p in prune_images(cache, args.older_than)]
    rows += prune_derived(cache, args.older_than)
    current = {i.name: i for i in list_images(cache)}  # what is left is current
    layers = {d.key: d for d in list_derived(cache)}
    for seed in list_seeds(cache):  # seeds of derived images still cached are current too
        kp = seed.manifest["key_parts"]
        if (layer := layers.get(kp.get("image_key"))) is not None:
            current[kp["image"]] = BuiltImage(kp["image"], layer.key, layer.path, layer.manifest)
    rows += [(r.path, r.size, r.why) for r in prune_seeds(cache, current, any_cached=True)]
    builds = {unsettled.build(i) for i in list_images(cache)} | {unsettled.build(d) for d in list_derived(cache)}
    gone = unsettled.prune(seeds_dir(cache), builds)
    rows += [(p, 0, "a seed that did not settle, of an image build no longer cached") for p in gone]
    rows += [(p, size, "old failed-build log") for p, size in prune_logs(cache)]
    for path, size, why in rows:
        print(f"removed {path} ({mb(size)}): {why}")
    freed = sum(size for _, size, _ in rows)
    print(f"pruned {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}, freed {mb(freed)}")
    return 0


def cmd_seed_rm(args: argparse.Namespace) -> int:
    if args.image is not None and not args.image.strip():  # not "all seeds", and no image is called that
        raise SpecError(f"bottle seed rm: {args.image!r} is no image name (leave it out to remove every seed)")
    removed = remove_seeds(args.cache_dir, args.image)
    for p in removed:
        print(f"removed {p}")
    if not removed:  # as `image rm` says it: silence would look like success at something
        print(f"{args.image or 'seeds'}: nothing cached")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``bottle image`` and ``bottle seed`` to the ``bottle`` command."""
    image = sub.add_parser("image", help="build, list or remove images").add_subparsers(
        dest="subcommand", required=True
    )
    b = image.add_parser("build", help="build an image (cached)")
    b.add_argument("name", help="a built-in image, or one named in --from")
    b.add_argument("--from", dest="source", metavar="FILE|MODULE", help=FROM_HELP)
    b.add_argument("--rebuild", action="store_true", help="build again even if cached (and drop its seeds)")
    b.add_argument("--pull", metavar="URL", type=_pull_url, help="pull it from this URL ({name}, {key}) if not cached")
    b.set_defaults(fn=cmd_image_build)
    ls = image.add_parser("list", help="known images, what is built, and seeds")
    ls.add_argument("--from", dest="source", metavar="FILE|MODULE", help=FROM_HELP)
    ls.set_defaults(fn=cmd_image_list)
    prune_help = "remove old images, stale seeds and old failed-build logs; print what was freed"
    pr = image.add_parser("prune", help=prune_help)
    pr.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        default=DERIVED_UNUSED_DAYS,
        help=f"remove derived images, and other entries of images not registered here, unused for DAYS "
        f"(default {DERIVED_UNUSED_DAYS:g})",
    )
    pr.add_argument("--from", dest="source", metavar="FILE|MODULE", help=FROM_HELP)
    pr.set_defaults(fn=cmd_image_prune)
    r = image.add_parser("rm", help="remove an image and its seeds from the cache")
    r.add_argument("name", help="a built-in image, a derived image's name or key, or one named in --from")
    r.add_argument("--from", dest="source", metavar="FILE|MODULE", help=FROM_HELP)
    r.set_defaults(fn=cmd_image_rm)
    transfer_cli.add_parsers(image)

    seed = sub.add_parser("seed", help="list or remove work seeds").add_subparsers(dest="subcommand", required=True)
    seed.add_parser("list", help="seeds in the cache").set_defaults(fn=cmd_image_list)
    sr = seed.add_parser("rm", help="remove seeds (of one image, or all)")
    sr.add_argument("image", nargs="?")
    sr.set_defaults(fn=cmd_seed_rm)
