"""Debian 12 and Debian 13 side by side: image build, seed, restore, exec.

    .venv/bin/python bench/releases.py [--builds 2] [--restores 20] [--execs 200] [--ssh 10]

Everything runs in one fresh temporary cache (the accelerator verdict is
copied from the default cache, so no probe boot falls inside a timing), and
the two releases alternate in every phase: build A, build B, then B, A...;
restore A, restore B, ...; one exec in A, one in B, ...  So both see the same
machine load, and the ratio column is comparable from run to run even when
the absolute numbers drift (DESIGN §3).

- image build: ``ensure_image`` on an empty image directory (mmdebstrap);
- seed: making the work seed of a freshly built image (its manifest's
  ``creation_seconds``: cold boot, settle, save) and, of that, the cold boot
  to an answering agent;
- restore -> first exec: ``launch()`` to the first answered ``true``;
- exec: ``exec(["true"])`` in a running bottle;
- ssh: the first ``ssh true`` into a fresh bottle through its ``ssh_config``, and
  through it with the client's default key exchange (the config leaves out the
  post-quantum hybrids).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _util import p50, pct, table

import pytest_bottle
from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.images import ensure_image
from pytest_bottle.images.recipes import get_recipe
from pytest_bottle.store.saved import list_seeds

RELEASES = ("debian-bookworm", "debian-trixie")


def first_exec(image: str, cache: Path) -> float:
    started = time.perf_counter()
    with pytest_bottle.launch(image=image, cache_dir=cache) as b:
        b.exec(["true"])
        return time.perf_counter() - started


def alternate(rounds: int, measure: Callable[[str, int], float]) -> dict[str, list[float]]:
    """``measure(release, round)`` for each round, both releases, the order flipped every round."""
    out: dict[str, list[float]] = {r: [] for r in RELEASES}
    for i in range(rounds):
        for release in RELEASES if i % 2 == 0 else RELEASES[::-1]:
            out[release].append(measure(release, i))
    return out


def builds_and_seeds(cache: Path, rounds: int) -> tuple[dict[str, list[float]], ...]:
    builds: dict[str, list[float]] = {r: [] for r in RELEASES}
    seeds: dict[str, list[float]] = {r: [] for r in RELEASES}
    seed_boot: dict[str, list[float]] = {r: [] for r in RELEASES}
    for i in range(rounds):
        order = RELEASES if i % 2 == 0 else RELEASES[::-1]
        for release in order:
            shutil.rmtree(cache / "images" / f"{release}-{get_recipe(release).key()}", ignore_errors=True)
            for seed in (cache / "seeds").glob(f"{release}-[0-9]*m*") if (cache / "seeds").is_dir() else ():
                shutil.rmtree(seed) if seed.is_dir() else seed.unlink()
            started = time.perf_counter()
            ensure_image(release, cache)
            builds[release].append(time.perf_counter() - started)
        for release in order:  # a seed needs its image: both builds first
            first_exec(release, cache)  # makes the seed
            (made,) = [s for s in list_seeds(cache) if s.manifest["key_parts"]["image"] == release]
            seeds[release].append(float(made.manifest["creation_seconds"]))
            seed_boot[release].append(float(made.manifest["boot_seconds"]))
    return builds, seeds, seed_boot


def execs(cache: Path, n: int) -> dict[str, list[float]]:
    bottles = {r: pytest_bottle.launch(image=r, cache_dir=cache) for r in RELEASES}
    try:
        for b in bottles.values():
            for _ in range(5):  # warm: the exec path is translated once per bottle
                b.exec(["true"])

        def one(release: str, _: int) -> float:
            started = time.perf_counter()
            bottles[release].exec(["true"])
            return time.perf_counter() - started

        return alternate(n, one)
    finally:
        for b in bottles.values():
            b.close()


def first_ssh(cache: Path, n: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The first ``ssh true`` into a fresh bottle (what a test pays: QEMU translates
    the guest's sshd and key exchange anew in every bottle), through its ssh_config
    and through it with the client's default key exchange (post-quantum hybrid first)."""
    stock_kex = ("-o", f"KexAlgorithms={_client_default_kex()}")
    kinds: tuple[tuple[str, tuple[str, ...]], ...] = (("ours", ()), ("stock", stock_kex))
    out: dict[str, dict[str, list[float]]] = {k: {r: [] for r in RELEASES} for k, _ in kinds}
    for i in range(n):  # both configs and both releases alternate, the order flipped every round
        for kind, kex in kinds if i % 2 == 0 else kinds[::-1]:
            for release in RELEASES if i % 2 == 0 else RELEASES[::-1]:
                with pytest_bottle.launch(image=release, cache_dir=cache) as b:
                    ssh, *rest = b.ssh_argv("true")
                    started = time.perf_counter()
                    subprocess.run([ssh, *kex, *rest], check=True, capture_output=True, timeout=120)
                    out[kind][release].append(time.perf_counter() - started)
    return out["ours"], out["stock"]


def _client_default_kex() -> str:
    """The ssh client's own KexAlgorithms list (no config file read)."""
    out = subprocess.run(["ssh", "-F", "/dev/null", "-G", "localhost"], capture_output=True, text=True, check=True)
    return next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("kexalgorithms "))


def row(what: str, unit: str, values: dict[str, list[float]], scale: float = 1.0) -> list[object]:
    a, b = (p50(values[r]) * scale for r in RELEASES)
    cells: list[object] = [f"{what} ({unit})", len(values[RELEASES[0]])]
    for r in RELEASES:
        cells += [f"{p50(values[r]) * scale:.3g}", f"{pct(values[r], 95) * scale:.3g}"]
    return [*cells, f"{b / a:.2f}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--builds", type=int, default=2, help="builds (and first seeds) per release, each about a minute")
    ap.add_argument("--restores", type=int, default=20)
    ap.add_argument("--execs", type=int, default=200)
    ap.add_argument("--ssh", type=int, default=10, help="fresh bottles per release and key exchange, one ssh true each")
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="bottle-bench-releases-"))
    try:
        if (default_cache_dir() / "accel.json").is_file():
            shutil.copy(default_cache_dir() / "accel.json", cache / "accel.json")
        builds, seeds, seed_boot = builds_and_seeds(cache, args.builds)
        restores = alternate(args.restores, lambda r, _: first_exec(r, cache))
        exec_times = execs(cache, args.execs)
        ssh_ours, ssh_stock = first_ssh(cache, args.ssh)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    a, b = RELEASES
    table(
        f"Debian releases side by side ({a} = A, {b} = B; alternating, one run)",
        ["measure", "n", "A p50", "A p95", "B p50", "B p95", "B/A p50"],
        [
            row("image build", "s", builds),
            row("seed creation: boot, settle, save", "s", seeds),
            row("  the seed's cold boot to agent", "s", seed_boot),
            row("restore -> first exec", "s", restores),
            row("exec true", "ms", exec_times, 1000),
            row("first ssh true in a bottle, its ssh_config", "s", ssh_ours),
            row("  the same, the client's default key exchange", "s", ssh_stock),
        ],
    )


if __name__ == "__main__":
    main()
