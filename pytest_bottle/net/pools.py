"""Host-wide lease pools: loopback addresses, MACs, TAP names, LAN addresses.

One JSON state file under a filelock, shared by every xdist worker and every
concurrent pytest run on the host.  Each lease carries its owner's pid and
process start time; a lease whose owner is dead is free to take again.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from filelock import FileLock

from ..errors import PoolExhausted
from ..paths import state_dir
from ..runstate import owner_identity
from ..vmm.process import is_same_process

log = logging.getLogger(__name__)

# pool name → (size, index → value)
POOLS: dict[str, tuple[int, Callable[[int], str]]] = {
    # 127.77.0.1 … 127.77.255.254: the whole of 127/8 reaches lo, no alias to add.
    "loopback": (65534, lambda i: str(ipaddress.IPv4Address("127.77.0.0") + 1 + i)),
    # Locally administered unicast MACs.
    "mac": (1 << 16, lambda i: "52:54:b0:77:%02x:%02x" % (i >> 8, i & 0xFF)),
    "tap": (4096, lambda i: f"btl{i}"),
    # LAN addresses are unique host-wide, so no two LANs ever hand out the same one.
    "lan": (65533, lambda i: str(ipaddress.IPv4Address("10.77.0.0") + 2 + i)),
}


@contextmanager
def _locked() -> Iterator[dict[str, Any]]:
    path = state_dir() / "leases.json"
    with FileLock(str(state_dir() / "leases.lock")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        yield state
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)


def _alive(lease: dict[str, Any]) -> bool:
    return is_same_process(lease["pid"], lease.get("start"))


def lease(pool: str, holder: str, count: int = 1, size: int | None = None) -> list[str]:
    """Lease ``count`` free values of ``pool`` for ``holder`` (a VM name).

    ``size`` narrows the pool (tests use it to reach exhaustion).
    """
    psize, value_of = POOLS[pool]
    size = min(size or psize, psize)
    pid, started = owner_identity()
    with _locked() as state:
        leases: dict[str, dict[str, Any]] = state.setdefault(pool, {})
        for value, owner in list(leases.items()):
            if not _alive(owner):
                log.debug("reclaiming %s %s from dead owner %s", pool, value, owner)
                del leases[value]
        # Start after the highest index handed out so values are not reused at once.
        cursor = int(state.setdefault("cursor", {}).get(pool, 0))
        got: list[str] = []
        for step in range(size):
            idx = (cursor + step) % size
            value = value_of(idx)
            if value in leases:
                continue
            leases[value] = {"pid": pid, "start": started, "holder": holder}
            got.append(value)
            if len(got) == count:
                state["cursor"][pool] = (idx + 1) % size
                return got
        for value in got:
            del leases[value]
        raise PoolExhausted(pool, size)


def release(holder: str) -> None:
    """Release every lease held by ``holder``."""
    with _locked() as state:
        for pool, leases in state.items():
            if pool == "cursor":
                continue
            for value in [v for v, o in leases.items() if o.get("holder") == holder]:
                del leases[value]


def reassign(pool: str, value: str, holder: str) -> None:
    """Hand one leased value to another holder of this process (a warm TAP to its bottle)."""
    pid, started = owner_identity()
    with _locked() as state:
        state.setdefault(pool, {})[value] = {"pid": pid, "start": started, "holder": holder}


def release_value(pool: str, value: str) -> None:
    with _locked() as state:
        state.get(pool, {}).pop(value, None)


def transfer(holder: str, pid: int, started: float | None) -> None:
    """Hand ``holder``'s leases to another process (a kept VM's QEMU outlives us)."""
    with _locked() as state:
        for pool, leases in state.items():
            if pool == "cursor":
                continue
            for owner in leases.values():
                if owner.get("holder") == holder:
                    owner.update(pid=pid, start=started)


def reclaim_dead() -> list[tuple[str, str, str]]:
    """Drop leases of dead owners; return (pool, value, holder) of each."""
    out = []
    with _locked() as state:
        for pool, leases in state.items():
            if pool == "cursor":
                continue
            for value, owner in list(leases.items()):
                if not _alive(owner):
                    out.append((pool, value, owner.get("holder", "")))
                    del leases[value]
    return out


def snapshot() -> dict[str, dict[str, dict[str, Any]]]:
    """All current leases (for tests and ``bottle doctor``)."""
    with _locked() as state:
        return {p: dict(v) for p, v in state.items() if p != "cursor"}
