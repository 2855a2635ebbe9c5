"""Run-state records: what each live VM holds, so a dead owner's leftovers can be found.

``<state>/vms/<name>.json`` names the owner (pid + start identity), the QEMU
process (pid + start identity), the VM's files and network resources.  The
owner removes it on close; ``sweep`` removes records whose owner is dead.

Each run directory in a cache carries its own ``owner.json`` marker with the
same owner and QEMU identities: several state directories (root and a user,
with and without ``XDG_RUNTIME_DIR``) may share one cache, and a sweep must
only remove a run directory whose marker proves it dead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..vmm.process import Identity, boot_id, foreign, is_alive, machine_id, pid_namespace, start_time
from .paths import state_dir, write_json

log = logging.getLogger(__name__)

MARKER = "owner.json"
# (pid, identity) of this process: keyed by pid, as a forked child inherits it.
_SELF: tuple[int, str | None] | None = None


def owner_identity() -> tuple[int, str | None]:
    """This process as an owner: pid plus kernel start time (pid reuse cannot fool it)."""
    global _SELF
    pid = os.getpid()
    if _SELF is None or _SELF[0] != pid:
        _SELF = (pid, start_time(pid))
    return _SELF


@dataclass
class RunRecord:
    name: str
    owner_pid: int
    owner_start: Identity
    run_dir: str
    qemu_pid: int | None = None
    qemu_start: Identity = None
    netns: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Where the pids above mean something: a state dir may be shared across
    # pid namespaces (containers) or machines (an NFS home).
    machine: str = field(default_factory=machine_id)
    pid_ns: str = field(default_factory=pid_namespace)
    # Older versions cannot read this record (an unknown field), so they skip
    # it instead of failing on an identity they do not understand.
    format: int = 2

    @staticmethod
    def records_dir() -> Path:
        d = state_dir() / "vms"
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    @property
    def path(self) -> Path:
        return self.records_dir() / f"{self.name}.json"

    @classmethod
    def create(cls, name: str, run_dir: Path) -> RunRecord:
        pid, started = owner_identity()
        rec = cls(name=name, owner_pid=pid, owner_start=started, run_dir=str(run_dir))
        rec._write()  # the run dir's marker (create_run_dir) already says the same
        return rec

    def _write(self) -> None:
        write_json(self.path, asdict(self))

    def save(self) -> None:
        self._write()
        run_dir = Path(self.run_dir)
        if (run_dir / MARKER).is_file():  # the owner may have passed to QEMU (--bottle-keep)
            write_marker(run_dir, self.owner_pid, self.owner_start, self.qemu_pid, self.qemu_start)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def foreign(self) -> str | None:
        """Why this record's pids cannot be judged here (so it counts as alive), or None."""
        return foreign(self.machine, self.pid_ns)

    def owner_alive(self) -> bool:
        return bool(self.foreign()) or is_alive(self.owner_pid, self.owner_start)

    @classmethod
    def load_all(cls) -> list[RunRecord]:
        out = []
        for p in sorted(cls.records_dir().glob("*.json")):
            try:
                # Records written before machine and pid_ns were stored are this host's.
                out.append(cls(**{"machine": "", "pid_ns": "", **json.loads(p.read_text())}))
            except (OSError, ValueError, TypeError) as e:
                log.debug("unreadable run record %s: %s", p, e)
        return out


def create_run_dir(run_dir: Path) -> Path:
    """A new run directory (mode 0700), marked with this process as its owner."""
    run_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.mkdir(run_dir, 0o700)
    try:
        write_marker(run_dir, *owner_identity())
    except BaseException:  # a full disk: no unmarked directory left for the sweep to guess at
        with contextlib.suppress(OSError):
            os.rmdir(run_dir)
        raise
    return run_dir


def write_marker(
    run_dir: Path, pid: int, started: Identity, qemu_pid: int | None = None, qemu_start: Identity = None
) -> None:
    marker = {
        "uid": os.geteuid(),
        "pid": pid,
        "start": started,
        "qemu_pid": qemu_pid,
        "qemu_start": qemu_start,
        "boot_id": boot_id(),
        "machine": machine_id(),
        "pid_ns": pid_namespace(),
        "state_dir": os.environ.get("BOTTLE_STATE_DIR", ""),
    }
    write_json(run_dir / MARKER, marker)


def run_dir_owner(run_dir: Path) -> tuple[bool, str] | None:
    """(dead, why) from a run directory's marker, or None if it has none.

    Dead only when provable: the owner and its QEMU are both gone (or the
    marker is from an earlier boot of this machine).  A marker from another
    machine (a cache on an NFS home) or pid namespace cannot prove anything
    about its pids, so it counts as alive; so does one that does not say
    which machine wrote it and is of another boot.
    """
    try:
        m = json.loads((run_dir / MARKER).read_text())
        pid, started = int(m["pid"]), m["start"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        return False, f"unreadable owner marker ({e})"
    if why := foreign(m.get("machine"), m.get("pid_ns")):
        return False, f"owner pid {pid}: {why}"
    if m.get("boot_id") != boot_id():
        if not m.get("machine"):
            return False, "owner ran in another boot, perhaps of another machine"
        return True, "owner ran in an earlier boot"
    if is_alive(pid, started):
        return False, f"owner pid {pid} is alive"
    if m.get("qemu_pid") and is_alive(int(m["qemu_pid"]), m.get("qemu_start")):
        return False, f"QEMU pid {m['qemu_pid']} is alive"
    return True, f"owner pid {pid} is gone"
