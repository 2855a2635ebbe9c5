"""The ``bottle image export|import|key`` commands (the work is in ``images.transfer`` and ``images.pull``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import ImageNotFound
from .images.pull import MAX_DOWNLOAD, import_source
from .images.transfer import export, image_key
from .user_images import find_images, needs_from


def cmd_export(args: argparse.Namespace) -> int:
    refs, sha = export(args.name, args.file, args.cache_dir)
    size = args.file.stat().st_size
    print(f"exported {' <- '.join(r.entry for r in reversed(refs))} to {args.file} ({size / 1e6:.0f} MB)")
    print(f"sha256 {sha}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    done = import_source(
        args.source, args.cache_dir, sha256=args.sha256, want_key=args.key, max_bytes=args.max_size << 20
    )
    for d in done:
        print(f"{d.action} {d.ref.entry} ({d.ref.kind} image {d.ref.name})")
    return 0


def _megabytes(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a whole number of MB, at least 1, not {value!r}")
    return n


def cmd_key(args: argparse.Namespace) -> int:
    print(image_key(args.name))
    return 0


def add_parsers(image: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the commands to ``bottle image``; ``find_images`` loads what ``--from`` (or a conftest) names first."""

    def from_option(p: argparse.ArgumentParser, fn: Callable[[argparse.Namespace], int]) -> None:
        p.add_argument("--from", dest="source_file", metavar="FILE|MODULE", help="a file or module defining images")

        def run(args: argparse.Namespace) -> int:
            read = find_images(args.name, args.source_file)
            try:
                return fn(args)
            except ImageNotFound as e:
                if not args.source_file and e.name == args.name:  # not a broken parent's
                    print(needs_from(args.name, "find it", read), file=sys.stderr)
                raise

        p.set_defaults(fn=run)

    ex = image.add_parser("export", help="write a built image (and the images under it) to one file")
    ex.add_argument("name", help="an image name, a derived image's name or key, or its cache entry")
    ex.add_argument("file", type=Path)
    from_option(ex, cmd_export)
    im = image.add_parser("import", help="check an export file (a path or http(s):// URL) and add it to the cache")
    im.add_argument("source", metavar="FILE|URL")
    im.add_argument("--sha256", default=None, help="the whole file must have this sha256 (as export printed)")
    im.add_argument("--key", default=None, help="the exported image must have this key")
    im.add_argument("--max-size", type=_megabytes, default=MAX_DOWNLOAD >> 20, metavar="MB", help="largest download")
    im.set_defaults(fn=cmd_import)
    k = image.add_parser("key", help="print an image's cache key (e.g. for a CI cache key)")
    k.add_argument("name")
    from_option(k, cmd_key)
