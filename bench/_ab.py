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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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
# Also in the child's JSON when asked for: "blocks" (translated blocks from restore to the
# first answered `true`, one per launch of the default image), "restore:IMAGE" and
# "blocks:IMAGE" for other images, "rss_mb" and "pss_mb" (one idle bottle per process).


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("old vs new (--old)")
    g.add_argument("--old", metavar="REF", help="measure the code at REF and this tree alternately, in one run")
    g.add_argument("--rounds", type=int, default=5, help="pairs of measurement processes (old + new)")
    g.add_argument("--ab-restores", type=int, default=3, help="timed restores per process")
    g.add_argument("--ab-execs", type=int, default=200, help="timed execs per process")
    g.add_argument("--ab-cold", type=int, default=0, help="timed cold boots per process")
    g.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="fresh seeds per side, each in a cache of its own (images hard-linked); round i uses "
        "seed i %% N. Seeds of the same code differ by ~3%% in blocks and 2-3 MB in RSS",
    )


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
    tree: Path,
    extra_env: dict[str, str],
    restores: int = 0,
    execs: int = 0,
    cold: int = 0,
    quiet: bool = True,
    *,
    images: Sequence[str] = (),
    blocks: bool = False,
    idle: float = 0.0,
) -> dict[str, Any]:
    """Run the child with ``tree``'s pytest_bottle and ``extra_env``; return its one JSON line of numbers.

    ``images``: other images than the default, each launched once first and then
    ``restores`` times; ``blocks``: count translated blocks in every launch;
    ``idle``: seconds a bottle idles after its first `true` before its host RSS is read.
    Its stderr (notices, the same in every run) shows only when not ``quiet`` or when it fails.
    """
    spec = {"restores": restores, "execs": execs, "cold": cold, "images": list(images), "blocks": blocks, "idle": idle}
    argv = [sys.executable, __file__, "--child", json.dumps(spec)]
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


def run(args: argparse.Namespace, measures: dict[str, str] = MEASURES, **extra: Any) -> dict[str, list[dict[str, Any]]]:
    """Alternate old and new, print the tables of ``measures`` and return every process's numbers.

    ``extra``: more keyword arguments of ``measure`` (``images``, ``blocks``, ``idle``).
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM too removes the worktree
    try:
        with worktree(args.old) as old:
            runs = alternate(args, old, extra)
    except KeyboardInterrupt:
        raise SystemExit("interrupted; the old side's worktree is removed") from None
    report(runs, measures)
    return runs


def alternate(args: argparse.Namespace, old: Path, extra: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    counts = {"restores": args.ab_restores, "execs": args.ab_execs, "cold": args.ab_cold, **extra}
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
        ready = measure(tree, env, quiet=False, images=extra.get("images", ()))
        print(f"  {name}: ready in {time.perf_counter() - started:.0f} s, imports {ready['module']}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    n = max(1, args.seeds)
    caches: list[Path] = []
    try:
        per_seed = {name: [side] for name, side in sides.items()}
        if n > 1:
            default_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            for name, (tree, env) in sides.items():
                roots = seed_caches(name, Path(env.get("XDG_CACHE_HOME") or default_root), n, caches)
                per_seed[name] = [(tree, {"XDG_CACHE_HOME": str(r)}) for r in roots]
                for k, side in enumerate(per_seed[name]):
                    started = time.perf_counter()
                    measure(*side, images=extra.get("images", ()))  # makes its seeds
                    print(f"  {name}: seed {k + 1}/{n} made in {time.perf_counter() - started:.0f} s", flush=True)
        for i in range(args.rounds):
            # Each pair alternates which side goes first, so a steady drift of the machine cancels out.
            for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                runs[name].append(measure(*per_seed[name][i % n], **counts))
            print(f"  round {i + 1}/{args.rounds} done", flush=True)
    finally:
        for root in caches:
            shutil.rmtree(root, ignore_errors=True)
    return runs


def seed_caches(side: str, root: Path, n: int, made: list[Path]) -> list[Path]:
    """``n`` new cache roots (for XDG_CACHE_HOME) holding ``root``'s images as
    hard links, so that each makes a seed of its own.  Each is added to
    ``made`` as soon as it exists, for the caller to remove (also after a failure)."""
    src = root / "pytest-bottle" / "images"
    out = []
    for k in range(n):
        new = Path(tempfile.mkdtemp(prefix=f"bottle-bench-{side}-seed{k}-", dir=root))
        made.append(new)
        out.append(new)
        images = new / "pytest-bottle" / "images"
        images.mkdir(parents=True)
        os.chmod(images.parent, 0o700)
        for image in sorted(src.iterdir()):
            if image.is_dir() and not image.name.startswith("."):
                subprocess.run(["cp", "-al", str(image), str(images)], check=True)
        if (src.parent / "accel.json").exists():  # the KVM probe's verdict: no probe boot per seed
            shutil.copy2(src.parent / "accel.json", images.parent)
    return out


def samples(runs: dict[str, list[dict[str, Any]]], side: str, key: str) -> list[float]:
    """All of one side's values of ``key``, over its processes."""
    return [v for r in runs[side] for v in r.get(key, [])]


