"""Old and new code in one run: the same measures, alternating, in fresh processes.

The old side is a throwaway ``git worktree`` of a ref, the new side this
checkout.  Each measurement is a fresh process of the same python whose
PYTHONPATH is that side's tree, so each imports its own ``pytest_bottle`` (the
child uses only ``pytest_bottle.launch``, which every version has).  Machines
drift by ~30% over minutes (DESIGN §3): trust the per-pair ratios, not the
absolute numbers.

The old side has its own cache, kept for the next run: a seed made by one side
counts as stale to the other (its image key or seed format differs), so in one
cache each side's seed creation would remove the other's and every process
would make a seed again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _util import p50, pct, table

REPO = Path(__file__).resolve().parent.parent
MEASURES = {  # key in the child's JSON -> row label
    "first": "first launch in a process -> exec (s)",
    "restore": "restore -> first exec (s)",
    "exec_ms": "exec ['true'] in a running bottle (ms)",
    "cold": "cold boot -> first exec (s)",
}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("old vs new (--old)")
    g.add_argument("--old", metavar="REF", help="measure the code at REF and this tree alternately, in one run")
    g.add_argument("--rounds", type=int, default=5, help="pairs of measurement processes (old + new)")
    g.add_argument("--ab-restores", type=int, default=3, help="timed restores per process")
    g.add_argument("--ab-execs", type=int, default=200, help="timed execs per process")
    g.add_argument("--ab-cold", type=int, default=0, help="timed cold boots per process")


@contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A detached worktree of ``ref`` in a temp dir, removed on exit (also on Ctrl-C)."""
    tmp = Path(tempfile.mkdtemp(prefix="bottle-bench-"))
    tree = tmp / "old"
    try:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--quiet", "--detach", str(tree), ref], check=True)
        yield tree
    finally:
        if tree.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def measure(
    tree: Path, extra_env: dict[str, str], restores: int = 0, execs: int = 0, cold: int = 0, quiet: bool = True
) -> dict[str, Any]:
    """Run the child with ``tree``'s pytest_bottle and ``extra_env``; return its one JSON line of numbers.

    Its stderr (notices, the same in every run) shows only when not ``quiet`` or when it fails.
    """
    argv = [sys.executable, __file__, "--child", str(restores), str(execs), str(cold)]
    env = dict(os.environ, **extra_env, PYTHONPATH=str(tree))
    stderr = subprocess.PIPE if quiet else None
    proc = subprocess.Popen(argv, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        stdout, errors = proc.communicate()
    finally:
        if proc.poll() is None:  # interrupted: a Ctrl-C reached the child too, let it close its bottle
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"measurement in {tree} failed (exit {proc.returncode}):\n{errors or ''}")
    result: dict[str, Any] = json.loads(stdout.splitlines()[-1])
    return result


def run(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM too removes the worktree
    try:
        with worktree(args.old) as old:
            runs = alternate(args, old)
    except KeyboardInterrupt:
        raise SystemExit("interrupted; the old side's worktree is removed") from None
    report(runs)


def alternate(args: argparse.Namespace, old: Path) -> dict[str, list[dict[str, Any]]]:
    counts = {"restores": args.ab_restores, "execs": args.ab_execs, "cold": args.ab_cold}
    sha = subprocess.run(["git", "-C", str(old), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    old_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pytest-bottle-bench-old"
    old_cache.mkdir(mode=0o700, exist_ok=True)
    sides = {"old": (old, {"XDG_CACHE_HOME": str(old_cache)}), "new": (REPO, {})}
    print(f"old: {args.old} ({sha.stdout.strip()}), a worktree in {old}, cache in {old_cache} (kept)")
    print(f"new: the working tree {REPO}, the default cache")
    print("Making each side's image and seed before any timing (the image key hashes the builder's source,")
    print("so the sides may use different images; a missing one is built now, ~4 min on TCG):", flush=True)
    for name, (tree, env) in sides.items():
        started = time.perf_counter()
        ready = measure(tree, env, quiet=False)
        print(f"  {name}: ready in {time.perf_counter() - started:.0f} s, imports {ready['module']}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for i in range(args.rounds):
        # Each pair alternates which side goes first, so a steady drift of the machine cancels out.
        for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
            runs[name].append(measure(*sides[name], **counts))
        print(f"  round {i + 1}/{args.rounds} done", flush=True)
    return runs


def report(runs: dict[str, list[dict[str, Any]]]) -> None:
    def samples(name: str, key: str) -> list[list[float]]:
        return [r[key] for r in runs[name]]

    rows: list[list[object]] = []
    ratios: list[list[object]] = []
    for key, label in MEASURES.items():
        old, new = samples("old", key), samples("new", key)
        if not any(old):
            continue
        for name, per_run in (("old", old), ("new", new)):
            flat = [v for run in per_run for v in run]
            rows.append([label if name == "old" else "", name, len(flat), f"{p50(flat):.3f}", f"{pct(flat, 95):.3f}"])
        pairs = sorted(p50(n) / p50(o) for o, n in zip(old, new, strict=True))
        ratios.append([label, len(pairs), f"{p50(pairs):.3f}", f"{pairs[0]:.3f}", f"{pairs[-1]:.3f}"])
    table("old vs new, alternating", ["measure", "side", "n", "p50", "p95"], rows)
    table("new / old per pair (< 1: new is faster)", ["measure", "pairs", "median", "min", "max"], ratios)


def child(restores: int, execs: int, cold: int) -> None:
    """Runs with one side's tree on PYTHONPATH; prints one JSON line."""
    import pytest_bottle

    def first_exec(**kw: object) -> float:
        started = time.perf_counter()
        with pytest_bottle.launch(**kw) as b:
            b.exec(["true"])
            return time.perf_counter() - started

    out: dict[str, object] = {"module": pytest_bottle.__file__, "first": [first_exec()]}
    out["restore"] = [first_exec() for _ in range(restores)]
    out["cold"] = [first_exec(boot="cold") for _ in range(cold)]
    exec_ms = []
    if execs:
        with pytest_bottle.launch() as b:
            b.exec(["true"])
            for _ in range(execs):
                t = time.perf_counter()
                b.exec(["true"])
                exec_ms.append((time.perf_counter() - t) * 1000)
    out["exec_ms"] = exec_ms
    print(json.dumps(out))


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    child(*(int(a) for a in sys.argv[2:5]))
