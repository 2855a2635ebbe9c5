"""The clone handshake: what makes a started machine this bottle.

A snapshot clone shares RNG state, clock, machine-id and SSH host keys with
its siblings; the handshake reseeds entropy, sets the clock and gives it its
own identity and MACs.  Every agent call of a start is in this module.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ..agent.client import SETUP_TIMEOUT, AgentClient
from ..agent.handshake import Handshake, NicSetup
from ..errors import BottleError, HostDependencyError
from ..host.deps import which
from ..ssh import SshAccess, client_key, new_host_key
from ..store.saved import SavedState
from ..store.seeds import SEED_MACS, USER_NET
from ..vmm.forks import ForkSafePool
from .plan import SSH_PORT, Plan
from .resources import Resources

log = logging.getLogger(__name__)

# ssh-keygen takes milliseconds; a failed start waits this long at most for it (its error
# is not held up: a slow one removes its run directory itself when it ends).
KEYGEN_WAIT = 1.0
RESOLV_NAT = "nameserver 10.0.2.3\n"
RESOLV_NONE = '# network="none": no DNS (lookups fail at once instead of timing out)\n'

_helpers = ForkSafePool(4, "bottle-launch")

# How the host finds a guest NIC: by "match" (its MAC now) and "name" (when known).
Found = dict[str, str]


@dataclass(frozen=True)
class Keys:
    """A bottle's SSH material: its host key (made while it boots) and this cache's client key."""

    host_key: Future[tuple[str, str] | None] | None
    identity: Path | None

    @classmethod
    def start(cls, plan: Plan) -> Keys:
        if not plan.ssh:
            return cls(None, None)
        # ssh-keygen runs while the VM boots
        host_key = _helpers.submit(new_host_key, plan.name, plan.spec.cache_dir / "run")
        return cls(host_key, client_key(plan.spec.cache_dir) if which("ssh-keygen") else None)

    def discard(self) -> None:
        """After a failed start: wait briefly for the host key being made, whose run
        directory goes with it, so that none is left when the start's error is raised."""
        if self.host_key is not None:
            with contextlib.suppress(Exception):  # its own failure is no news: the start failed already
                self.host_key.result(timeout=KEYGEN_WAIT)

    def baked(self) -> dict[str, str | None]:
        """What every clone of this cache shares: it goes into the seed, not the handshake."""
        return {
            "authorized_keys": self.identity.with_suffix(".pub").read_text() if self.identity else None,
            # Without egress, a nameserver that never answers makes every lookup
            # hang for seconds; no nameserver makes it fail at once.
            "resolv_conf": RESOLV_NONE,
        }


def found_cold(macs: tuple[str, ...]) -> tuple[Found, ...]:
    """A cold-booted guest's NICs: the bottle's own MACs."""
    return tuple({"match": mac} for mac in macs)


def found_restored(state: SavedState, nics: int) -> tuple[Found, ...]:
    """A restored guest's NICs: its seed's MACs (a snapshot's: its source's), and
    their names when the state knows them."""
    macs = state.manifest.get("guest_macs") or SEED_MACS
    found = [{"match": str(mac)} for mac in macs[:nics]]
    for nic, nic_name in zip(found, state.nic_names, strict=False):  # an older seed knows none
        nic["name"] = nic_name
    return tuple(found)


@dataclass(frozen=True)
class Done:
    """What the handshake left: the SSH host key, and the user NIC's announce if deferred."""

    host_key: tuple[str, str] | None
    announce: dict[str, str] | None


def clone_setup(
    agent: AgentClient,
    plan: Plan,
    res: Resources,
    found: tuple[Found, ...],
    keys: Keys,
    baked: dict[str, str | None],
    deadline: float,
) -> Done:
    """Give the started guest its identity, MACs and addresses, by ``deadline``
    (``time.monotonic()``: the end of the bottle's start ``timeout``; a
    ``TimeoutError`` then)."""
    spec, macs = plan.spec, res.macs

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:  # the agent answered at the very end: the start is late all the same
            raise TimeoutError("no time was left for it")
        return remaining

    key_pair = keys.host_key.result(timeout=left()) if keys.host_key is not None else None
    per_boot = dict(baked) if spec.boot == "cold" else {}  # a clone has these from its seed
    if spec.network == "nat":
        per_boot["resolv_conf"] = RESOLV_NAT
    # Without egress only forwarded connections reach the user NIC: they
    # announce it on first use (Bottle.address), off the restore path.
    lazy_arp = spec.network == "none"
    # A clone has its seed's default route already: checking costs.
    gateway = USER_NET["gateway"] if spec.boot == "cold" else None
    nics = [_nic(found[0], macs[0], USER_NET["ip"], gateway=gateway, announce=not lazy_arp)]
    if res.lan_ip:
        nics.append(_nic(found[1], macs[1], res.lan_ip))
    started = time.perf_counter()
    shake = Handshake.fresh(plan.name, nics, ssh_host_key=key_pair, baked=per_boot)
    done = agent.setup(shake, timeout=min(SETUP_TIMEOUT, left()))
    announce = dict(name=done.nic_name(macs[0]), mac=macs[0], ip=USER_NET["ip"]) if lazy_arp else None
    log.debug("%s: clone handshake took %.1f ms", plan.name, (time.perf_counter() - started) * 1000)
    return Done(key_pair, announce)


def _nic(found: Found, mac: str, ip: str, *, gateway: str | None = None, announce: bool = True) -> NicSetup:
    return NicSetup(mac, found["match"], found.get("name"), ip=ip, gateway=gateway, announce=announce)


def ssh_access(
    plan: Plan, res: Resources, keys: Keys, host_key: tuple[str, str] | None
) -> SshAccess | BottleError | None:
    """The bottle's SSH access, why it has none although its image has sshd, or None."""
    if not plan.ssh:
        return None
    if not (host_key and keys.identity):
        return HostDependencyError("ssh-keygen", "openssh-client", "needed for SSH access to bottles")
    return SshAccess.create(plan.name, res.alias, res.forwards[SSH_PORT][1], keys.identity, host_key[1], res.run_dir)
