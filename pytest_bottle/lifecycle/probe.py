"""The KVM probe: boot a real machine, time-boxed, and hand what it showed to
``vmm.accel``, whose pure code turns it into a verdict (cached per host)."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

from ..errors import BootError, BootTimeout
from ..host import progress
from ..host.paths import remove_tree
from ..images import BuiltImage
from ..spec import AccelRequest
from ..vmm import accel
from ..vmm.accel import ProbeResult, Verdict
from ..vmm.backend import Machine
from ..vmm.qemu import MachineConfig, Nic
from .boot import start_machine

# The probe machine's one NIC (no network behind it matters: it only boots).
PROBE_MAC = "52:54:00:b0:77:01"

_verdicts: dict[tuple[str, Path], Verdict] = {}


def accel_for(requested: AccelRequest, image: BuiltImage, cache_dir: Path) -> Verdict:
    """The accelerator for bottles of this run: ``requested``, or for ``auto`` what a probe proved."""
    key = (requested, cache_dir)
    if key not in _verdicts:
        _verdicts[key] = accel.decide(requested, cache_dir, functools.partial(probe_kvm, image, cache_dir))
    return _verdicts[key]


def probe_machine(image: BuiltImage) -> MachineConfig:
    return MachineConfig(
        kernel=image.kernel,
        initrd=image.initrd,
        disk=image.disk,
        disk_format=image.disk_format,
        accel="kvm",
        nics=(Nic("net0", PROBE_MAC),),
    )


def probe_kvm(image: BuiltImage, cache_dir: Path, timeout: float) -> ProbeResult:
    """Boot ``image`` once under KVM in a scratch run directory."""
    run_dir = cache_dir / "run" / f"kvm-probe-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with progress.work():  # first-use work, as a build is: not a test's pytest-timeout
            return run_probe(probe_machine(image), run_dir, timeout)
    finally:
        remove_tree(run_dir)


def run_probe(cfg: MachineConfig, run_dir: Path, timeout: float) -> ProbeResult:
    """Boot ``cfg`` once, time-boxed, and say what that proves (see ``vmm.accel``)."""
    seen: dict[str, Any] = {}

    def spawned(machine: Machine) -> None:
        seen["spawned"] = time.monotonic()

    def measure(machine: Machine) -> None:  # after a failed wait, before the stop
        seen.update(waited=accel.runqueue_wait(machine.pid), returncode=machine.poll())
        seen["lived"] = time.monotonic() - seen["spawned"]
        try:
            seen["log"] = (run_dir / "qemu.log").read_text(errors="replace")
        except OSError:
            seen["log"] = ""

    try:
        machine, channel = start_machine(cfg, run_dir, "probe", timeout, on_spawn=spawned, on_fail=measure)
    except BootTimeout as e:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
        return accel.timed_out(e.reason, timeout, seen.get("waited"), load, cpus, seen.get("lived"))
    except BootError as e:
        if not seen:  # no QEMU got that far: the overlay or saved state (a host-side fault)
            return accel.inconclusive(e.reason, "a host-side fault")
        return accel.exited(e.reason, seen["returncode"], seen["log"], e.console_tail)
    except OSError as e:  # QEMU could not even be spawned (memory, file descriptors)
        return accel.inconclusive(f"cannot start QEMU: {e}", "a host-side fault")
    machine.stop()
    channel.close()
    return ProbeResult(True)
