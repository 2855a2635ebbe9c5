"""Work seeds: cold boot vs restore, suites of fresh bottles, memory, many VMs at once.

    .venv/bin/python bench/seeds.py [--restores 20] [--cold 3] [--suite 50] [--big-suite 100]
    .venv/bin/python bench/seeds.py --old main [--rounds 5]   # old vs new, alternating (see _ab.py)

Everything runs against the default cache (image and seed are made first,
outside the timings).  Targets (DESIGN §4, TCG on 2 cores): restore -> first
exec p50 ≤ 0.25 s; cold/restore ≥ 15; 100 fresh-bottle tests under -n 2 ≤ 40 s;
8 VMs at once with no failure; host RSS of an idle 512M bottle ≤ 200 MB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _ab
import psutil
from _util import p50, pct, table, verdict

import pytest_bottle
from pytest_bottle.host.paths import default_cache_dir

SUITE = """
import time
import pytest

@pytest.mark.parametrize("i", range({n}))
def test_fresh(bottle, i):
    assert bottle.exec(["true"]).returncode == 0
    time.sleep({sleep})
"""


def first_exec(**kw: Any) -> float:
    started = time.perf_counter()
    with pytest_bottle.launch(**kw) as b:
        b.exec(["true"])
        return time.perf_counter() - started


def run_suite(n: int, workers: int, sleep: float = 0.0, prestart: int = 1) -> float:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "test_suite.py").write_text(SUITE.format(n=n, sleep=sleep))
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--bottle-cache-dir={default_cache_dir()}",
        ]
        argv.append(f"--bottle-prestart={prestart}")
        if workers:
            argv += ["-n", str(workers)]
        started = time.perf_counter()
        r = subprocess.run(argv, cwd=d, capture_output=True, text=True)
        took = time.perf_counter() - started
        if r.returncode != 0:
            raise SystemExit(f"suite failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
        return took


def idle_rss() -> tuple[float, float]:
    with pytest_bottle.launch() as b:
        b.exec(["true"])
        time.sleep(5)
        mem = psutil.Process(b.pid).memory_full_info()
        return mem.rss / 1e6, mem.pss / 1e6


def many_at_once(n: int) -> tuple[float, int, list[float]]:
    """``n`` threads each launch a bottle at once, run `true` in it and check its hostname.

    Returns the seconds until all answered, the failures, and each bottle's launch -> first exec.
    """
    errors: list[BaseException] = []
    bottles: list[pytest_bottle.Bottle] = []
    firsts: list[float] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            started = time.perf_counter()
            b = pytest_bottle.launch()
            with lock:
                bottles.append(b)
            assert b.exec(["true"]).returncode == 0
            with lock:
                firsts.append(time.perf_counter() - started)
            assert b.check_output("hostname").strip() == b.name
        except BaseException as e:
            errors.append(e)

    started = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - started
    for b in bottles:
        b.close()
    for e in errors:
        print(f"  failure: {type(e).__name__}: {e}")
    return took, len(errors), firsts


def fresh_vm(n_cold: int, n_restores: int) -> None:
    first_exec()  # image, accelerator verdict and seed exist before timing
    cold = [first_exec(boot="cold") for _ in range(n_cold)]
    restores = [first_exec() for _ in range(n_restores)]
    ratio = p50(cold) / p50(restores)
    table(
        "fresh VM -> first exec",
        ["path", "n", "p50 (s)", "p95 (s)", "target", "verdict"],
        [
            ["cold boot", len(cold), f"{p50(cold):.3f}", f"{pct(cold, 95):.3f}", "", ""],
            [
                "snapshot restore",
                len(restores),
                f"{p50(restores):.3f}",
                f"{pct(restores, 95):.3f}",
                "<= 0.25",
                verdict(p50(restores), 0.25),
            ],
            ["cold / restore ratio", "", f"{ratio:.1f}x", "", ">= 15", verdict(ratio, 15, lower_is_better=False)],
        ],
    )


def resources(n_many: int) -> None:
    rss, pss = idle_rss()
    many_s, failures, _ = many_at_once(n_many)
    table(
        "resources",
        ["measure", "value", "target", "verdict"],
        [
            ["host RSS of an idle 512M bottle (MB)", f"{rss:.0f}", "<= 200", verdict(rss, 200)],
            ["  its PSS (MB)", f"{pss:.0f}", "", ""],
            [f"{n_many} VMs at once: failures", failures, "0", verdict(failures, 0)],
            [f"{n_many} VMs at once: all up and answering (s)", f"{many_s:.1f}", "", ""],
        ],
    )


def suites(n: int, n_big: int) -> None:
    rows = []
    for tests, workers in ((n, 0), (n, 2), (n_big, 2)):
        if tests:
            took = run_suite(tests, workers)
            target = "<= 40" if (tests, workers) == (100, 2) else ""
            rows.append(
                [
                    f"{tests} tests, -n {workers}",
                    f"{took:.1f}",
                    f"{took / tests:.2f}",
                    target,
                    verdict(took, 40) if target else "",
                ]
            )
    table(
        "suites of fresh-bottle tests (wall clock, includes pytest start)",
        ["suite", "total (s)", "per test (s)", "target", "verdict"],
        rows,
    )


def prestart_overhead() -> None:
    # Tests that do something (here: sleep 1 s) leave time to restore the next
    # bottle in the background; the overhead is what a test pays beyond its body.
    n, body = 10, 1.0
    over = {p: (run_suite(n, 0, body, prestart=p) - n * body) / n for p in (0, 1)}
    table(
        f"per-test bottle overhead, {n} tests of {body:g} s each, -n 0 (includes pytest start / {n})",
        ["prestart", "overhead per test (s)"],
        [[p, f"{o:.3f}"] for p, o in over.items()],
    )
    print(f"  ratio without / with pre-start: {over[0] / max(over[1], 1e-3):.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold", type=int, default=3)
    ap.add_argument("--restores", type=int, default=20)
    ap.add_argument("--suite", type=int, default=50)
    ap.add_argument("--big-suite", type=int, default=100)
    ap.add_argument("--many", type=int, default=8)
    _ab.add_arguments(ap)
    args = ap.parse_args()
    if args.old:
        _ab.run(args)
        return
    fresh_vm(args.cold, args.restores)
    resources(args.many)
    suites(args.suite, args.big_suite)
    prestart_overhead()


if __name__ == "__main__":
    main()
