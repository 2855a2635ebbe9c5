"""Snapshots of a live bottle: taking one, forking it, many forks at once, space used.

    .venv/bin/python bench/snapshot.py [--snapshots 8] [--rounds 15] [--forks 20]

Everything runs against the default cache (image and seed are made first,
outside the timings).  Targets (issue 15, TCG on 2 cores): fork -> first exec
within 1.5x of a seed restore -> first exec (measured alternating, in the
same run); 20 forks under -n 2 with no failure.  Snapshots do not cross
workers: under -n 2 each worker takes its own session snapshot and its tests
fork that one.  Space is reported per file: the disk layer (``disk.qcow2``,
what the issue asks to be a layer, not a copy) apart from the guest RAM
(``memory.ram``), which is most of an entry.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _util import p50, pct, table, verdict

import pytest_bottle
from pytest_bottle.host.paths import default_cache_dir, tree_size

FORKS = """
import pytest

@pytest.fixture(scope="session")
def prepared(session_bottle):
    session_bottle.write_text("/root/state", "prepared")
    return session_bottle.snapshot()

@pytest.mark.parametrize("i", range({n}))
def test_fork(prepared, bottle_factory, i):
    b = bottle_factory(snapshot=prepared)
    assert b.read_text("/root/state") == "prepared"
    b.write_text("/root/mine", str(i))
"""


def allocated(entry: Path) -> dict[str, int]:
    """Bytes actually allocated (st_blocks, so sparse files count what they
    hold) by the entry's disk layer, its guest RAM, and the whole entry.  The
    first snapshot's layer is a hard link to the source's frozen overlay: its
    blocks are the layer's, not a second copy."""
    return {
        "disk": (entry / "disk.qcow2").stat().st_blocks * 512,
        "ram": (entry / "memory.ram").stat().st_blocks * 512,
        "total": tree_size(entry),
    }


def bench_snapshot(n: int) -> dict[str, list[float]]:
    """``n`` bottles, two snapshots each: the first (the bottle's overlay taken as
    the layer, a hard link) and a second (its layers collapsed into one)."""
    out: dict[str, list[float]] = {k: [] for k in ("first", "later", "pause", "image")}
    out.update({f"{kind} {part}": [] for kind in ("first", "later") for part in ("disk", "ram", "total")})
    for _ in range(n):
        with pytest_bottle.launch(memory="512M") as b:
            for kind in ("first", "later"):
                # fsync: on the disk layer, not only in the guest's page cache (that is memory.ram)
                b.check_output("dd if=/dev/urandom of=/root/blob-$RANDOM bs=1M count=8 conv=fsync status=none")
                started = time.perf_counter()
                snap = b.snapshot()
                out[kind].append(time.perf_counter() - started)
                out["pause"].append(snap.pause_seconds)
                for part, size in allocated(snap.path).items():
                    out[f"{kind} {part}"].append(size)
                out["image"].append(snap.image.rootfs.stat().st_blocks * 512)
                snap.remove()
    return out


def first_exec_fork(snap: pytest_bottle.Snapshot) -> float:
    started = time.perf_counter()
    with snap.start() as b:
        b.exec(["true"])
        return time.perf_counter() - started


def first_exec_restore() -> float:
    started = time.perf_counter()
    with pytest_bottle.launch() as b:
        b.exec(["true"])
        return time.perf_counter() - started


def bench_forks(rounds: int) -> tuple[list[float], list[float]]:
    forks, restores = [], []
    with pytest_bottle.launch() as src, src.snapshot() as snap:
        first_exec_fork(snap)  # its files into the page cache, as the seed's are
        for _ in range(rounds):  # alternating: both see the same machine load
            restores.append(first_exec_restore())
            forks.append(first_exec_fork(snap))
    return forks, restores


def bench_xdist(n: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "test_forks.py").write_text(FORKS.format(n=n))
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2"]
        argv += [f"--bottle-cache-dir={default_cache_dir()}", "--bottle-prestart=0"]
        started = time.perf_counter()
        r = subprocess.run(argv, cwd=d, capture_output=True, text=True, timeout=1800)
        took = time.perf_counter() - started
    return took, (r.stdout.strip().splitlines() or ["?"])[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--snapshots", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--forks", type=int, default=20)
    args = ap.parse_args()
    first_exec_restore()  # image, seed and accelerator verdict outside the timings

    t = bench_snapshot(args.snapshots)
    table(
        f"snapshot of a 512M bottle ({args.snapshots} bottles x 2 snapshots, 8 MB written and synced before each)",
        ["", "p50", "p95"],
        [
            ["first snapshot() of a bottle, s", f"{p50(t['first']):.2f}", f"{pct(t['first'], 95):.2f}"],
            ["later snapshot() of it, s", f"{p50(t['later']):.2f}", f"{pct(t['later'], 95):.2f}"],
            ["source paused, s", f"{p50(t['pause']):.3f}", f"{pct(t['pause'], 95):.3f}"],
        ],
    )
    table(
        "space allocated per snapshot, MB (first: the overlay hard-linked; later: layers collapsed into a copy)",
        ["", "p50", "p95"],
        [
            [
                f"{kind} snapshot, {label}",
                f"{p50(t[f'{kind} {part}']) / 1e6:.1f}",
                f"{pct(t[f'{kind} {part}'], 95) / 1e6:.1f}",
            ]
            for kind in ("first", "later")
            for part, label in (("disk", "disk layer"), ("ram", "memory.ram"), ("total", "whole entry"))
        ]
        + [["the image's root file system (not copied)", f"{p50(t['image']) / 1e6:.1f}", ""]],
    )

    forks, restores = bench_forks(args.rounds)
    ratio = p50(forks) / p50(restores)
    table(
        f"first exec: fork of a snapshot vs seed restore ({args.rounds} rounds, alternating)",
        ["", "p50 s", "p95 s"],
        [
            ["seed restore -> first exec", f"{p50(restores):.3f}", f"{pct(restores, 95):.3f}"],
            ["fork -> first exec", f"{p50(forks):.3f}", f"{pct(forks, 95):.3f}"],
        ],
    )
    print(f"  fork/restore ratio (p50): {ratio:.2f}  (target <= 1.5: {verdict(ratio, 1.5)})")

    took, last = bench_xdist(args.forks)
    ok = last.startswith(f"{args.forks} passed") and "failed" not in last and "error" not in last
    table(
        f"{args.forks} forks under -n 2 (one session snapshot per worker, forked by that worker's tests)",
        ["wall s", "result", "verdict"],
        [[f"{took:.1f}", last, "ok" if ok else "MISSED"]],
    )
    print(f"\n(cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
