"""Everything one bottle holds on the host, with one owner.

The run directory, its run-state record, the MAC and loopback leases, the
host ports of its forwards, its LAN attachment (the TAP fd until QEMU holds
it) and, once started, its machine and agent channel.  Each is pushed on an
ExitStack as soon as it exists, so a start that fails halfway releases
exactly what it took, and ``close`` releases the rest in reverse order.
``hand_over`` passes it all to a machine that outlives us (``Bottle.keep``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

from ..agent.channel import AgentChannel
from ..errors import BootError, LockTimeout
from ..host.paths import remove_tree
from ..host.runstate import RunRecord, create_run_dir
from ..net import pools
from ..net.lan import Lan, LanRegistry
from ..store.saved import SavedState
from ..vmm.backend import Machine
from ..vmm.forks import at_exit
from .boot import forget_attempt
from .plan import LAN_NIC, Forwards, Plan

log = logging.getLogger(__name__)
T = TypeVar("T")

# QEMU's complaint when a host port of a forward cannot be bound (taken since we checked).
_FORWARD_FAILURE = "Could not set up host forwarding rule"
_FORWARD_PORT = r"host forwarding rule 'tcp:[^']*?:(\d+)-"
PORT_ATTEMPTS = 3


class Resources:
    """What one bottle holds; ``take`` it, then ``close`` or ``hand_over``."""

    def __init__(self, name: str, plan: Plan | None = None) -> None:
        self.name = name
        self.plan = plan
        self.restored: SavedState | None = None  # the seed or snapshot its machine resumed (None: cold boot)
        self.run_dir = Path()
        self.record: RunRecord | None = None
        self.macs: tuple[str, ...] = ()
        self.alias = ""  # the loopback address forwards are published on
        self.forwards: dict[int, tuple[str, int]] = {}
        self.lan_ip: str | None = None  # "address/prefix" on the LAN
        self.lan: Lan | None = None
        self._tap = _Fd(-1)
        self._stack = ExitStack()
        self._closing = threading.RLock()

    @classmethod
    def take(cls, plan: Plan, lans: LanRegistry) -> Resources:
        """A run directory and record, a MAC per NIC, a loopback address if
        anything is forwarded and a TAP on the LAN; on failure nothing stays taken."""
        name, lan = plan.name, plan.spec.lan
        res = cls(name, plan)
        stack = res._stack
        _held.add(res)
        stack.callback(_held.discard, res)
        try:
            res.run_dir = create_run_dir(plan.spec.cache_dir / "run" / name)
            stack.callback(remove_tree, res.run_dir)
            record = res.record = RunRecord.create(name, res.run_dir)
            stack.callback(record.remove)
            stack.callback(_release_leases, name)
            res.macs = tuple(pools.lease("mac", name, plan.nic_count))
            if plan.ports:
                res.alias = pools.lease("loopback", name)[0]
            if lan:
                res.lan = net = lans.acquire(lan)
                stack.callback(lans.release, lan)
                stack.callback(net.leave, name)
                fd, tap, res.lan_ip = net.attach(name)
                res._tap = _Fd(fd)
                stack.callback(res._tap.close)
                record.netns = f"net:[{net.inode}]"
                record.extra.update(tap=tap, lan=lan)
        except BaseException:
            res.close()
            raise
        return res

    @property
    def tap_fds(self) -> dict[str, int]:
        """The TAP QEMU is to get, by NIC id (none once QEMU holds it)."""
        return {LAN_NIC: self._tap.fd} if self._tap.fd >= 0 else {}

    def spawned(self, machine: Machine) -> None:
        """Record the machine's pid before it boots: a detached QEMU
        (--bottle-keep) has no parent-death signal, so a sweep must find it."""
        assert self.record is not None
        self.record.qemu_pid, self.record.qemu_start = machine.pid, machine.started
        self.record.save()

    def adopt(self, machine: Machine, channel: AgentChannel) -> None:
        """Own a started machine and its channel (stopped before the rest is released)."""
        self._stack.callback(channel.close)
        self._stack.callback(machine.stop)
        self._tap.close()  # QEMU holds the TAP now: it disappears when QEMU does

    def with_host_ports(self, ports: Sequence[int], boot: Callable[[Forwards], T]) -> T:
        """``boot(forwards)`` with a host port for each guest port in ``ports``.

        A port taken between ``_host_port``'s check and QEMU's bind (QEMU then
        exits) is picked again, a bounded number of times."""
        taken: set[int] = set()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.forwards = {p: (self.alias, _host_port(self.alias, p, frozenset(taken))) for p in ports}
            try:
                return boot(self.forwards)
            except BootError as e:
                if _FORWARD_FAILURE not in e.reason or attempt == PORT_ATTEMPTS:
                    raise
                lost = {int(p) for p in re.findall(_FORWARD_PORT, e.reason)}
                lost = lost or {hp for _, hp in self.forwards.values()}
                log.info("%s: host port(s) %s taken before QEMU could bind them; picking again", self.name, lost)
                taken |= lost
                self.reset_run_dir()
        raise AssertionError("unreachable")

    def reset_run_dir(self) -> None:
        """Forget a failed attempt: its log would be read as the next one's."""
        forget_attempt(self.run_dir)

    def close(self) -> None:
        """Release everything, in reverse order.  Idempotent; a second caller
        (the exit handler, while a thread closes) waits for the first."""
        with self._closing:
            self._stack.close()

    def hand_over(self, machine: Machine) -> None:
        """Pass the leases and the run-state record to ``machine``'s process,
        which outlives us: sweeps leave them alone while it runs, and nothing
        is released here any more."""
        with self._closing:
            self._hand_over(machine)

    def _hand_over(self, machine: Machine) -> None:
        pools.transfer(self.name, machine.pid, machine.started)
        if self.record is not None:
            self.record.owner_pid, self.record.owner_start = machine.pid, machine.started
            self.record.extra["kept"] = True
            self.record.extra["agent_socket"] = _expose_agent(machine, self.run_dir)
            self.record.save()
        self._stack.pop_all()
        _held.discard(self)


