"""Runtime: cold boot to first exec, exec round trip, file transfer throughput.

    .venv/bin/python bench/boot.py [--boots 5] [--execs 100] [--mb 100]

Uses the default cache (the image is built first if needed).  Target (DESIGN
§4): exec of `true` p50 ≤ 20 ms.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _util import p50, pct, table, verdict

import pytest_bottle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("--execs", type=int, default=100)
    ap.add_argument("--mb", type=int, default=100)
    args = ap.parse_args()

    pytest_bottle.launch(boot="cold").close()  # build image / probe accelerator outside the timings

    cold: list[float] = []
    for _ in range(args.boots):
        started = time.perf_counter()
        with pytest_bottle.launch(boot="cold") as b:
            b.exec(["true"])
            cold.append(time.perf_counter() - started)
            accel = b.accel

    with pytest_bottle.launch() as b:
        b.exec(["true"])  # warm the guest's path through the agent
        execs = []
        for _ in range(args.execs):
            t = time.perf_counter()
            b.exec(["true"])
            execs.append((time.perf_counter() - t) * 1000)
        shell = []
        for _ in range(args.execs // 4):
            t = time.perf_counter()
            b.exec("true")
            shell.append((time.perf_counter() - t) * 1000)
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "big.bin"
            with open(src, "wb") as f:
                for _ in range(args.mb):
                    f.write(os.urandom(1 << 20))
            t = time.perf_counter()
            b.put(src, "/var/tmp/big.bin")
            put_s = time.perf_counter() - t
            t = time.perf_counter()
            b.get("/var/tmp/big.bin", Path(d) / "back.bin")
            get_s = time.perf_counter() - t
            assert (Path(d) / "back.bin").read_bytes() == src.read_bytes()

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
