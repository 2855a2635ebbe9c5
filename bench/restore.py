"""The restore path (issue 18): translated blocks, old vs new, many at once, and the alternatives.

    .venv/bin/python bench/restore.py [--old main] [--rounds 5] [--many 16] [--compare 30]
    .venv/bin/python bench/restore.py --only blocks --rounds 1   # the block counts alone, a minute
    .venv/bin/python bench/restore.py --only many,compare        # this tree only, no old side
    .venv/bin/python bench/restore.py --old main --only ab --seeds 3 --rounds 6  # over 3 seeds a side

Parts (``--only``, comma-separated; all but ``blocks`` by default, ~5 min on a
2-core TCG host once images and seeds exist):

- ``ab``: the code at ``--old REF`` (a ``git worktree``) and this tree, alternating
  in fresh processes (``_ab.py``): translated blocks from restore to the first
  answered `true` (QEMU's ``info jit`` "TB count", which does not depend on the
  host's speed) for the default image and for ``debian-trixie``; restore ->
  first exec; host RSS and PSS of an idle 512M bottle (after `true` and
  ``--idle`` s); exec of `true` in a running bottle.  Each side's images and
  seeds are made first, outside the timings (trixie's build takes minutes once).
- ``blocks``: the same processes without the idle bottle and the execs.
- ``many``: ``--many`` bottles launched at once by as many threads on this tree,
  each running `true` first: failures and launch -> first exec.
- ``compare``: alternating per iteration, on this tree: a bottle's ``launch()``
  -> `true` -> close; a fresh container, ``podman run --rm --network=none IMAGE
  true`` (rootful, runc; IMAGE is a bookworm minbase from mmdebstrap, imported
  once with ``podman import`` and kept); QEMU's floor, ``-M microvm -S`` started
  and quit over QMP.  Without podman or runc that column is skipped and the
  packages to install are printed; nothing is installed.

Seeds of the same code differ (each is a boot of its own): ~3% in blocks and
2-3 MB in RSS. For changes that small, ``--seeds N`` gives each side N fresh
seeds (round i uses seed i mod N; make ``--rounds`` a multiple of N).

Targets (issue 18, TCG on 2 cores): ≤ 18,000 blocks for each image; restore ->
first exec ≥ 1.4 times faster than the old side (new/old per pair ≤ 0.714); idle RSS
≤ 100 MB; exec `true` p50 ≤ 20 ms; no failure of 16 bottles at once; bottle ≤
1.6 times the container.  Trust blocks and per-pair ratios: wall clock drifts
(DESIGN §3).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _ab
from _util import p50, pct, table, verdict
from seeds import first_exec, many_at_once

import pytest_bottle
from pytest_bottle.host.deps import require, which
from pytest_bottle.images.sources import host_sources

PARTS = ("ab", "blocks", "many", "compare")
OTHER_IMAGE = "debian-trixie"
MEASURES = {
    "blocks": "translated blocks, restore -> first true (default image)",
    f"blocks:{OTHER_IMAGE}": f"translated blocks, restore -> first true ({OTHER_IMAGE})",
    "restore": "restore -> first exec (s)",
    f"restore:{OTHER_IMAGE}": f"restore -> first exec, {OTHER_IMAGE} (s)",
    "rss_mb": "host RSS of an idle 512M bottle (MB)",
    "pss_mb": "  its PSS (MB)",
    "exec_ms": "exec ['true'] in a running bottle (ms)",
}
BLOCKS_TARGET, RESTORE_RATIO_TARGET, RSS_TARGET, EXEC_TARGET, PODMAN_TARGET = 18_000, 1 / 1.4, 100, 20, 1.6
CONTAINER_PREFIX = "bottle-bench-"
Targets = list[list[object]]
CAPTURE: dict[str, Any] = {"capture_output": True, "text": True}


def old_vs_new(args: argparse.Namespace, full: bool) -> Targets:
    if not full:
        args.ab_execs = 0
    runs = _ab.run(args, MEASURES, images=[OTHER_IMAGE], blocks=True, idle=args.idle if full else 0.0)
    rows: Targets = []
    for key, image in (("blocks", "default image"), (f"blocks:{OTHER_IMAGE}", OTHER_IMAGE)):
        new = p50(_ab.samples(runs, "new", key))
        rows.append([f"blocks, {image}, new p50", f"{new:,.0f}", f"<= {BLOCKS_TARGET:,}", verdict(new, BLOCKS_TARGET)])
    ratio = p50(_ab.pair_ratios(runs, "restore"))
    rows.append(
        ["restore -> first exec, new/old per pair", f"{ratio:.3f}", "<= 0.714", verdict(ratio, RESTORE_RATIO_TARGET)]
    )
    if full:
        rss, exec_ms = (p50(_ab.samples(runs, "new", k)) for k in ("rss_mb", "exec_ms"))
        rows.append(["idle 512M bottle RSS, new p50 (MB)", f"{rss:.0f}", f"<= {RSS_TARGET}", verdict(rss, RSS_TARGET)])
        rows.append(["exec true, new p50 (ms)", f"{exec_ms:.1f}", f"<= {EXEC_TARGET}", verdict(exec_ms, EXEC_TARGET)])
    return rows


def many(n: int) -> Targets:
    first_exec()  # image and seed exist before timing
    took, failures, firsts = many_at_once(n)
    rows: list[list[object]] = [[f"{n} at once: failures", failures, "", ""]]
    if firsts:
        rows.append(["  launch -> first exec (s)", len(firsts), f"{p50(firsts):.3f}", f"{pct(firsts, 95):.3f}"])
    rows.append(["  all up and answering (s)", "", f"{took:.2f}", ""])
    table(f"{n} bottles at once (threads, this tree)", ["measure", "n", "p50", "p95"], rows)
    rows = [[f"{n} bottles at once: failures", failures, "0", verdict(failures, 0)]]
    if firsts:
        rows.append([f"{n} bottles at once: launch -> first exec p95 (s)", f"{pct(firsts, 95):.3f}", "", ""])
    return rows


# --- the alternatives -------------------------------------------------------------------------


def bench_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "pytest-bottle-bench"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def podman_missing() -> str | None:
    """Why the podman column cannot run here, with what to install; None if it can."""
    missing = [p for p in ("podman", "runc", "mmdebstrap") if not which(p)]
    if missing:
        return f"{', '.join(missing)} not found; install with: apt-get install {' '.join(missing)}"
    if os.geteuid() != 0:
        return "the comparison is with rootful podman: run as root"
    return None


def podman_image() -> str:
    """A bookworm minbase rootfs from mmdebstrap, imported once into podman and kept."""
    recipe = ["mmdebstrap", "--variant=minbase", "bookworm"]
    key = hashlib.sha256(" ".join(recipe).encode()).hexdigest()[:12]
    name = f"localhost/pytest-bottle-bench/bookworm-minbase:{key}"
    if subprocess.run(["podman", "image", "exists", name]).returncode == 0:
        return name
    tarball = bench_cache() / f"bookworm-minbase-{key}.tar"
    if not tarball.is_file():
        print(f"making the container's rootfs: {' '.join(recipe)} (the host's apt sources) ...", flush=True)
        with tempfile.TemporaryDirectory(dir=bench_cache()) as tmp:
            mirrors = []
            if sources := host_sources("bookworm"):
                (Path(tmp) / "host.sources").write_text(sources)
                mirrors = [str(Path(tmp) / "host.sources")]
            out = Path(tmp) / "rootfs.tar"
            subprocess.run([*recipe, "--quiet", str(out), *mirrors], check=True)
            out.rename(tarball)
    print(f"podman import {tarball} {name}", flush=True)
    subprocess.run(["podman", "import", "--quiet", str(tarball), name], check=True, stdout=subprocess.DEVNULL)
    return name


@contextlib.contextmanager
def containers_removed(podman: bool) -> Iterator[None]:
    """On the way out, remove any container of ours that ``--rm`` did not (an interrupted run)."""
    try:
        yield
    finally:
        if podman:  # without it nothing was started, and there is nobody to ask
            ls = ["podman", "ps", "-a", "--filter", f"name=^{CONTAINER_PREFIX}{os.getpid()}-", "--format", "{{.ID}}"]
            left = subprocess.run(ls, **CAPTURE).stdout.split()
            if left:
                subprocess.run(["podman", "rm", "--force", *left], capture_output=True)


def podman_argv(image: str) -> list[str]:
    """``podman run --rm --network=none IMAGE true`` with runc, as this host lets it run; printed.

    Where setrlimit cannot raise limits (a sandbox), runc fails to apply podman's
    default nofile and nproc (1048576 and more): then the run carries lower ones.
    """
    argv = ["podman", "--runtime", "runc", "run", "--rm", "--network=none"]
    probe = subprocess.run([*argv, "--name", f"{CONTAINER_PREFIX}{os.getpid()}-probe", image, "true"], **CAPTURE)
    if probe.returncode != 0 and "setting rlimit" in probe.stderr:
        argv += ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
        print("podman: this host refuses podman's default rlimits (setrlimit: not permitted); runs carry lower ones")
    elif probe.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} {image} true failed:\n{probe.stderr}")
    print(f"container: {' '.join(argv)} {image} true", flush=True)
    return argv


def podman_true(argv: list[str], image: str, i: int) -> float:
    started = time.perf_counter()
    subprocess.run([*argv, "--name", f"{CONTAINER_PREFIX}{os.getpid()}-{i}", image, "true"], check=True)
    return time.perf_counter() - started


def qemu_floor() -> float:
    """``-M microvm -S`` started with a QMP socket and quit over it: start -> exit (s)."""
    qemu = require("qemu-system-x86_64", "measure QEMU's floor")
    host, guest = socket.socketpair()
    argv = [qemu, "-M", "microvm", "-S", "-nodefaults", "-display", "none", "-accel", "tcg"]
    argv += ["-chardev", f"socket,id=qmp,fd={guest.fileno()}", "-mon", "chardev=qmp,mode=control"]
    with host, guest, host.makefile("rwb", buffering=0) as f:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, pass_fds=[guest.fileno()], stdin=subprocess.DEVNULL)
        try:
            f.readline()  # the greeting
            for command in ("qmp_capabilities", "quit"):
                f.write(json.dumps({"execute": command}).encode() + b"\n")
                while "return" not in json.loads(f.readline() or b'{"return": "gone"}'):
                    pass  # an event
            proc.wait(10)
            return time.perf_counter() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def bottle_true() -> float:
    started = time.perf_counter()
    with pytest_bottle.launch() as b:
        b.exec(["true"])
    return time.perf_counter() - started


def compare(n: int) -> Targets:
    why_not = podman_missing()
    columns: dict[str, Callable[[int], float]] = {"bottle": lambda _: bottle_true(), "floor": lambda _: qemu_floor()}
    if why_not:
        print(f"\npodman column skipped: {why_not}")
    with containers_removed(podman=not why_not):
        if not why_not:
            image = podman_image()
            argv = podman_argv(image)
            columns["podman"] = lambda i: podman_true(argv, image, i)
        times: dict[str, list[float]] = {k: [] for k in columns}
        for call in columns.values():
            call(-1)  # warm: image, seed, page cache, podman's storage
        for i in range(n):
            names = list(columns)
            for name in names[i % len(names) :] + names[: i % len(names)]:  # each first in turn
                times[name].append(columns[name](i))
    labels = {
        "bottle": "bottle launch() -> true -> close",
        "podman": "podman run --rm --network=none (runc) true",
        "floor": "qemu -M microvm -S, QMP quit",
    }
    rows = [[labels[k], len(v), f"{p50(v) * 1000:.0f}", f"{pct(v, 95) * 1000:.0f}"] for k, v in times.items()]
    title = "a fresh bottle vs a fresh container vs QEMU's floor (alternating, this tree)"
    table(title, ["", "n", "p50 ms", "p95 ms"], rows)
    ratio_rows: list[list[object]] = []
    for other in ("podman", "floor"):
        if other in times:
            per = sorted(b / o for b, o in zip(times["bottle"], times[other], strict=True))
            whole = p50(times["bottle"]) / p50(times[other])
            ratio_rows.append([f"bottle / {other}", f"{whole:.2f}", *(f"{r:.2f}" for r in (p50(per), per[0], per[-1]))])
    table("ratios", ["", "of p50s", "per iteration median", "min", "max"], ratio_rows)
    if "podman" not in times:
        return [["bottle / podman", "skipped", f"<= {PODMAN_TARGET}", ""]]
    ratio = p50(times["bottle"]) / p50(times["podman"])
    return [["bottle / podman, p50s", f"{ratio:.2f}", f"<= {PODMAN_TARGET}", verdict(ratio, PODMAN_TARGET)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="ab,many,compare", help=f"parts to run, comma-separated: {','.join(PARTS)}")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds an idle bottle waits before its RSS is read")
    ap.add_argument("--many", type=int, default=16, help="bottles launched at once")
    ap.add_argument("--compare", type=int, default=30, help="iterations of bottle / podman / floor")
    _ab.add_arguments(ap)
    ap.set_defaults(old="main")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        ap.error(f"unknown part(s) {', '.join(sorted(parts - set(PARTS)))}; the parts are {', '.join(PARTS)}")
    started = time.perf_counter()
    targets: Targets = []
    if parts & {"ab", "blocks"}:
        targets += old_vs_new(args, full="ab" in parts)
    if "many" in parts:
        targets += many(args.many)
    if "compare" in parts:
        targets += compare(args.compare)
    table("targets (issue 18)", ["measure", "value", "target", "verdict"], targets)
    print(f"\n(whole run: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
