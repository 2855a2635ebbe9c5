"""Building a derived image: the parent's build seed restored against a cold boot of the parent.

    .venv/bin/python bench/derived_build.py --old REF [--rounds 5] [--image debian-bookworm] [--install PKG]

Each round builds two new derived images of ``--image`` (a ``run`` step that
writes a fresh token, plus ``--install PKG`` if given), one with the code at
REF (a throwaway ``git worktree``) and one with this tree, alternating which
goes first, each in a fresh process.  Timed: ``ensure_image`` from the call to
the layer in the cache (wall), and the CPU time of the process and everything
it started (QEMU included).  The build seed, the parent and the old side's
first-use work are made before the rounds, untimed.  Both sides share the
cache (``--cache-dir``, default: the user's): the image keys are the same.
Installs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from _ab import worktree
from _util import p50, table

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time
from pathlib import Path
from pytest_bottle import Image
from pytest_bottle.images import ensure_image
image, token, install, cache = sys.argv[1:5]
img = Image(image)
if install:
    img = img.install(install)
img = img.run(f"echo {token} > /etc/bench-token")
started = time.monotonic()
ensure_image(img, Path(cache), accel="tcg")
print(json.dumps({"seconds": time.monotonic() - started}))
"""


def build(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    """One build in a fresh process of ``tree``'s code: its wall time and the CPU of its process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, "-c", CHILD, args.image, uuid.uuid4().hex, args.install or "", str(args.cache_dir)]
    # cwd too: ``python -c`` puts the working directory first on sys.path
    r = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"build failed ({tree}):\n{r.stderr[-3000:]}")
    out: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    out["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", metavar="REF", required=True, help="the code to compare with (a git ref)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--image", default="debian-bookworm")
    ap.add_argument("--install", metavar="PKG", help="also install this Debian package in each build")
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.cache_dir is None:
        from pytest_bottle.host.paths import default_cache_dir

        args.cache_dir = default_cache_dir()
    with worktree(args.old) as old:
        sides = {"old": old, "new": REPO}
        for tree in sides.values():  # first use (the parent, the build seed) outside the timings
            build(tree, args)
        got: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        for i in range(args.rounds):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            for side in order:
                got[side].append(build(sides[side], args))
                print(f"round {i + 1} {side}: {got[side][-1]}", file=sys.stderr, flush=True)
    rows = []
    for key, label in (("seconds", "ensure_image -> layer cached (s)"), ("cpu", "CPU of the build's processes (s)")):
        o, n = [r[key] for r in got["old"]], [r[key] for r in got["new"]]
        ratios = [b / a for a, b in zip(o, n, strict=True)]
        rows.append(
            [label, f"{p50(o):.1f}", f"{p50(n):.1f}", f"{p50(ratios):.2f}x", " ".join(f"{r:.2f}" for r in ratios)]
        )
    what = f"{args.image} + {'install ' + args.install + ' + ' if args.install else ''}a run step"
    table(f"derived build, {what}, {args.rounds} pairs (p50)", ["measure", "old", "new", "new/old", "per pair"], rows)


if __name__ == "__main__":
    main()
