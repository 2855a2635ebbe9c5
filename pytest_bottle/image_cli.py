"""The ``bottle image`` (build, list, rm, prune; export, import and key in
``transfer_cli``) and ``bottle seed`` commands, and ``--from``, which loads the
images a file or module defines."""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import sys
import time
import traceback
from pathlib import Path
from types import TracebackType

from . import transfer_cli
from .arguments import check_days
from .errors import ImageNotFound, SpecError
from .host.paths import tree_size
from .images import RECIPES, BuiltImage, ensure_image, list_images, prune_images, remove_image
from .images.cache import prune_logs
from .images.derived import list_derived, prune_derived, remove_derived
from .images.image import NAMED, check_pull_template, register_provided
from .store import unsettled
from .store.gc import prune_seeds, remove_seeds
from .store.saved import seeds_dir
from .store.seeds import list_seeds
from .transfer_cli import NEEDS_FROM as _NEEDS_FROM

FROM_HELP = "a Python file or module defining images (Image(...).named(NAME), or pytest_bottle_images())"


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def age(t: float) -> str:
    s = time.time() - t
    return f"{s / 86400:.1f}d" if s > 86400 else f"{s / 3600:.1f}h" if s > 3600 else f"{s / 60:.0f}m"


def load_images(source: str) -> None:
    """Run a Python file (``path.py``) or import a module (``pkg.images``)
    that defines images: what it names with ``.named()``, and what its
    ``pytest_bottle_images()`` returns, become buildable by name."""
    is_file = source.endswith(".py") or os.sep in source
    if is_file and not os.path.isfile(source):
        raise SpecError(f"--from {source}: no such file")
    if not is_file:
        sys.path.insert(0, os.getcwd())
    try:
        namespace = _run_file(os.path.abspath(source)) if is_file else vars(importlib.import_module(source))
        hook = namespace.get("pytest_bottle_images")
        provided = hook() if callable(hook) else None
    except Exception as e:
        no = e.name if isinstance(e, ModuleNotFoundError) and not is_file else None
        if no is not None and (source == no or source.startswith(no + ".")):  # not one it imports
            raise SpecError(
                f"--from {source}: no module named {no!r} (give a .py file or an importable module)"
            ) from None
        # The user's code failed (a BottleError of an Image step it makes too):
        # its own frames say where; ours would only bury them, and a bare
        # traceback would exit 1, like `bottle run`'s command.
        sys.stderr.write("".join(traceback.format_exception(type(e), e, _their_frames(e.__traceback__))))
        raise SpecError(f"--from {source}: loading it raised {type(e).__name__} (its traceback is above)") from None
    if callable(hook):  # what it returned is checked as under pytest
        register_provided(provided, f"pytest_bottle_images() in {source}")


def _their_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` from the first frame that is neither ours nor the import system's."""
    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not (name.startswith(ours) or name.startswith("<frozen ")):
            break
        tb = tb.tb_next
    return tb


def _run_file(path: str) -> dict[str, object]:
    """Run ``path`` as pytest imports a conftest (its default "prepend" mode):
    the first directory above it without an ``__init__.py`` goes first on
    ``sys.path``, and a file inside a package is imported by its dotted name,
    so its imports (``from images_def import X``, ``from tests.images_def
    import X``, ``from .images_def import X``) work as they do under pytest."""
    base, parts = os.path.dirname(path), [os.path.splitext(os.path.basename(path))[0]]
    while os.path.isfile(os.path.join(base, "__init__.py")):
        base, package = os.path.split(base)
        parts.insert(0, package)
    sys.path.insert(0, base)
    if len(parts) == 1:
        return runpy.run_path(path, run_name="__bottle_images__")
    return vars(importlib.import_module(".".join(parts)))


def cmd_image_build(args: argparse.Namespace) -> int:
    started = time.time()
    if args.source:
        load_images(args.source)

    def progress(stage: str, elapsed: float) -> None:
        print(f"[{elapsed:6.1f}s] {stage}", flush=True)

    rebuild_before = started if args.rebuild else None
    try:
        image = ensure_image(
            args.name, args.cache_dir, rebuild_before=rebuild_before, progress=progress, pull=args.pull
        )
    except ImageNotFound:
        if not args.source:
            print(_NEEDS_FROM.format(name=args.name, what="build it"), file=sys.stderr)
        raise
    if args.rebuild:
        remove_seeds(args.cache_dir, args.name)
    m = image.manifest
    print(f"{image.name} {image.key}: {image.path} (built in {m['build_seconds']}s, log {image.path / 'build.log'})")
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
    w1 = max([len("DERIVED IMAGE"), *(len(r[0]) for r in rows)])
    w2 = max([len("PARENT"), *(len(r[1]) for r in rows)])
    if rows:
        print(f"\n{'DERIVED IMAGE':{w1}} {'PARENT':{w2}} {'SIZE':>9} {'USED':>6}  STEPS")
    for label, parent, size, used, steps in rows:
        print(f"{label:{w1}} {parent:{w2}} {size:>9} {used:>6}  {steps}")
    for seed in list_seeds(args.cache_dir):
        kp = seed.manifest["key_parts"]
        print(
            f"  seed of {kp['image']}: {kp['accel']} {kp['memory_mb']}M {kp['cpus']}cpu {kp['nics']}nic "
            f"{mb(tree_size(seed.path))} {age(seed.manifest['created'])}"
        )
    return 0


def _cached_derived_names(cache_dir: Path) -> set[str]:
    return {str(d.manifest.get("name") or d.path.name) for d in list_derived(cache_dir)}


def cmd_image_rm(args: argparse.Namespace) -> int:
    if args.source:
        load_images(args.source)
    named = NAMED.get(args.name) if args.source else None  # its key: an entry first built unnamed has no name
    removed = remove_derived(args.cache_dir, named.key) if named is not None else []
    removed += remove_derived(args.cache_dir, args.name)  # older layers cached under the name too
    if not removed and named is None:  # a derived image's name or key, then a recipe's
        try:
            removed = remove_image(args.name, args.cache_dir) + remove_seeds(args.cache_dir, args.name)
        except ImageNotFound as e:  # the cached derived images are names rm takes too
            if not args.source:
                print(_NEEDS_FROM.format(name=args.name, what="remove it"), file=sys.stderr)
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
    transfer_cli.add_parsers(image, load_images)

    seed = sub.add_parser("seed", help="list or remove work seeds").add_subparsers(dest="subcommand", required=True)
    seed.add_parser("list", help="seeds in the cache").set_defaults(fn=cmd_image_list)
    sr = seed.add_parser("rm", help="remove seeds (of one image, or all)")
    sr.add_argument("image", nargs="?")
    sr.set_defaults(fn=cmd_seed_rm)
