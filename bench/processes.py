"""Processes (issue 17): spawn -> first output line, streamed output throughput,
exec latency with and without a flood in the same bottle.

    .venv/bin/python bench/processes.py [--spawns 20] [--mb 100] [--execs 100]
    .venv/bin/python bench/processes.py --old REF [--rounds 5]   # exec p50, old vs new alternating (_ab.py)

Targets: exec of ``true`` p50 ≤ 20 ms and unchanged against the previous
commit (DESIGN §4).  The rest is reported, with ratios from the same run:
streamed (``on_output``) against collected output of the same 100 MB, and
exec latency while a ``yes`` floods against a quiet bottle.
"""

from __future__ import annotations

import argparse
import time

import _ab
from _util import p50, pct, table, verdict

import pytest_bottle
from pytest_bottle import Bottle


def spawn_latency(b: Bottle, n: int) -> list[float]:
    """Seconds from spawn() to its first line seen on the host."""
    out = []
    for _ in range(n):
        started = time.perf_counter()
        with b.spawn(["sh", "-c", "echo ready; exec sleep 600"]) as p:
            p.wait_for_output("ready\n", timeout=60)
            out.append(time.perf_counter() - started)
    return out


def throughput(b: Bottle, mb: int, stream: bool) -> float:
    """MB/s of a command writing ``mb`` MB to stdout, through on_output or collected."""
    got = [0]

    def count(stream: str, text: str) -> None:
        got[0] += len(text)

    cmd = f"head -c {mb * 1_000_000} /dev/zero"
    started = time.perf_counter()
    r = b.exec(cmd, on_output=count if stream else None, timeout=600)
    seconds = time.perf_counter() - started
    size = got[0] if stream else len(r.stdout_bytes)
    assert r.ok and size == mb * 1_000_000, (r.returncode, size)
    return mb / seconds


def exec_times(b: Bottle, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        b.exec(["true"])
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spawns", type=int, default=20)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--streams", type=int, default=3, help="runs of each throughput measure")
    ap.add_argument("--execs", type=int, default=100)
    _ab.add_arguments(ap)
    args = ap.parse_args()
    if args.old:
        _ab.run(args)
        return
    with pytest_bottle.launch() as b:
        b.exec(["true"])
        spawns = spawn_latency(b, args.spawns)
        # The 64 MiB collecting cap would cut a larger stream; 100 MB streamed is never held.
        collected_mb = min(args.mb, 60)
        streamed = [throughput(b, args.mb, stream=True) for _ in range(args.streams)]
        collected = [throughput(b, collected_mb, stream=False) for _ in range(args.streams)]
        quiet = exec_times(b, args.execs)
        with b.spawn(["yes", "flood"]) as flood:
            flood.wait_for_output("flood", timeout=60)
            busy = exec_times(b, args.execs)
            flooded = len(flood.stdout)
    rows = [
        ["spawn -> first output line (s)", len(spawns), f"{p50(spawns):.3f}", f"{pct(spawns, 95):.3f}", ""],
        [f"stdout via on_output, {args.mb} MB (MB/s)", len(streamed), f"{p50(streamed):.1f}", "", ""],
        [f"stdout collected, {collected_mb} MB (MB/s)", len(collected), f"{p50(collected):.1f}", "", ""],
        ["exec ['true'] (ms)", len(quiet), f"{p50(quiet):.1f}", f"{pct(quiet, 95):.1f}", verdict(p50(quiet), 20)],
        ["exec ['true'] while `yes` floods (ms)", len(busy), f"{p50(busy):.1f}", f"{pct(busy, 95):.1f}", ""],
    ]
    table("processes (one bottle, TCG)", ["measure", "n", "p50", "p95", "target"], rows)
    ratios = [
        ["on_output / collected throughput", f"{p50(streamed) / p50(collected):.2f}"],
        ["exec p50 while flooding / quiet", f"{p50(busy) / p50(quiet):.2f}"],
    ]
    table("ratios (same run)", ["measure", "ratio"], ratios)
    print(f"\n(the flood's kept output at the end: {flooded} characters, bounded)")


if __name__ == "__main__":
    main()
