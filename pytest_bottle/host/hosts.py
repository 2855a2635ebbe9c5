"""Hosts of a run: who this host is, and its one startup sweep per run.

A run may spread over several hosts (pytest-xdist ``--tx ssh=HOST``).
Everything a bottle holds is per host: the run state (records, leases) lives
in this host's state dir, images and seeds in this host's cache.  So each host
is swept once when a run starts, by whichever of the run's processes gets
there first (the controller on its own host, the first worker elsewhere),
under a lock in the host's state dir; the others find the run in
``host-runs.json`` and go on.  That file also keeps the run's start *as this
host's clock saw it* (``--bottle-rebuild`` compares it with this host's file
times: another host's clock may be off).

A host is named by its hostname plus a random id kept in its state dir
(``host-id``), never by anything the controller sees: two hosts may share a
hostname or a home directory, not a state dir (it is local: /run, or
$XDG_RUNTIME_DIR).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import LockTimeout
from .locks import lock_holder
from .paths import state_dir, write_json
from .sweep import SweepReport, sweep

log = logging.getLogger(__name__)

ID_FILE = "host-id"
RUNS_FILE = "host-runs.json"
RUNS_LOCK = "host-runs.lock"
# Runs remembered per host: enough for concurrent runs, small to read.
KEEP_RUNS = 64
# A sweep ends dead VMs (up to 5 s each to die): a wait this long means a stuck holder.
LOCK_TIMEOUT = 300.0


@dataclass(frozen=True)
class HostIdentity:
    name: str  # hostname, for people
    id: str  # random, kept in the host's state dir: tells hosts of one name apart

    @property
    def label(self) -> str:
        return f"{self.name} [{self.id[:8]}]"

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "id": self.id}

    @classmethod
    def from_dict(cls, d: object) -> HostIdentity | None:
        if isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("id"), str):
            return cls(d["name"], d["id"])
        return None


def host_identity(state: Path | None = None) -> HostIdentity:
    """This host: its hostname and the random id in its state dir (made on first use)."""
    state = state or state_dir()
    path = state / ID_FILE
    for _ in range(3):
        try:
            ident = path.read_text().strip()
            if ident:
                return HostIdentity(socket.gethostname(), ident)
        except FileNotFoundError:
            pass
        tmp = state / f".{ID_FILE}.{os.getpid()}.tmp"
        tmp.write_text(secrets.token_hex(16) + "\n")
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # the first writer wins; the others read its id
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    raise OSError(f"{path}: cannot make or read the host id")


@dataclass(frozen=True)
class HostStart:
    """What the run's start on this host found."""

    start: float  # the run's start by this host's clock
    swept_by: str  # who swept this host for the run ("controller", "gw2"...)
    report: SweepReport | None  # the sweep's report if this process swept, else None


def start_run_on_host(run_id: str, cache_dir: Path, by: str, start: float | None = None) -> HostStart:
    """Sweep this host (``cache_dir`` and the state dir) unless a process of
    run ``run_id`` did already; return the run's start on this host.

    ``start``: the start to record if this process sweeps (the controller's
    own); a worker records the time it swept.  Raises ``LockTimeout`` if
    another process holds this host's sweep lock for ``LOCK_TIMEOUT``."""
    state = state_dir()
    lock = state / RUNS_LOCK
    try:
        held = FileLock(str(lock), timeout=LOCK_TIMEOUT, mode=0o600).acquire()
    except Timeout:
        raise LockTimeout(str(lock), LOCK_TIMEOUT, lock_holder(lock)) from None
    with held:
        runs = _load_runs(state / RUNS_FILE)
        if (known := runs.get(run_id)) is not None:
            return HostStart(float(known["start"]), str(known.get("by", "?")), None)
        report = sweep([cache_dir])
        now = time.time()
        begun = now if start is None else start
        runs[run_id] = {"start": begun, "by": by, "at": now}
        if len(runs) > KEEP_RUNS:
            for old in sorted(runs, key=lambda r: float(runs[r].get("at", 0)))[: len(runs) - KEEP_RUNS]:
                del runs[old]
        write_json(state / RUNS_FILE, runs)
    if report:
        log.info("pytest-bottle startup sweep of %s (by %s): %s", socket.gethostname(), by, report.summary())
    return HostStart(begun, by, report)


def _load_runs(path: Path) -> dict[str, dict[str, float | str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("start"), (int, float))}


def new_run_id() -> str:
    return secrets.token_hex(12)


@dataclass
class WorkerHost:
    """What a worker said about where it ran (or that it said nothing)."""

    worker: str
    host: HostIdentity | None
    bottles: int = 0


def summary_line(workers: list[WorkerHost], controller: HostIdentity | None) -> str | None:
    """``bottles ran on: hostA (gw0: 3, gw1: 2; the controller's host), hostB (gw2: 4)``
    (bottles started per worker): the hosts
    whose workers started bottles; a worker that went down without a word
    (killed, crashed) is listed as ``unknown``, since it may have started
    some; None if no worker started a bottle and none went down.  The id is
    shown only where two hosts share a name; the controller's host is marked."""
    by_host: dict[HostIdentity | None, list[WorkerHost]] = {}
    for w in sorted(workers, key=lambda w: _worker_order(w.worker)):
        if w.host is None or w.bottles:
            by_host.setdefault(w.host, []).append(w)
    if not by_host:  # no bottles in this run: nothing to say
        return None
    names = [h.name for h in by_host if h is not None]
    parts = []
    for host, ws in by_host.items():
        if host is None:
            parts.append(f"unknown ({', '.join(w.worker for w in ws)}: went down without a report)")
            continue
        label = host.label if names.count(host.name) > 1 else host.name
        per_worker: dict[str, int] = {}  # a worker xdist replaced after it went down has its name
        for w in ws:
            per_worker[w.worker] = per_worker.get(w.worker, 0) + w.bottles
        counts = ", ".join(f"{worker}: {n}" for worker, n in per_worker.items())
        mine = "; the controller's host" if controller is not None and host.id == controller.id else ""
        parts.append(f"{label} ({counts}{mine})")
    return "bottles ran on: " + ", ".join(parts)


def _worker_order(name: str) -> tuple[int, str]:
    digits = name.lstrip("gw")
    return (int(digits), name) if digits.isdigit() else (1 << 30, name)