# Taken and neither closed nor handed over.  A bottle never closed (a
# ``launch()`` without ``with``) is closed at exit, not left to the next sweep:
# registered after qmp's own exit handler (imported above), this one runs first.
_held: set[Resources] = set()


def _close_held() -> None:
    for res in list(_held):  # a forked child's set is empty (below)
        try:
            res.close()
        except Exception as e:  # the others still go
            log.warning("bottle %s: could not be released at exit: %s", res.name, e)


at_exit(_close_held, priority=20)  # before the snapshots' removal (10)
os.register_at_fork(after_in_child=_held.clear)  # the parent's bottles are not the child's to release


# Where a kept machine serves its agent (``bottle shell``), in its run
# directory (mode 0700: only this user may connect).
AGENT_SOCKET = "agent.sock"
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def _expose_agent(machine: Machine, run_dir: Path) -> str | None:
    """The socket path a kept machine's agent answers on, or None (logged):
    keeping the machine must not fail for want of a shell."""
    path = run_dir / AGENT_SOCKET
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        log.warning("%s: its run directory's path is too long for a Unix socket; no `bottle shell`", run_dir)
        return None
    try:
        machine.expose_agent(path)
    except Exception as e:  # an old QEMU without chardev-change, QMP gone
        log.warning("%s: cannot serve its agent on %s: %s", run_dir.name, path, e)
        return None
    return str(path)


def _release_leases(name: str) -> None:
    """Release a failed start's leases without hiding why it failed: a lease
    lock that stays held only leaves them until this process ends (then they
    are a dead owner's, free to take), so it is logged, not raised."""
    try:
        pools.release(name)
    except LockTimeout as e:
        log.warning("could not release the leases of %s: %s", name, e)


def _unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def _host_port(alias: str, guest_port: int, avoid: frozenset[int] = frozenset()) -> int:
    """The guest's own port number on the bottle's loopback address, unless it
    cannot be had there: a port below ip_unprivileged_port_start as non-root,
    one a host service holds on all addresses (sshd on 0.0.0.0:22), or one
    in ``avoid`` (taken after an earlier check).  Then a free port on that
    address; ``address()`` says which."""
    if guest_port not in avoid and (os.geteuid() == 0 or guest_port >= _unprivileged_port_start()):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as QEMU binds it
            try:
                s.bind((alias, guest_port))
                return guest_port
            except OSError:
                pass
    with socket.socket() as s:
        s.bind((alias, 0))
        return int(s.getsockname()[1])


class _Fd:
    """Closes an fd once, however many times it is asked to."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
