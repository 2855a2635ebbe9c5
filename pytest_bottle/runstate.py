"""Run-state records: what each live VM holds, so a dead owner's leftovers can be found.

``<state>/vms/<name>.json`` names the owner (pid + start time), the QEMU
process (pid + start time), the VM's files and network resources.  The owner
removes it on close; ``sweep`` removes records whose owner is dead.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .paths import state_dir
from .vmm.process import is_same_process, start_time

log = logging.getLogger(__name__)

_SELF_START: float | None = None


def owner_identity() -> tuple[int, float | None]:
    """This process as an owner: pid plus start time (pid reuse cannot fool it)."""
    global _SELF_START
    if _SELF_START is None:
        _SELF_START = start_time(os.getpid())
    return os.getpid(), _SELF_START


@dataclass
class RunRecord:
    name: str
    owner_pid: int
    owner_start: float | None
    run_dir: str
    qemu_pid: int | None = None
    qemu_start: float | None = None
    netns: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def records_dir() -> Path:
        d = state_dir() / "vms"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def path(self) -> Path:
        return self.records_dir() / f"{self.name}.json"

    @classmethod
    def create(cls, name: str, run_dir: Path) -> RunRecord:
        pid, started = owner_identity()
        rec = cls(name=name, owner_pid=pid, owner_start=started, run_dir=str(run_dir))
        rec.save()
        return rec

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def owner_alive(self) -> bool:
        return is_same_process(self.owner_pid, self.owner_start)

    @classmethod
    def load_all(cls) -> list[RunRecord]:
        out = []
        for p in sorted(cls.records_dir().glob("*.json")):
            try:
                out.append(cls(**json.loads(p.read_text())))
            except (OSError, ValueError, TypeError) as e:
                log.debug("unreadable run record %s: %s", p, e)
        return out
