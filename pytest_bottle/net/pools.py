"""Host-wide lease pools: loopback addresses, MACs, TAP names, LAN addresses.

One JSON state file under a filelock, shared by every xdist worker and every
concurrent pytest run on the host.  Each lease carries its owner's pid and
process start identity; a lease whose owner is dead is free to take again.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from filelock import FileLock, Timeout

from ..errors import LockTimeout, PoolExhausted
from ..host.locks import lock_holder
from ..host.paths import state_dir, write_json
from ..host.runstate import owner_identity
from ..vmm.process import Identity, foreign, is_alive, machine_id, pid_namespace, wall_start

log = logging.getLogger(__name__)

# Nobody holds the lease lock for more than a JSON read and write: a wait this
# long means a stuck or hostile holder, and saying who beats hanging forever.
LOCK_TIMEOUT = 60.0

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
    state = state_dir()
    path = state / "leases.json"
    lock_path = state / "leases.lock"
    try:
        lock = FileLock(str(lock_path), timeout=LOCK_TIMEOUT, mode=0o600).acquire()
    except Timeout:
        raise LockTimeout(str(lock_path), LOCK_TIMEOUT, lock_holder(lock_path)) from None
    with lock:
        try:
            leases = json.loads(path.read_text())
        except (OSError, ValueError):
            leases = {}
        yield leases
        write_json(path, leases)


def _alive(lease: dict[str, Any]) -> bool:
    # An owner on another machine or in another pid namespace cannot be judged
    # by its pid here: its leases stay until a sweep where it ran frees them.
    if foreign(lease.get("machine"), lease.get("pid_ns")):
        return True
    return is_alive(lease["pid"], lease.get("id", lease.get("start")))


def _owner(pid: int, started: Identity, holder: str) -> dict[str, Any]:
    # "start" is what older versions read (a wall-clock time); "id" is ours.
    return {
        "pid": pid,
        "start": wall_start(pid),
        "id": started,
        "holder": holder,
        "machine": machine_id(),
        "pid_ns": pid_namespace(),
    }


def lease(pool: str, holder: str, count: int = 1, size: int | None = None) -> list[str]:
    """Lease ``count`` free values of ``pool`` for ``holder`` (a VM name).

    ``size`` narrows the pool (tests use it to reach exhaustion).
    """
    psize, value_of = POOLS[pool]
    size = min(size or psize, psize)
    entry = _owner(*owner_identity(), holder)
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
            leases[value] = dict(entry)
            got.append(value)
            if len(got) == count:
                state["cursor"][pool] = (idx + 1) % size
                return got
        for value in got:
            del leases[value]
        raise PoolExhausted(pool, size)


def release(holder: str) -> list[tuple[str, str]]:
    """Release every lease held by ``holder``; return (pool, value) of each."""
    released = []
    with _locked() as state:
        for pool, leases in state.items():
            if pool == "cursor":
                continue
            for value in [v for v, o in leases.items() if o.get("holder") == holder]:
                del leases[value]
                released.append((pool, value))
    return released


def reassign(pool: str, value: str, holder: str) -> None:
    """Hand one leased value to another holder of this process (a warm TAP to its bottle)."""
    entry = _owner(*owner_identity(), holder)
    with _locked() as state:
        state.setdefault(pool, {})[value] = entry


def release_value(pool: str, value: str) -> None:
    with _locked() as state:
        state.get(pool, {}).pop(value, None)


def transfer(holder: str, pid: int, started: Identity) -> None:
    """Hand ``holder``'s leases to another process (a kept VM's QEMU outlives us)."""
    with _locked() as state:
        for pool, leases in state.items():
            if pool == "cursor":
                continue
            for owner in leases.values():
                if owner.get("holder") == holder:
                    owner.update(_owner(pid, started, holder))


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
