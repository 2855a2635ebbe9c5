"""What the rest of the package needs from a virtual machine monitor.

QEMU (``machine.QemuMachine``) is the one backend today.  Another (Firecracker,
Cloud Hypervisor on KVM hosts) would take the same ``MachineConfig``, give
the agent a stream socket and satisfy ``Machine``; lifecycle code only uses
these members.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from .console import HALTED, last_words
from .machine import CONSOLE as CONSOLE  # the run directory's layout, the same for every backend
from .machine import DISK as DISK
from .machine import QemuMachine
from .machine import console_tail as console_tail
from .process import Identity
from .qemu import MachineConfig


class Machine(Protocol):
    """A started machine, owned by whoever started it."""

    @property
    def pid(self) -> int: ...

    @property
    def started(self) -> Identity:
        """The process's start identity (see ``process.start_time``)."""
        ...

    @property
    def detached(self) -> bool:
        """Whether it may outlive this process (no parent-death signal)."""
        ...

    @property
    def console_log(self) -> Path: ...

    @property
    def agent_sock(self) -> socket.socket:
        """Our end of the guest agent's stream."""
        ...

    def alive(self) -> bool: ...

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        ...

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it still runs after ``timeout`` seconds."""
        ...

    def exit_reason(self) -> str:
        """Why it exited, in the monitor's own words; empty while it runs."""
        ...

    def save_state(self, path: Path, timeout: float = 120.0) -> None:
        """Stop the guest and write its state to ``path`` (what ``Restore.state`` loads)."""
        ...

    def stop(self, grace: float = 2.0) -> None:
        """End it and release our ends of its channels.  Idempotent."""
        ...

    def expose_agent(self, path: Path) -> None:
        """Serve the agent's stream on a Unix socket at ``path`` (one client at a time)."""
        ...

    def disconnect(self) -> None:
        """Release our control connection and leave it running (a kept bottle)."""
        ...

    def on_disk_stop(self, callback: Callable[[str], None], deadline: float | None = None) -> None:
        """From now on, ``callback(why)`` (on another thread; it must not block)
        when the VM stops because its disk cannot be written (the host's file
        system is full): nothing in the guest runs after that.  ``deadline``
        (``time.monotonic()``) bounds what setting that up may wait for."""
        ...


def start(
    cfg: MachineConfig,
    run_dir: Path,
    *,
    name: str = "bottle",
    detached: bool = False,
    tap_fds: Mapping[str, int] | None = None,
    deadline: float | None = None,
    on_spawn: Callable[[Machine], None] | None = None,
) -> Machine:
    """Start the machine ``cfg`` describes, its files in ``run_dir`` (the overlay
    ``machine.DISK`` already made there); ``tap_fds``: an open TAP per "tap" NIC id;
    ``deadline``, ``on_spawn``: see ``QemuMachine.start``."""
    return QemuMachine.start(
        cfg, run_dir, name=name, detached=detached, tap_fds=tap_fds, deadline=deadline, on_spawn=on_spawn
    )


def gone(machine: Machine, wait: float = 1.0) -> str:
    """Why ``machine`` is gone, for calls its closed agent stream failed (its
    stream ends a moment before it does): "" if it still runs after ``wait`` s.
    It runs on the channel's reader, which ``close()`` waits 2 s for: keep ``wait`` under that."""
    if machine.wait(wait) is None:
        return ""
    if machine.poll() == 0:  # SIGTERM, SIGINT or SIGHUP from outside: QEMU says whose (pid and name)
        if "terminating on signal" in (said := machine.exit_reason()):
            return f"the VM was ended from outside ({said})"
        if not machine.console_log.exists():  # ours goes only at close: `bottle stop` (or a sweep) took it
            return "the VM was ended from outside (its run directory was removed: `bottle stop`, or a sweep)"
    words = last_words(console_tail(machine.console_log))
    ends = "a bottle's VM ends when its guest reboots, powers off or panics"
    if words:
        return f"the VM exited ({words}; {ends})"
    if machine.poll() == 0:  # -no-reboot: the guest ended it, before its console said how
        return f"the VM exited (QEMU exited with 0: the guest rebooted, powered off or panicked; {ends})"
    return f"the VM exited ({machine.exit_reason()})"


def halted(machine: Machine) -> str:
    """Why ``machine``, still running, will never answer: its guest halted
    (``systemctl halt``, ``halt -f``: no reset, QEMU keeps the stopped CPUs), from
    the kernel's last words on its console; "" otherwise (a gone one: ``gone`` says)."""
    if machine.poll() is not None:
        return ""
    words = last_words(console_tail(machine.console_log))
    if not words.startswith(HALTED):
        return ""
    return f"the VM stopped ({words}; a bottle's VM ends when its guest halts, reboots, powers off or panics)"
