"""Removing what dead runs left behind, and nothing that a live run still uses.

Ownership is always pid + process start time, so a reused pid never makes a
dead run look alive (or a live one look dead).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from .net import pools
from .paths import remove_tree
from .runstate import RunRecord
from .vmm.process import kill_pid

log = logging.getLogger(__name__)

# A run directory without a record may belong to a start in progress.
ORPHAN_AGE = 120.0


@dataclass
class SweepReport:
    vms: list[str] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.vms or self.processes or self.leases or self.paths)

    def summary(self) -> str:
        if not self:
            return "nothing to sweep"
        return (
            f"swept {len(self.vms)} VM record(s), {len(self.processes)} process(es), "
            f"{len(self.leases)} lease(s), {len(self.paths)} path(s)"
        )


def stop_vm(record: RunRecord, report: SweepReport) -> None:
    """End one VM's QEMU and remove everything its record names."""
    if record.qemu_pid and kill_pid(record.qemu_pid, record.qemu_start):
        report.processes.append(record.qemu_pid)
    run_dir = Path(record.run_dir)
    if run_dir.exists():
        remove_tree(run_dir)
        report.paths.append(str(run_dir))
    pools.release(record.name)
    record.remove()
    report.vms.append(record.name)


def sweep(cache_dirs: list[Path] | None = None, include_kept: bool = False) -> SweepReport:
    """Remove VMs, leases and files of dead owners (and kept VMs if asked)."""
    report = SweepReport()
    live_names = set()
    for record in RunRecord.load_all():
        kept = bool(record.extra.get("kept"))
        if record.owner_alive() and not (kept and include_kept):
            live_names.add(record.name)
            continue
        log.debug("sweeping %s (owner %s dead, kept=%s)", record.name, record.owner_pid, kept)
        stop_vm(record, report)
    report.leases += [f"{pool} {value} ({holder})" for pool, value, holder in pools.reclaim_dead()]
    for cache_dir in cache_dirs or []:
        _sweep_cache(cache_dir, live_names, report)
    return report


def _sweep_cache(cache_dir: Path, live: set[str], report: SweepReport) -> None:
    now = time.time()
    run = cache_dir / "run"
    if run.is_dir():
        for d in run.iterdir():
            if d.name in live:
                continue
            pid = _pid_suffix(d.name) if d.name.startswith("kvm-probe-") else None
            dead_owner = pid is not None and not _pid_alive(pid)
            try:
                old = now - d.stat().st_mtime > ORPHAN_AGE
            except FileNotFoundError:
                continue
            if dead_owner or (pid is None and old and not (RunRecord.records_dir() / f"{d.name}.json").exists()):
                remove_tree(d)
                report.paths.append(str(d))
    # Half-built images and seeds of dead builders (a live builder holds its lock).
    for sub in ("images", "seeds"):
        root = cache_dir / sub
        if not root.is_dir():
            continue
        for d in root.glob(".tmp-*"):
            pid = _pid_suffix(d.name)
            if pid is not None and not _pid_alive(pid) and not _lock_held(cache_dir, sub, d.name):
                remove_tree(d)
                report.paths.append(str(d))


def _lock_held(cache_dir: Path, sub: str, tmp_name: str) -> bool:
    """Whether a builder holds the entry's lock (its pid may live in another
    pid namespace, so a dead-looking pid is not enough)."""
    entry = tmp_name.removeprefix(".tmp-").rsplit("-", 1)[0].removesuffix("-old").removesuffix("-discard")
    lock = cache_dir / "locks" / f"image-{entry}.lock" if sub == "images" else cache_dir / sub / f"{entry}.lock"
    if not lock.exists():
        return False
    try:
        with FileLock(str(lock), timeout=0):
            return False
    except Timeout:
        return True


def _pid_suffix(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
