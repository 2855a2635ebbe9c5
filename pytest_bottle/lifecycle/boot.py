"""Getting a machine from nothing to an agent that answers: cold boot or restore."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from ..agent.channel import AgentChannel
from ..errors import BootError, BootTimeout
from ..host.deps import require
from ..host.paths import write_private
from ..vmm import accel, clock
from ..vmm.accel import ProbeResult
from ..vmm.machine import QemuMachine, console_tail
from ..vmm.qemu import MachineConfig, Nic

log = logging.getLogger(__name__)


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


def backing_name(backing: Path, overlay_dir: Path) -> str:
    """How an overlay in ``overlay_dir`` names ``backing``: a relative path.

    QEMU resolves a relative backing name against the overlay's own
    directory, so a cache moved or restored elsewhere as a whole keeps
    working and never reaches back to its old location.  The plain relative
    path keeps symlinks inside the cache (they move with it); if a symlink
    below the common directory makes it point elsewhere, the relative path
    between the resolved locations is used instead.
    """
    rel = os.path.relpath(backing, overlay_dir)
    if os.path.samefile(overlay_dir / rel, backing):
        return rel
    return os.path.relpath(os.path.realpath(backing), os.path.realpath(overlay_dir))


def make_overlay(backing: Path, fmt: str, dst: Path) -> None:
    """A fresh qcow2 overlay on ``backing``, naming it relative to ``dst``.

    An empty overlay's bytes depend only on its backing name, so one
    ``qemu-img create`` per (backing file, relative name) makes a template
    that later overlays copy (a file copy is far cheaper than a process).
    The template is only ever copied: QEMU never opens it where it lies.
    """
    rel = backing_name(backing, dst.parent)
    digest = hashlib.sha256(rel.encode()).hexdigest()[:12]
    template = backing.parent / f".overlay-{backing.name}-{digest}.qcow2"
    if not template.is_file():
        with FileLock(str(template) + ".lock"):
            if not template.is_file():
                # Created next to dst, where the relative name resolves.
                fresh = dst.with_name(f".{dst.name}.{os.getpid()}.new")
                argv = [require("qemu-img", "create disk overlays"), "create", "-q", "-f", "qcow2"]
                subprocess.run([*argv, "-F", fmt, "-b", rel, str(fresh)], check=True, capture_output=True)
                write_private(template, fresh.read_bytes())
                os.replace(fresh, dst)
                return
    _copy(template, dst)


def _copy(src_path: Path, dst_path: Path) -> None:
    with open(src_path, "rb") as src, open(dst_path, "wb") as out:
        os.sendfile(out.fileno(), src.fileno(), 0, os.fstat(src.fileno()).st_size)


def start_machine(
    plan: BootPlan,
    run_dir: Path,
    name: str,
    timeout: float,
    detached: bool = False,
    on_spawn: Callable[[QemuMachine], None] | None = None,
    on_fail: Callable[[QemuMachine], None] | None = None,
) -> tuple[QemuMachine, AgentChannel]:
    """Start QEMU per ``plan`` and wait until the agent answers; clean up on any failure.

    ``on_fail`` sees the machine after a failed wait, before it is stopped.
    """
    disk = run_dir / "disk.qcow2"
    try:
        make_overlay(plan.backing, plan.backing_format, disk)
    except subprocess.CalledProcessError as e:
        raise BootError(
            f"qemu-img could not create the disk overlay: {e.stderr.decode(errors='replace').strip()}", name=name
        ) from None
    except OSError as e:  # the backing file (a seed's or image's disk) is gone
        raise BootError(f"cannot create the disk overlay on {plan.backing}: {e.strerror}", name=name) from None
    if plan.console_prefix is not None:
        try:
            shutil.copyfile(plan.console_prefix, run_dir / "console.log")
        except FileNotFoundError:  # an older seed has none, or it went: QEMU will say
            pass
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
        try:
            if on_fail is not None:
                on_fail(machine)
        finally:
            machine.stop(grace=0.5)
        raise
    return machine, channel


def run_probe(plan: BootPlan, run_dir: Path, timeout: float) -> ProbeResult:
    """Boot ``plan`` once, time-boxed, and say what that proves (see ``vmm.accel``)."""
    seen: dict[str, Any] = {}

    def measure(machine: QemuMachine) -> None:  # after a failed wait, before the stop
        seen.update(waited=accel.runqueue_wait(machine.pid), returncode=machine.proc.poll())
        try:
            seen["log"] = (run_dir / "qemu.log").read_text(errors="replace")
        except OSError:
            seen["log"] = ""

    try:
        machine, channel = start_machine(plan, run_dir, "probe", timeout, on_fail=measure)
    except BootTimeout as e:
        return accel.timed_out(e.reason, timeout, seen.get("waited"), os.getloadavg()[0], os.cpu_count() or 1)
    except BootError as e:
        if not seen:  # no QEMU got that far: the overlay or saved state (a host-side fault)
            return accel.inconclusive(e.reason, "a host-side fault")
        return accel.exited(e.reason, seen["returncode"], seen["log"], e.console_tail)
    except OSError as e:  # QEMU could not even be spawned (memory, file descriptors)
        return accel.inconclusive(f"cannot start QEMU: {e}", "a host-side fault")
    machine.stop()
    channel.close()
    return accel.ProbeResult(True)


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