def pair_ratios(runs: dict[str, list[dict[str, Any]]], key: str) -> list[float]:
    """new p50 / old p50 of ``key`` for each pair of processes, sorted."""
    pairs = zip(runs["old"], runs["new"], strict=True)
    return sorted(p50(n[key]) / p50(o[key]) for o, n in pairs if o.get(key) and n.get(key))


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}"


def report(runs: dict[str, list[dict[str, Any]]], measures: dict[str, str] = MEASURES) -> None:
    rows: list[list[object]] = []
    ratios: list[list[object]] = []
    for key, label in measures.items():
        if not samples(runs, "old", key) or not samples(runs, "new", key):
            continue
        for name in ("old", "new"):
            flat = samples(runs, name, key)
            rows.append([label if name == "old" else "", name, len(flat), _num(p50(flat)), _num(pct(flat, 95))])
        pairs = pair_ratios(runs, key)
        ratios.append([label, len(pairs), f"{p50(pairs):.3f}", f"{pairs[0]:.3f}", f"{pairs[-1]:.3f}"])
    table("old vs new, alternating", ["measure", "side", "n", "p50", "p95"], rows)
    table("new / old per pair (< 1: new is faster or smaller)", ["measure", "pairs", "median", "min", "max"], ratios)


def tb_count(bottle: Any) -> int:
    """QEMU's translated blocks so far in ``bottle``'s process (``info jit``)."""
    text = bottle._machine.qmp.cmd("human-monitor-command", **{"command-line": "info jit"})
    found = re.search(r"TB count\s+(\d+)", text)
    if not found:
        raise SystemExit(f"no TB count in `info jit`:\n{text}")
    return int(found.group(1))


def child(spec: dict[str, Any]) -> None:
    """Runs with one side's tree on PYTHONPATH; prints one JSON line.

    Uses only what every version has: ``launch``, ``exec``, ``pid`` and the machine's QMP.
    """
    import pytest_bottle

    out: dict[str, Any] = {"module": pytest_bottle.__file__}

    def first_exec(image: str = "", **kw: Any) -> float:
        started = time.perf_counter()
        named: dict[str, Any] = {"image": image} if image else {}
        with pytest_bottle.launch(**named, **kw) as b:
            b.exec(["true"])
            took = time.perf_counter() - started
            if spec["blocks"] and not kw:
                out.setdefault(f"blocks:{image}" if image else "blocks", []).append(tb_count(b))
            return took

    out["first"] = [first_exec()]
    for image in spec["images"]:
        first_exec(image)  # its image and seed are made first, as the default one's are above
    out["restore"] = [first_exec() for _ in range(spec["restores"])]
    for image in spec["images"]:
        out[f"restore:{image}"] = [first_exec(image) for _ in range(spec["restores"])]
    out["cold"] = [first_exec(boot="cold") for _ in range(spec["cold"])]
    exec_ms = []
    if spec["execs"] or spec["idle"]:
        with pytest_bottle.launch() as b:
            b.exec(["true"])
            if spec["idle"]:
                import psutil

                time.sleep(spec["idle"])
                mem = psutil.Process(b.pid).memory_full_info()
                out["rss_mb"], out["pss_mb"] = [mem.rss / 1e6], [mem.pss / 1e6]
            for _ in range(spec["execs"]):
                t = time.perf_counter()
                b.exec(["true"])
                exec_ms.append((time.perf_counter() - t) * 1000)
    out["exec_ms"] = exec_ms
    print(json.dumps(out))


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    child(json.loads(sys.argv[2]))
