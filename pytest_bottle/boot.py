"""Getting a machine from nothing to an agent that answers: cold boot or restore."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from .errors import BootError, BootTimeout
from .guest.channel import AgentChannel
from .hostdeps import require
from .vmm import clock
from .vmm.machine import QemuMachine
from .vmm.qemu import MachineConfig, Nic

log = logging.getLogger(__name__)

CONSOLE_TAIL_LINES = 60


@dataclass(frozen=True)
class BootPlan:
    """Everything that decides how a machine starts."""

    kernel: Path
    initrd: Path
    backing: Path  # the disk the overlay sits on: image rootfs (raw) or seed disk (qcow2)
    backing_format: str
    memory_mb: int
    cpus: int
    accel: str
    nics: tuple[Nic, ...]
    incoming: Path | None = None  # memory state to restore, None for a cold boot
    console_prefix: Path | None = None  # the seed's boot log: a clone's console starts with it
    ram_file: Path | None = None  # file-backed guest RAM (seeds write it, clones map it privately)
    ram_shared: bool = False


def console_tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


def make_overlay(backing: Path, fmt: str, dst: Path) -> None:
    """A fresh qcow2 overlay on ``backing``.

    An empty overlay's bytes depend only on its backing file, so one
    ``qemu-img create`` per backing file makes a template that later
    overlays copy (a file copy is far cheaper than a process).
    """
    template = backing.parent / f".overlay-{backing.name}.qcow2"
    if not template.is_file():
        with FileLock(str(template) + ".lock"):
            if not template.is_file():
                tmp = template.with_name(template.name + f".{os.getpid()}.tmp")
                subprocess.run(
                    [
                        require("qemu-img", "create disk overlays"),
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-F",
                        fmt,
                        "-b",
                        str(backing),
                        str(tmp),
                    ],
                    check=True,
                    capture_output=True,
                )
                os.replace(tmp, template)
    with open(template, "rb") as src, open(dst, "wb") as out:
        os.sendfile(out.fileno(), src.fileno(), 0, os.fstat(src.fileno()).st_size)


def start_machine(
    plan: BootPlan,
    run_dir: Path,
    name: str,
    timeout: float,
    detached: bool = False,
    on_spawn: Callable[[QemuMachine], None] | None = None,
) -> tuple[QemuMachine, AgentChannel]:
    """Start QEMU per ``plan`` and wait until the agent answers; clean up on any failure."""
    disk = run_dir / "disk.qcow2"
    try:
        make_overlay(plan.backing, plan.backing_format, disk)
    except subprocess.CalledProcessError as e:
        raise BootError(
            f"qemu-img could not create the disk overlay: {e.stderr.decode(errors='replace').strip()}", name=name
        ) from None
    if plan.console_prefix is not None and plan.console_prefix.is_file():
        shutil.copyfile(plan.console_prefix, run_dir / "console.log")
    cfg = MachineConfig(
        kernel=plan.kernel,
        initrd=plan.initrd,
        disk=disk,
        console_log=run_dir / "console.log",
        agent_fd=-1,
        qmp_fd=-1,
        memory_mb=plan.memory_mb,
        cpus=plan.cpus,
        accel=plan.accel,
        nics=plan.nics,
        ram_file=plan.ram_file,
        ram_shared=plan.ram_shared,
        extra_kernel_args=clock.tcg_kernel_args() if plan.accel == "tcg" else (),
    )
    machine = QemuMachine.start(cfg, run_dir, incoming=plan.incoming, name=name, detached=detached)
    try:
        if on_spawn is not None:  # e.g. record the pid before a boot that may outlive us
            on_spawn(machine)
        channel = AgentChannel(machine.agent_sock, name)
        wait_ready(machine, channel, timeout, name)
    except BaseException:
        machine.stop(grace=0.5)
        raise
    return machine, channel


class _NotReady(Exception):
    pass


def wait_ready(machine: QemuMachine, channel: AgentChannel, timeout: float, name: str = "") -> float:
    """Poll (with backoff) until the agent answers the sync handshake."""
    started = time.monotonic()
    channel.send_sync()

    def nap(seconds: float) -> None:
        channel.synced.wait(seconds)

    def check() -> None:
        if channel.synced.is_set():
            return
        if not machine.alive():
            raise BootError(machine.exit_reason() or "QEMU exited", console_tail(machine.console_log), name)
        if channel.closed.is_set():
            try:
                machine.proc.wait(1.0)  # EOF usually means QEMU is exiting: report why
            except subprocess.TimeoutExpired:
                pass
            reason = machine.exit_reason() or f"agent channel closed: {channel.death}"
            raise BootError(reason, console_tail(machine.console_log), name)
        raise _NotReady

    try:
        for attempt in Retrying(
            retry=retry_if_exception_type(_NotReady),
            wait=wait_exponential(multiplier=0.001, max=0.1),
            stop=stop_after_delay(timeout),
            # Sleeping on the event wakes us the moment the agent answers.
            sleep=nap,
        ):
            with attempt:
                check()
    except RetryError:
        if channel.synced.is_set():
            return time.monotonic() - started
        raise BootTimeout(
            f"the agent did not answer within {timeout:g} s", console_tail(machine.console_log), name
        ) from None
    return time.monotonic() - started
