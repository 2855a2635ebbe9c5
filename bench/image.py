"""Image pipeline: cold build seconds and cached lookup milliseconds.

    .venv/bin/python bench/image.py [--builds N]

The cold build runs in a fresh temporary cache (the real mmdebstrap pipeline,
host apt sources); the lookups go against that cache once it is built.
Targets (DESIGN §4): cold build ≤ 45 s, cached lookup ≤ 50 ms.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _util import p50, pct, table, verdict

from pytest_bottle.images import ensure_image, find_image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--builds", type=int, default=1, help="cold builds to time (each about 40 s)")
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--image", default="debian-bookworm")
    args = ap.parse_args()

    builds: list[float] = []
    cache = Path(tempfile.mkdtemp(prefix="bottle-bench-image-"))
    try:
        for _ in range(args.builds):
            shutil.rmtree(cache / "images", ignore_errors=True)
            started = time.perf_counter()
            ensure_image(args.image, cache)
            builds.append(time.perf_counter() - started)
        ensure_lookups = []
        find_lookups = []
        for _ in range(args.lookups):
            t = time.perf_counter()
            ensure_image(args.image, cache)
            ensure_lookups.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            find_image(args.image, cache)
            find_lookups.append((time.perf_counter() - t) * 1000)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    table(
        f"image pipeline ({args.image})",
        ["measure", "n", "p50", "p95", "target", "verdict"],
        [
            [
                "cold build (s)",
                len(builds),
                f"{p50(builds):.1f}",
                f"{pct(builds, 95):.1f}",
                "<= 45",
                verdict(p50(builds), 45),
            ],
            [
                "cached lookup, ensure_image (ms)",
                len(ensure_lookups),
                f"{p50(ensure_lookups):.2f}",
                f"{pct(ensure_lookups, 95):.2f}",
                "<= 50",
                verdict(pct(ensure_lookups, 95), 50),
            ],
            [
                "cached lookup, find_image (ms)",
                len(find_lookups),
                f"{p50(find_lookups):.2f}",
                f"{pct(find_lookups, 95):.2f}",
                "",
                "",
            ],
        ],
    )
    print(f"  ratio cold build / cached lookup: {p50(builds) * 1000 / p50(ensure_lookups):,.0f}x")


if __name__ == "__main__":
    main()
