"""Removing what dead runs left behind, and nothing that a live run still uses.

Ownership is always pid + the kernel's start time + boot id, so a reused pid
never makes a dead run look alive (or a live one look dead).  A run directory
goes only when its own owner marker proves its owner dead: several state
directories may share one cache, so "no record in mine" proves nothing.
What the sweep may not touch (another user's process, a file it cannot
remove, a lock that stays held) is left and reported, never raised.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import LockTimeout
from ..images.cache import lock_path as image_lock
from ..net import pools
from ..store import entries
from ..store.saved import lock_path as state_lock
from ..store.saved import remove_entry
from ..vmm.process import Identity, is_alive, is_same_process, kill_pid, start_time
from .paths import cache_root, remove_tree, state_dir, temporary_owner
from .progress_sinks import prune_dead
from .runstate import RunRecord, run_dir_owner

log = logging.getLogger(__name__)

# A run directory without an owner marker may belong to a start in progress.
ORPHAN_AGE = 120.0
QEMU_EXIT_WAIT = 5.0


@dataclass
class SweepReport:
    vms: list[str] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.vms or self.processes or self.leases or self.paths or self.skipped)

    def summary(self, details: bool = True) -> str:
        """Counts, and (with ``details``) what was left and why."""
        if not self:
            return "nothing to sweep"
        text = self.counts()
        if self.skipped:
            text += f"; left {len(self.skipped)} it may not touch"
            text += (": " + "; ".join(self.skipped)) if details else ""
        return text

    def counts(self) -> str:
        """What was swept, as counts."""
        return (
            f"swept {len(self.vms)} VM record(s), {len(self.processes)} process(es), "
            f"{len(self.leases)} lease(s), {len(self.paths)} path(s)"
        )

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        log.warning("sweep left %s: %s", what, why)


def stop_vm(record: RunRecord, report: SweepReport) -> bool:
    """End one VM's QEMU and remove everything its record names.

    Its files, leases and record go only once its QEMU is provably dead: not
    when the QEMU may not be ended (another user's), when its identity cannot
    be proven, or when the record's pids belong to another pid namespace or
    machine.  Returns whether it was stopped.
    """
    if why := record.foreign():
        report.skip(f"VM {record.name}", f"{why}: its pids cannot be judged from here")
        return False
    run_dir = Path(record.run_dir)
    if record.qemu_pid:
        if not _end_qemu(f"VM {record.name} (QEMU pid {record.qemu_pid})", record.qemu_pid, record.qemu_start, report):
            return False
    elif not all(
        _end_qemu(f"VM {record.name} (QEMU pid {pid}, not in its record)", pid, start, report)
        for pid, start in _unrecorded_qemus(run_dir)
    ):
        return False
    if run_dir.exists() and not _remove(run_dir, report):
        return False
    try:
        report.leases += [f"{pool} {value} ({record.name})" for pool, value in pools.release(record.name)]
    except LockTimeout as e:
        report.skip(f"leases of {record.name}", str(e))
        return False
    record.remove()
    report.vms.append(record.name)
    return True


def _unrecorded_qemus(run_dir: Path) -> list[tuple[int, str]]:
    """QEMUs holding files of ``run_dir`` open, with their identities: one its
    owner started but had not recorded yet when it was killed (a detached one,
    ``--bottle-keep``, has no parent-death signal and would run on)."""
    if not run_dir.is_dir():
        return []
    found = []
    for pid in _pids_using(run_dir):
        try:
            program = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        except OSError:  # gone meanwhile
            continue
        if program.startswith("qemu-system") and (started := start_time(pid)) is not None:
            found.append((pid, started))
    return found


def _end_qemu(what: str, pid: int, started: Identity, report: SweepReport) -> bool:
    """Whether the QEMU ``pid`` (identified by ``started``) is dead now (ended here, or gone already)."""
    if not is_same_process(pid, started) and is_alive(pid, started):
        report.skip(what, "its pid is in use and the record (of an older version) cannot prove it is that QEMU")
        return False
    try:
        if kill_pid(pid, started):
            report.processes.append(pid)
    except PermissionError as e:
        report.skip(what, f"may not signal it: {e.strerror}")
        return False
    deadline = time.monotonic() + QEMU_EXIT_WAIT  # SIGKILL is not instant (a process in D state)
    while is_alive(pid, started):
        if time.monotonic() > deadline:
            report.skip(what, f"still alive {QEMU_EXIT_WAIT:.0f} s after SIGKILL")
            return False
        time.sleep(0.05)
    return True


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
        if not stop_vm(record, report):
            live_names.add(record.name)
    try:
        report.leases += [f"{pool} {value} ({holder})" for pool, value, holder in pools.reclaim_dead()]
    except LockTimeout as e:
        report.skip("leases of dead owners", str(e))
    for cache_dir in cache_dirs or []:
        if cache_dir.exists():
            _sweep_cache(cache_root(cache_dir, writable=False), live_names, report)
    report.paths += [str(p) for p in prune_dead(state_dir())]
    _sweep_temporaries([state_dir(), state_dir() / "vms"], report)
    return report


TEMPORARY_AGE = 600.0  # s: a write_private takes milliseconds; a pid alone may be another host's


def _sweep_temporaries(dirs: list[Path], report: SweepReport) -> None:
    """The temporaries of ``write_private`` (state files, records, markers, stamps)
    whose writer was killed: its pid gone here, and the file long untouched (a
    cache or state directory shared with another host or pid namespace)."""
    now = time.time()
    for d in dirs:
        try:
            found = [(e.name, e.stat(follow_symlinks=False)) for e in os.scandir(d) if e.is_file(follow_symlinks=False)]
        except OSError:
            continue
        for name, st in found:
            pid = temporary_owner(name)
            if pid is not None and now - st.st_mtime > TEMPORARY_AGE and not _pid_alive(pid):
                _remove(d / name, report)


def _sweep_cache(cache_dir: Path, live: set[str], report: SweepReport) -> None:
    run = cache_dir / "run"
    if run.is_dir():
        for d in run.iterdir():
            if d.name not in live:
                _sweep_run_dir(d, report)
    _sweep_snapshots(cache_dir / "snapshots", report)
    # Half-built images, seeds and snapshots of dead builders (a live builder holds its lock).
    for sub in ("images", "seeds", "snapshots"):
        root = cache_dir / sub
        if not root.is_dir():
            continue
        for d in root.glob(f"{entries.TMP_PREFIX}*"):
            pid = _pid_suffix(d.name)
            if pid is not None and not _pid_alive(pid) and not _lock_held(cache_dir, sub, d.name):
                _remove(d, report)
    _sweep_snapshot_locks(cache_dir / "snapshots", report)
    seeds = cache_dir / "seeds"
    _sweep_temporaries([cache_dir, seeds, *(d for d in seeds.glob("*") if d.is_dir() and not d.is_symlink())], report)


def _sweep_snapshots(root: Path, report: SweepReport) -> None:
    """Snapshots of sessions that died (their owner marker says so); kept ones
    (--bottle-save-failed) have no owner and stay.  One is put aside before it
    is deleted, as every entry is, and only when no fork holds its lock."""
    for d in entries.list_entries(root):
        verdict = run_dir_owner(d)
        if verdict is None:
            continue
        dead, why = verdict
        if not dead:
            if why.startswith("unreadable"):  # its owner cannot be told: a person decides
                report.skip(str(d), f"{why}; bottle snapshot rm removes it")
            continue
        try:
            with entries.flock(state_lock(d), wait=False) as free:
                if free and remove_entry(d, "rm", forget=True):  # a fork opening it holds the lock shared
                    report.paths.append(str(d))
        except OSError as e:
            report.skip(str(d), f"could not remove it: {e.strerror or e}")


def _sweep_snapshot_locks(root: Path, report: SweepReport) -> None:
    """The lock files of snapshots that are gone (a snapshot's name is never made again)."""
    if not root.is_dir():
        return
    for lock in root.glob("*.lock"):
        entry = lock.with_suffix("")
        if not lock.is_file() or lock.is_symlink():
            continue
        if entry.exists() or any(root.glob(f"{entries.TMP_PREFIX}{entry.name}-*")):
            continue
        with entries.flock(lock, wait=False) as free:
            if free:
                lock.unlink(missing_ok=True)
                report.paths.append(str(lock))


def _sweep_run_dir(d: Path, report: SweepReport) -> None:
    try:
        st = d.lstat()
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid():
        report.skip(str(d), f"belongs to uid {st.st_uid}")
        return
    if d.name.startswith("kvm-probe-"):
        pid = _pid_suffix(d.name)
        if pid is not None and not _pid_alive(pid):
            _remove(d, report)
        return
    verdict = run_dir_owner(d)
    if verdict is not None:
        dead, why = verdict
        log.debug("run dir %s: %s", d, why)
        if dead:
            _remove(d, report)
        return
    # No marker: made by an older version.  Old enough, and no process has a file open in it.
    if time.time() - st.st_mtime > ORPHAN_AGE:
        users = _pids_using(d)
        if users:
            report.skip(str(d), f"has no owner marker and is in use by pid {', '.join(map(str, users))}")
        else:
            _remove(d, report)


def _pids_using(d: Path) -> list[int]:
    """Processes (that we may inspect) with a file under ``d`` open or as cwd."""
    prefix = str(d.resolve()) + "/"
    users = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # gone, or another user's
            continue
        for link in (f"/proc/{pid}/cwd", *fds):
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if (target + "/").startswith(prefix):
                users.append(int(pid))
                break
    return users


def _remove(path: Path, report: SweepReport) -> bool:
    if left := remove_tree(path):
        report.skip(str(path), f"mounts under it could not be detached: {', '.join(left)}")
        return False
    if path.exists() or path.is_symlink():
        report.skip(str(path), "could not remove it (permissions?)")
        return False
    report.paths.append(str(path))
    return True


def _lock_held(cache_dir: Path, sub: str, tmp_name: str) -> bool:
    """Whether a builder holds the entry's lock (its pid may live in another
    pid namespace, so a dead-looking pid is not enough)."""
    entry = entries.entry_of(tmp_name)
    lock = image_lock(cache_dir, entry) if sub == "images" else state_lock(cache_dir / sub / entry)
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
    except (OverflowError, ValueError):  # no such pid could be running
        return False
    except PermissionError:
        return True
    return True
