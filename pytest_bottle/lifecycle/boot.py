"""Getting a machine from nothing to an agent that answers: cold boot or restore."""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from filelock import FileLock
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from ..agent.channel import AgentChannel
from ..agent.client import AgentClient
from ..agent.replies import SettleReply
from ..errors import AgentError, BootError, BootTimeout
from ..host.deps import require
from ..host.paths import naming, write_private
from ..store.saved import SavedState, StateCorrupt, verify
from ..vmm import backend
from ..vmm.backend import CONSOLE, DISK, Machine, console_tail
from ..vmm.qemu import DiskFormat, MachineConfig

log = logging.getLogger(__name__)


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


def make_overlay(backing: Path, fmt: DiskFormat, dst: Path) -> None:
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
    cfg: MachineConfig,
    run_dir: Path,
    name: str,
    timeout: float,
    detached: bool = False,
    on_spawn: Callable[[Machine], None] | None = None,
    on_fail: Callable[[Machine], None] | None = None,
    tap_fds: Mapping[str, int] | None = None,
) -> tuple[Machine, AgentChannel]:
    """Start the machine ``cfg`` describes in ``run_dir`` and wait until its
    agent answers; clean up on any failure.

    ``timeout`` bounds the whole start (overlay, QEMU, state load, agent
    answer), not only the wait for the agent: a restore's agent can answer
    within milliseconds of the handshake.
    ``on_fail`` sees the machine after a failed wait, before it is stopped.
    """
    deadline = time.monotonic() + timeout
    prepare_run_dir(cfg, run_dir, name)
    # on_spawn: e.g. record the pid before a boot (or a state load) that may outlive us
    machine = backend.start(
        cfg, run_dir, name=name, detached=detached, tap_fds=tap_fds, deadline=deadline, on_spawn=on_spawn
    )
    try:
        channel = AgentChannel(machine.agent_sock, name)
        channel.explain = functools.partial(backend.gone, machine)
        channel.stopped = functools.partial(backend.halted, machine)
        machine.on_disk_stop(channel.end, deadline)
        early = EarlyKernel(machine.console_log) if cfg.restore is None else None
        wait_ready(machine, channel, timeout, name, deadline, early)
    except BaseException:
        try:
            if on_fail is not None:
                on_fail(machine)
        finally:
            machine.stop(grace=0.5)
        raise
    return machine, channel


# What the guest's kernel says when it turns its local APIC timer off: under
# TCG, a host stall of QEMU in the first few ms of the timer's calibration
# (a polling loop on the TSC) makes the timer look far too slow.  microvm has
# no other clock event device the kernel uses (with its hardware-reduced ACPI
# the kernel leaves the PIT alone), so no tick ever comes and the boot never
# finishes (docs/concepts.md, "A boot that hangs").
NO_TIMER = b"APIC frequency too slow, disabling apic timer"
NO_TIMER_REASON = (
    "the guest's kernel turned its only timer off (QEMU was held up while the kernel measured its APIC timer, "
    "which then looked too slow), so this boot could never finish"
)
EARLY = 64 << 10  # the kernel's early lines: the first ~15 KB of a console


class EarlyKernel:
    """Looks at a cold boot's first console bytes for a kernel that cannot finish booting."""

    def __init__(self, console: Path) -> None:
        self.console, self.done, self.next = console, False, 0.0

    def doomed(self) -> bool:
        if self.done or time.monotonic() < self.next:
            return False
        self.next = time.monotonic() + 0.25
        try:
            with open(self.console, "rb") as f:
                head = f.read(EARLY)
        except OSError:
            return False
        self.done = len(head) >= EARLY  # past the kernel's early lines: nothing more to find
        return NO_TIMER in head


def timer_off(error: BootError) -> bool:
    """Whether ``error`` is ``EarlyKernel``'s: the kernel turned its only timer off."""
    return error.reason == NO_TIMER_REASON


def worth_another_boot(error: BootError) -> bool:
    """Whether a build's or seed's boot may come up if tried again (a hang, a timer turned off)."""
    return isinstance(error, BootTimeout) or timer_off(error)


def boot_twice(
    cfg: MachineConfig,
    run_dir: Path,
    name: str,
    timeout: float,
    on_retry: Callable[[BootError], None] | None = None,
) -> tuple[Machine, AgentChannel]:
    """``start_machine`` for a cold boot no test asked for (an image build's,
    a seed's): one whose agent never answers, or whose kernel turned its
    timer off, is booted once more.

    A fresh QEMU boots; an image that never boots fails twice, after twice
    the timeout.  ``on_retry`` sees the first failure while its console is
    still in ``run_dir``; the second boot starts with an empty console (a
    seed's begins every clone's) and an empty RAM file.
    """
    try:
        return start_machine(cfg, run_dir, name, timeout)
    except BootError as first:
        if not worth_another_boot(first):
            raise
        # The whole error (with the console's tail) unless the caller keeps the console itself.
        log.warning("%s: booting it once more: %s", name, first.reason if on_retry else first)
        if on_retry is not None:
            on_retry(first)
        forget_attempt(run_dir)
        if cfg.save_ram is not None:
            cfg.save_ram.unlink(missing_ok=True)
    return start_machine(cfg, run_dir, name, timeout)


