"""What a bottle will be, decided from its spec, image and accelerator (pure).

A ``Plan`` says which machine to run; ``Plan.machine`` turns it into the one
typed machine description (``vmm.qemu.MachineConfig``) once the bottle's
resources (MACs, host ports) are known, and ``restore_from`` adds the saved
state to resume.  Nothing here touches the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from ..images import BuiltImage
from ..spec import BottleSpec
from ..vmm.qemu import Accel, Forward, MachineConfig, Nic, Restore

SSH_PORT = 22
USER_NIC = "net0"
LAN_NIC = "net1"

# guest port → (host address, host port)
Forwards = Mapping[int, tuple[str, int]]


class SavedFiles(Protocol):
    """The files of a saved machine state (``store.saved.SavedState``)."""

    @property
    def disk(self) -> Path: ...

    @property
    def memory(self) -> Path: ...

    @property
    def ram(self) -> Path: ...

    @property
    def console(self) -> Path: ...


@dataclass(frozen=True)
class Plan:
    """One bottle, before anything is taken for it."""

    name: str
    spec: BottleSpec
    image: BuiltImage
    accel: Accel
    ssh: bool  # the image has an SSH server: port 22 is forwarded and keys are made
    ports: tuple[int, ...]  # guest TCP ports published on the host, sorted

    @property
    def nic_count(self) -> int:
        """The user-mode NIC, and one on the LAN if the bottle joins one."""
        return 2 if self.spec.lan else 1

    @property
    def restores(self) -> bool:
        """Whether the bottle resumes a seed (else it boots cold)."""
        return self.spec.boot == "snapshot"

    def machine(self, macs: Sequence[str], forwards: Forwards) -> MachineConfig:
        """The machine to boot cold, with the bottle's MACs and host ports."""
        user = Nic(
            USER_NIC,
            macs[0],
            "user",
            restrict=self.spec.network == "none",
            forwards=tuple(Forward(host, port, guest) for guest, (host, port) in forwards.items()),
        )
        lan = (Nic(LAN_NIC, macs[1], "tap"),) if self.spec.lan else ()
        return MachineConfig(
            kernel=self.image.kernel,
            initrd=self.image.initrd,
            disk=self.image.disk,
            disk_format=self.image.disk_format,
            memory_mb=self.spec.memory_mb,
            cpus=self.spec.cpus,
            accel=self.accel,
            nics=(user, *lan),
        )


def make_plan(spec: BottleSpec, image: BuiltImage, accel: Accel, name: str) -> Plan:
    ssh = image.has_sshd
    ports = tuple(sorted(set(spec.forward) | ({SSH_PORT} if ssh else set())))
    return Plan(name=name, spec=spec, image=image, accel=accel, ssh=ssh, ports=ports)


def restore_from(cfg: MachineConfig, state: SavedFiles) -> MachineConfig:
    """``cfg`` resuming ``state``: its disk under the overlay, its memory, its console so far."""
    return replace(cfg, restore=Restore(state=state.memory, disk=state.disk, ram=state.ram, console=state.console))
