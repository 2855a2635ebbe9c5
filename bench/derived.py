"""Derived images: start time against the base, layer size, cache hit.

    .venv/bin/python bench/derived.py [--pairs 15] [--hits 50]

Everything is built first (the base image, the derived image, both work
seeds), outside the timings.  Then, alternating in one run, a bottle of the
base image and one of a derived image with nginx-light installed and running:
launch -> first exec.  Targets (issue 14, TCG on 2 cores): derived/base p50
and per pair ≤ 1.5x; the layer of this one-package image a small fraction of
the base rootfs (allocated blocks, both sparse); ``ensure_image`` cache hit
p50 ≤ 50 ms.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _util import p50, pct, table, verdict

import pytest_bottle
from pytest_bottle import Image
from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.images import ensure_image

BASE = "debian-bookworm"
# The same steps as examples/test_package_service.py, so both share the cache entry.
WEB = (
    Image(BASE)
    .install("nginx-light")
    .write("/var/www/html/index.html", "served from inside a bottle\n", mode=0o644)
    .run("systemctl enable nginx")
)


def first_exec(image: str | Image) -> float:
    started = time.perf_counter()
    with pytest_bottle.launch(image=image) as b:
        b.exec(["true"])
        return time.perf_counter() - started


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--hits", type=int, default=50)
    args = ap.parse_args()
    cache = default_cache_dir()

    started = time.perf_counter()
    base_built = ensure_image(BASE, cache)
    web_built = ensure_image(WEB, cache)
    with pytest_bottle.launch(image=BASE) as b:  # makes the seeds if missing
        b.exec(["true"])
    with pytest_bottle.launch(image=WEB) as b:
        assert b.check_output(["systemctl", "is-active", "nginx"]).strip() == "active"
    print(f"prepared (build + seeds, or cache hits) in {time.perf_counter() - started:.1f} s")

    base: list[float] = []
    web: list[float] = []
    for _ in range(args.pairs):
        base.append(first_exec(BASE))
        web.append(first_exec(WEB))
    ratios = [w / b for b, w in zip(base, web, strict=True)]
    ratio, ratio95 = p50(web) / p50(base), pct(web, 95) / pct(base, 95)
    table(
        f"launch -> first exec, {args.pairs} alternating pairs",
        ["image", "p50 s", "p95 s"],
        [
            [BASE, f"{p50(base):.3f}", f"{pct(base, 95):.3f}"],
            [f"{WEB.display_name} (nginx)", f"{p50(web):.3f}", f"{pct(web, 95):.3f}"],
            ["derived / base (target ≤ 1.5x)", f"{ratio:.2f}x {verdict(ratio, 1.5)}", f"{ratio95:.2f}x"],
        ],
    )
    table(
        "derived / base, per pair",
        ["", "p50", "p95", "max"],
        [["ratio", f"{p50(ratios):.2f}x", f"{pct(ratios, 95):.2f}x", f"{max(ratios):.2f}x"]],
    )

    layer, rootfs = allocated(web_built.disk), allocated(base_built.rootfs)
    share = layer / rootfs
    table(
        "disk on the host (allocated blocks)",
        ["file", "size", ""],
        [
            [f"base rootfs {base_built.rootfs.name}", mib(rootfs), ""],
            [f"layer {web_built.disk.name} (nginx-light)", mib(layer), f"{share:.1%} of base {verdict(share, 0.1)}"],
        ],
    )

    hits = []
    for _ in range(args.hits):
        t = time.perf_counter()
        ensure_image(WEB, cache)
        hits.append(time.perf_counter() - t)
    table(
        f"ensure_image cache hit, {args.hits} calls",
        ["", "p50 ms", "p95 ms"],
        [[WEB.display_name, f"{p50(hits) * 1000:.1f} {verdict(p50(hits), 0.05)}", f"{pct(hits, 95) * 1000:.1f}"]],
    )


if __name__ == "__main__":
    main()