def forget_attempt(run_dir: Path) -> None:
    """Remove a failed start's files: the next one's errors would quote its log and console."""
    for f in ("qemu.log", "qemu.argv", CONSOLE, DISK):
        (run_dir / f).unlink(missing_ok=True)


def settle(agent: AgentClient, machine: Machine, timeout: float, quiet: float) -> SettleReply:
    """``agent.settle``, its ``BootTimeout`` with the console's tail (what was still starting)."""
    try:
        return agent.settle(timeout=timeout, quiet=quiet)
    except BootTimeout as e:
        raise BootTimeout(e.reason, console_tail(machine.console_log), e.name) from None


def prepare_run_dir(cfg: MachineConfig, run_dir: Path, name: str) -> None:
    """The machine's overlay disk, and its console log so far for a restore."""
    backing, fmt = cfg.backing
    try:
        make_overlay(backing, fmt, run_dir / DISK)
    except subprocess.CalledProcessError as e:
        said = e.stderr.decode(errors="replace").strip()
        if os.strerror(errno.ENOSPC) in said:  # named by start_bottle as a copy's would be
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / DISK)) from None
        raise BootError(f"qemu-img could not create the disk overlay: {said}", name=name) from None
    except OSError as e:  # the backing file (a seed's or image's disk) is gone, or no room for the overlay
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, e.strerror, str(run_dir / DISK)) from None
        raise BootError(f"cannot create the disk overlay on {backing}: {e.strerror}", name=name) from None
    if cfg.restore is not None and cfg.restore.console is not None:
        try:
            shutil.copyfile(cfg.restore.console, run_dir / CONSOLE)
        except FileNotFoundError:  # an older seed has none, or it went: QEMU will say
            return
        # A boot error's console tail would otherwise read as this bottle's own boot.
        with naming(run_dir / CONSOLE), open(run_dir / CONSOLE, "r+b") as f:  # a full disk: named by the start
            lead = b""
            if f.seek(0, os.SEEK_END):
                f.seek(-1, os.SEEK_END)
                lead = b"" if f.read(1) == b"\n" else b"\n"
            f.write(lead + RESTORED.format(name=name, source=cfg.restore.state.parent.name).encode() + b"\n")


RESTORED = "[pytest-bottle: {name} restored from {source}; the lines above are from before the restore]"


class _NotReady(Exception):
    pass


def wait_ready(
    machine: Machine,
    channel: AgentChannel,
    timeout: float,
    name: str,
    deadline: float,
    early: EarlyKernel | None = None,
) -> float:
    """Poll (with backoff) until the agent answers the sync handshake, by
    ``deadline`` (the end of the boot ``timeout``, which began before QEMU);
    a cold boot's kernel that cannot finish (``early``) is a ``BootError`` at once."""
    started = time.monotonic()

    def late() -> BootTimeout:
        tail = console_tail(machine.console_log)
        quiet = "" if tail.strip() else " (the console printed nothing in that time)"
        return BootTimeout(f"the agent did not answer within {timeout:g} s{quiet}", tail, name)

    if started >= deadline:  # the time went before the machine could be asked
        raise late()
    try:
        channel.send_sync()
    except AgentError as e:  # QEMU went (a bad kernel, say) between its start and this write: say why
        machine.wait(3.0)
        raise BootError(machine.exit_reason() or str(e), console_tail(machine.console_log), name) from None

    def nap(seconds: float) -> None:
        channel.synced.wait(seconds)

    def check() -> None:
        if channel.synced.is_set():
            return
        if not machine.alive():
            raise BootError(machine.exit_reason() or "QEMU exited", console_tail(machine.console_log), name)
        if channel.closed.is_set():
            machine.wait(3.0)  # EOF usually means QEMU is exiting: report why
            reason = machine.exit_reason() or f"agent channel closed: {channel.death}"
            raise BootError(reason, console_tail(machine.console_log), name)
        if early is not None and early.doomed():
            raise BootError(NO_TIMER_REASON, console_tail(machine.console_log), name)
        raise _NotReady

    try:
        for attempt in Retrying(
            retry=retry_if_exception_type(_NotReady),
            wait=wait_exponential(multiplier=0.001, max=0.1),
            stop=stop_after_delay(deadline - started),
            # Sleeping on the event wakes us the moment the agent answers.
            sleep=nap,
        ):
            with attempt:
                check()
    except RetryError:
        if channel.synced.is_set():
            return time.monotonic() - started
        raise late() from None
    return time.monotonic() - started


# QEMU's complaint when a memory state does not load: the seed is bad, not the request.
RESTORE_FAILURES = (
    "load of migration failed",
    "error while loading state",
    "Unknown savevm section",
    "Missing section footer",
    "Failed to load",
    "not a migration stream",
)


def seed_fault(state: SavedState, error: BootError) -> str | None:
    """Why a failed restore is the seed's fault (its files went or do not load), or None."""
    if any(s in error.reason for s in RESTORE_FAILURES):
        return f"restoring it failed: {error.reason.strip()[-300:]}"
    try:
        verify(state)
    except StateCorrupt as e:  # removed or changed since it was verified
        return f"{e.reason} (while a clone started from it)"
    return None
