"""Runtime: cold boot to first exec, exec round trip, file transfer throughput.

    .venv/bin/python bench/boot.py [--boots 5] [--execs 100] [--mb 100]
    .venv/bin/python bench/boot.py --old main [--rounds 5] [--ab-cold 1]   # old vs new (see _ab.py)

Uses the default cache (the image is built first if needed).  Target (DESIGN
§4): exec of `true` p50 ≤ 20 ms.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _ab
from _util import p50, pct, table, verdict

import pytest_bottle


def round_trips_ms(n: int, call: Callable[[], object]) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1000)
    return times


def transfer_seconds(b: pytest_bottle.Bottle, mb: int) -> tuple[float, float]:
    """Seconds to put, then get back, ``mb`` MB of random bytes."""
    with tempfile.TemporaryDirectory() as d:
        src, back = Path(d) / "big.bin", Path(d) / "back.bin"
        with open(src, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
        t = time.perf_counter()
        b.put(src, "/var/tmp/big.bin")
        put_s = time.perf_counter() - t
        t = time.perf_counter()
        b.get("/var/tmp/big.bin", back)
        get_s = time.perf_counter() - t
        assert back.read_bytes() == src.read_bytes()
    return put_s, get_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("--execs", type=int, default=100)
    ap.add_argument("--mb", type=int, default=100)
    _ab.add_arguments(ap)
    args = ap.parse_args()
    if args.old:
        _ab.run(args)
        return

    pytest_bottle.launch(boot="cold").close()  # build image / probe accelerator outside the timings

    cold: list[float] = []
    for _ in range(args.boots):
        started = time.perf_counter()
        with pytest_bottle.launch(boot="cold") as b:
            b.exec(["true"])
            cold.append(time.perf_counter() - started)

    with pytest_bottle.launch() as b:
        b.exec(["true"])  # warm the guest's path through the agent
        accel = b.accel
        execs = round_trips_ms(args.execs, lambda: b.exec(["true"]))
        shell = round_trips_ms(args.execs // 4, lambda: b.exec("true"))
        put_s, get_s = transfer_seconds(b, args.mb)

    table(
        f"runtime (accel {accel})",
        ["measure", "n", "p50", "p95", "target", "verdict"],
        [
            ["cold boot -> first exec (s)", len(cold), f"{p50(cold):.2f}", f"{pct(cold, 95):.2f}", "", ""],
            [
                "exec ['true'] round trip (ms)",
                len(execs),
                f"{p50(execs):.1f}",
                f"{pct(execs, 95):.1f}",
                "<= 20",
                verdict(p50(execs), 20),
            ],
            ["exec 'true' via /bin/sh (ms)", len(shell), f"{p50(shell):.1f}", f"{pct(shell, 95):.1f}", "", ""],
            [f"put {args.mb} MB (MB/s)", 1, f"{args.mb / put_s:.0f}", "", "", ""],
            [f"get {args.mb} MB (MB/s)", 1, f"{args.mb / get_s:.0f}", "", "", ""],
        ],
    )


if __name__ == "__main__":
    main()
