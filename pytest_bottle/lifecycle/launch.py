"""Assembling a bottle: image, accelerator, leases, seed or cold boot, clone handshake.

Every resource is pushed on an ExitStack as soon as it exists, so a start
that fails halfway releases exactly what it took, and ``Bottle.close``
releases the rest in reverse order.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..agent.channel import AgentChannel
from ..agent.client import AgentClient
from ..agent.handshake import Handshake, NicSetup
from ..bottle import Bottle
from ..errors import BootError, BottleError, HostDependencyError, LockTimeout, SpecError
from ..host.deps import which
from ..host.paths import remove_tree
from ..host.runstate import RunRecord, create_run_dir
from ..images import Image, ensure_image
from ..net import pools
from ..net.lan import LanRegistry
from ..spec import BottleSpec, resolve
from ..ssh import SshAccess, client_key, new_host_key
from ..store.saved import SavedState, StateCorrupt, discard, in_use, verify
from ..store.seeds import SEED_MACS, USER_NET, ensure_seed
from ..vmm import accel as accel_mod
from ..vmm.machine import QemuMachine
from ..vmm.qemu import Forward, Nic
from .boot import BootPlan, run_probe, start_machine

log = logging.getLogger(__name__)

_verdicts: dict[tuple[str, Path], accel_mod.Verdict] = {}
_helpers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bottle-launch")
# QEMU's complaint when a memory state does not load: the seed is bad, not the request.
_RESTORE_FAILURES = (
    "load of migration failed",
    "error while loading state",
    "Unknown savevm section",
    "Missing section footer",
    "Failed to load",
    "not a migration stream",
)
# QEMU's complaint when a host port of a forward cannot be bound (taken since we checked).
_FORWARD_FAILURE = "Could not set up host forwarding rule"
_FORWARD_PORT = r"host forwarding rule 'tcp:[^']*?:(\d+)-"
PORT_ATTEMPTS = 3

RESOLV_NAT = "nameserver 10.0.2.3\n"
RESOLV_NONE = '# network="none": no DNS (lookups fail at once instead of timing out)\n'


def launch(*, detached: bool = False, **kwargs: Any) -> Bottle:
    """Start a bottle without pytest; use it as a context manager.

    Takes the marker's keyword arguments plus ``accel`` and ``cache_dir``.
    ``detached=True`` starts QEMU so that it can outlive this process, which
    ``Bottle.keep()`` needs; otherwise QEMU dies with the process.
    """
    if not isinstance(detached, bool):
        raise SpecError(f"detached must be True or False, not {detached!r}", "launch()")
    return start_bottle(resolve([("launch()", kwargs)]), detached=detached)


def accel_for(requested: str, image: Image, cache_dir: Path) -> accel_mod.Verdict:
    key = (requested, cache_dir)
    if key not in _verdicts:
        _verdicts[key] = accel_mod.decide(requested, cache_dir, lambda t: _probe_kvm(image, cache_dir, t))
    return _verdicts[key]


def _probe_kvm(image: Image, cache_dir: Path, timeout: float) -> accel_mod.ProbeResult:
    run_dir = cache_dir / "run" / f"kvm-probe-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = BootPlan(image.kernel, image.initrd, image.rootfs, "raw", 512, 1, "kvm", (Nic("net0", SEED_MACS[0]),))
    try:
        return run_probe(plan, run_dir, timeout)
    finally:
        remove_tree(run_dir)


def new_name() -> str:
    return f"btl-{secrets.token_hex(4)}"


_library_lans = LanRegistry()


def _release_leases(name: str) -> None:
    """Release a failed start's leases without hiding why it failed: a lease
    lock that stays held only leaves them until this process ends (then they
    are a dead owner's, free to take), so it is logged, not raised."""
    try:
        pools.release(name)
    except LockTimeout as e:
        log.warning("could not release the leases of %s: %s", name, e)


def start_bottle(
    spec: BottleSpec, *, rebuild_before: float | None = None, detached: bool = False, lans: LanRegistry | None = None
) -> Bottle:
    """Start a bottle for a resolved spec.  ``lans`` scopes LAN names (default: process-wide)."""
    image = ensure_image(spec.image, spec.cache_dir, rebuild_before=rebuild_before)
    verdict = accel_for(spec.accel, image, spec.cache_dir)
    name = new_name()
    stack = ExitStack()
    try:
        run_dir = create_run_dir(spec.cache_dir / "run" / name)
        stack.callback(remove_tree, run_dir)
        record = RunRecord.create(name, run_dir)
        stack.callback(record.remove)
        stack.callback(_release_leases, name)
        macs = pools.lease("mac", name, 2 if spec.lan else 1)

        ssh_wanted = image.recipe.has_sshd
        host_key: Future[tuple[str, str] | None] | None = None
        if ssh_wanted:  # ssh-keygen runs while the VM boots
            host_key = _helpers.submit(new_host_key, name)
        identity = client_key(spec.cache_dir) if ssh_wanted and which("ssh-keygen") else None
        # What every clone of this cache shares goes into the seed, not the handshake.
        baked: dict[str, str | None] = {
            "authorized_keys": identity.with_suffix(".pub").read_text() if identity else None,
            # Without egress, a nameserver that never answers makes every lookup
            # hang for seconds; no nameserver makes it fail at once.
            "resolv_conf": RESOLV_NONE,
        }
        ports = sorted(set(spec.forward) | ({22} if ssh_wanted else set()))
        alias = pools.lease("loopback", name)[0] if ports else ""
        lan_nics: tuple[Nic, ...] = ()
        lan_ip, tap_fd = None, -1
        if spec.lan:
            registry = _library_lans if lans is None else lans
            lan = registry.acquire(spec.lan)
            stack.callback(registry.release, spec.lan)
            tap_fd, tap, lan_ip = lan.attach(name)
            tap_holder = _Fd(tap_fd)
            stack.callback(tap_holder.close)
            record.netns = f"net:[{lan.inode}]"
            record.extra.update(tap=tap, lan=spec.lan)
            lan_nics = (Nic("net1", macs[1], "tap", tap_fd=tap_fd),)

        def on_spawn(m: QemuMachine) -> None:
            # Recorded before the boot: a detached QEMU (--bottle-keep) has no
            # parent-death signal, so a sweep must be able to find it.
            record.qemu_pid, record.qemu_start = m.pid, m.started
            record.save()

        start = _Start(spec, image, verdict.accel, run_dir, name, rebuild_before, detached, baked, on_spawn)
        machine, channel, found, forwards = _boot_forwarding(start, macs[0], alias, ports, lan_nics)
        stack.callback(channel.close)
        stack.callback(machine.stop)
        if tap_fd >= 0:  # QEMU holds the TAP now: it disappears when QEMU does
            tap_holder.close()

        key_pair = host_key.result() if host_key is not None else None
        per_boot: dict[str, Any] = dict(baked) if spec.boot == "cold" else {}  # a clone has these from its seed
        if spec.network == "nat":
            per_boot["resolv_conf"] = RESOLV_NAT
        # Without egress only forwarded connections reach the user NIC: they
        # announce it on first use (Bottle.address), off the restore path.
        lazy_arp = spec.network == "none"
        # A clone has its seed's default route already: checking costs.
        user_net = USER_NET if spec.boot == "cold" else {"ip": USER_NET["ip"]}
        handshake = time.perf_counter()
        agent = AgentClient(channel)
        nics = [NicSetup(macs[0], found[0]["match"], found[0].get("name"), announce=not lazy_arp, **user_net)]
        if lan_ip:
            nics.append(NicSetup(macs[1], found[1]["match"], found[1].get("name"), ip=lan_ip))
        done = agent.setup(Handshake.fresh(name, nics, ssh_host_key=key_pair, baked=per_boot), timeout=60)
        announce = dict(name=done.nic_name(macs[0]), mac=macs[0], ip=USER_NET["ip"]) if lazy_arp else None
        log.debug("%s: clone handshake took %.1f ms", name, (time.perf_counter() - handshake) * 1000)
        if spec.boot == "cold":  # as settled as a snapshot clone: boot finished
            agent.settle(timeout=spec.timeout, quiet=0)
        ssh: SshAccess | BottleError | None = None
        if ssh_wanted and not (key_pair and identity):
            ssh = HostDependencyError("ssh-keygen", "openssh-client", "needed for SSH access to bottles")
        if key_pair and identity:
            ssh = SshAccess.create(name, alias, forwards[22][1], identity, key_pair[1], run_dir)
        return Bottle(
            name=name,
            image=image.name,
            accel=verdict.accel,
            machine=machine,
            channel=channel,
            resources=stack,
            forwards=forwards,
            ssh=ssh,
            record=record,
            lan_ip=lan_ip.split("/")[0] if lan_ip else None,
            announce=announce,
        )
    except BaseException:
        stack.close()
        raise


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


@dataclass(frozen=True)
class _Start:
    """What every attempt at starting one bottle's machine shares."""

    spec: BottleSpec
    image: Image
    accel: str
    run_dir: Path
    name: str
    rebuild_before: float | None
    detached: bool
    baked: dict[str, str | None]
    on_spawn: Callable[[QemuMachine], None]


def _boot_forwarding(
    start: _Start, mac: str, alias: str, ports: list[int], lan_nics: tuple[Nic, ...]
) -> tuple[QemuMachine, AgentChannel, tuple[dict[str, str], ...], dict[int, tuple[str, int]]]:
    """``_boot`` with the forwarded ports; a port taken between ``_host_port``'s
    check and QEMU's bind (QEMU then exits) is picked again, a bounded number of times."""
    taken: set[int] = set()
    for attempt in range(1, PORT_ATTEMPTS + 1):
        forwards = {p: (alias, _host_port(alias, p, frozenset(taken))) for p in ports}
        user_nic = Nic(
            "net0",
            mac,
            "user",
            restrict=start.spec.network == "none",
            forwards=tuple(Forward(alias, hp, p) for p, (_, hp) in forwards.items()),
        )
        try:
            machine, channel, found = _boot(start, (user_nic, *lan_nics))
            return machine, channel, found, forwards
        except BootError as e:
            if _FORWARD_FAILURE not in e.reason or attempt == PORT_ATTEMPTS:
                raise
            lost = {int(p) for p in re.findall(_FORWARD_PORT, e.reason)} or {hp for _, hp in forwards.values()}
            log.info("%s: host port(s) %s taken before QEMU could bind them; picking again", start.name, lost)
            taken |= lost
            _reset_run_dir(start.run_dir)
    raise AssertionError("unreachable")


def _reset_run_dir(run_dir: Path) -> None:
    """Forget a failed attempt: its log would be read as the next one's."""
    for f in ("qemu.log", "qemu.argv", "console.log", "disk.qcow2"):
        (run_dir / f).unlink(missing_ok=True)


def _boot(start: _Start, nics: tuple[Nic, ...]) -> tuple[QemuMachine, AgentChannel, tuple[dict[str, str], ...]]:
    """Restore from a seed (rebuilding a bad or vanished one once) or boot cold.

    Returns the machine, its channel and how the guest's NICs are found now
    (their MAC, and their name when known).
    """
    spec, image = start.spec, start.image
    if spec.boot == "cold":
        plan = BootPlan(image.kernel, image.initrd, image.rootfs, "raw", spec.memory_mb, spec.cpus, start.accel, nics)
        machine, channel = start_machine(plan, start.run_dir, start.name, spec.timeout, start.detached, start.on_spawn)
        return machine, channel, tuple({"match": n.mac} for n in nics)
    for attempt in (1, 2):
        seed = ensure_seed(
            image, start.accel, spec.memory_mb, spec.cpus, len(nics), spec.cache_dir, start.rebuild_before, start.baked
        )
        plan = BootPlan(
            image.kernel,
            image.initrd,
            seed.disk,
            "qcow2",
            spec.memory_mb,
            spec.cpus,
            start.accel,
            nics,
            incoming=seed.memory,
            console_prefix=seed.console,
            ram_file=seed.ram,
        )
        try:
            with in_use(seed):  # no pruner removes it before QEMU has its files open
                machine, channel = start_machine(
                    plan, start.run_dir, start.name, spec.timeout, start.detached, start.on_spawn
                )
            found = [{"match": mac} for mac in SEED_MACS[: len(nics)]]
            for nic, nic_name in zip(found, seed.nic_names, strict=False):  # an older seed knows none
                nic["name"] = nic_name
            return machine, channel, tuple(found)
        except BootError as e:
            fault = _seed_fault(seed, e)
            if attempt == 2 or fault is None:
                raise
            discard(seed, fault)
            _reset_run_dir(start.run_dir)
    raise AssertionError("unreachable")


def _seed_fault(seed: SavedState, error: BootError) -> str | None:
    """Why a failed restore is the seed's fault (its files went or do not load), or None."""
    if any(s in error.reason for s in _RESTORE_FAILURES):
        return f"restoring it failed: {error.reason.strip()[-300:]}"
    try:
        verify(seed)
    except StateCorrupt as e:  # removed or changed since it was verified
        return f"{e.reason} (while a clone started from it)"
    return None
