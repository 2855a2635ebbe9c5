"""The clone handshake: what the host tells a machine right after a restore or
a cold boot (see ``guest.identity``), built in one place for clones and seeds."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Setup values a seed may hold so that its clones need not write them again.
BAKED_KEYS = frozenset({"authorized_keys", "resolv_conf"})


@dataclass(frozen=True)
class NicSetup:
    """One NIC: the guest finds it by ``match`` (the MAC it has now) or by
    ``name`` when known, and gives it ``mac`` and ``ip`` (CIDR)."""

    mac: str
    match: str
    name: str | None = None
    ip: str | None = None
    gateway: str | None = None  # the default route, if there is none yet
    announce: bool = True  # a gratuitous ARP now; False leaves it to ``AgentClient.announce``

    def to_call(self) -> dict[str, Any]:
        out: dict[str, Any] = {"match": self.match, "mac": self.mac}
        if self.name is not None:
            out["name"] = self.name
        if self.ip is not None:
            out["ip"] = self.ip
        if self.gateway is not None:
            out["gateway"] = self.gateway
        if not self.announce:
            out["announce"] = False
        return out


@dataclass(frozen=True)
class Handshake:
    """A machine's own identity: entropy, clock, names, keys and NICs."""

    hostname: str
    machine_id: str
    entropy: bytes
    time_ns: int
    nics: tuple[NicSetup, ...] = ()
    ssh_host_key: tuple[str, str] | None = None  # (private, public)
    authorized_keys: str | None = None
    resolv_conf: str | None = None
    list_nics: bool = False  # the reply names every interface (a seed records them)

    @classmethod
    def fresh(
        cls,
        hostname: str,
        nics: Sequence[NicSetup],
        *,
        machine_id: str | None = None,
        ssh_host_key: tuple[str, str] | None = None,
        baked: Mapping[str, str | None] | None = None,
        list_nics: bool = False,
    ) -> Handshake:
        """New entropy, the host's time now, a new machine id unless given;
        ``baked`` holds any of ``BAKED_KEYS`` (a seed's, or a cold boot's own)."""
        baked = baked or {}
        unknown = set(baked) - BAKED_KEYS
        if unknown:
            raise ValueError(f"unknown handshake values: {sorted(unknown)}")
        return cls(
            hostname=hostname,
            machine_id=uuid.uuid4().hex if machine_id is None else machine_id,
            entropy=os.urandom(64),
            time_ns=time.time_ns(),
            nics=tuple(nics),
            ssh_host_key=ssh_host_key,
            authorized_keys=baked.get("authorized_keys"),
            resolv_conf=baked.get("resolv_conf"),
            list_nics=list_nics,
        )

    def to_call(self) -> dict[str, Any]:
        """The arguments of the agent's ``setup``; a value left out is left as it is."""
        out: dict[str, Any] = {
            "entropy": self.entropy.hex(),
            "time_ns": self.time_ns,
            "hostname": self.hostname,
            "machine_id": self.machine_id,
            "nics": [nic.to_call() for nic in self.nics],
        }
        if self.ssh_host_key is not None:
            out["ssh_host_key"] = {"private": self.ssh_host_key[0], "public": self.ssh_host_key[1]}
        if self.authorized_keys is not None:
            out["authorized_keys"] = self.authorized_keys
        if self.resolv_conf is not None:
            out["resolv_conf"] = self.resolv_conf
        if self.list_nics:
            out["list_nics"] = True
        return out
