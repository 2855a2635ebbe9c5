"""Choosing the accelerator: KVM only when a real, time-boxed boot proves it works.

Opening /dev/kvm proves nothing: on nested (PVM-backed) hosts it opens, and a
stock kernel then hangs right after "Probing EDD" (or QEMU aborts).  A
definite verdict is cached per host and QEMU version, so the probe runs once:
success, a failure in QEMU's or the guest's own words (QEMU exiting with a
KVM error or an assertion, a kernel panic on the console), or a timeout while
QEMU had the CPU it wanted.  Everything else proves nothing about KVM: a
timeout while QEMU waited for a CPU (a busy host), QEMU killed by a signal
(the OOM killer), a host-side fault (no disk space, a missing image file).
That run uses TCG and the next run probes again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..errors import HostDependencyError
from ..host.deps import require
from ..host.paths import write_json
from . import console, process
from .qemu import Accel

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 20.0


# A timed-out probe is inconclusive when QEMU's threads spent at least
# STARVED_SHARE of their life runnable but waiting for a CPU, or when QEMU
# lived less than LIVED_SHARE of the timeout (the host was too slow to even
# start it: the timeout also counts the start).
STARVED_SHARE = 0.25
LIVED_SHARE = 0.5
# QEMU's own words for KVM failing under it: "failed to initialize kvm",
# "KVM internal error", "kvm run failed", or an assertion before its abort().
KVM_FAULT = re.compile(r"\bkvm\b|failed to set MSR|Assertion .* failed", re.IGNORECASE)
GUEST_PANIC = re.compile(re.escape(console.PANIC))


@dataclass(frozen=True)
class Verdict:
    accel: Accel
    reason: str
    probed: bool = False
    definite: bool = True


@dataclass(frozen=True)
class ProbeResult:
    """What a KVM test boot showed: ``ok``, or a failure that is ``definite``
    (cached) or inconclusive (this run only)."""

    ok: bool
    reason: str = ""
    definite: bool = True


def runqueue_wait(pid: int) -> float | None:
    """Seconds the threads of ``pid`` spent runnable but not running (schedstat), or None."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def timed_out(
    reason: str, window: float, waited: float | None, load: float, cpus: int, lived: float | None = None
) -> ProbeResult:
    """Classify a probe that timed out (pure).

    ``window``: the timeout, which also covers the start before QEMU runs;
    ``lived``: how long QEMU ran of it (default: all of it); ``waited``: QEMU's
    run-queue wait while it lived (None where schedstat is missing: then the
    1-minute load average against the CPU count decides).
    """
    lived = window if lived is None else lived
    if lived < LIVED_SHARE * window:
        starved, why = True, f"QEMU ran only {lived:.1f}s of the {window:g}s"
    elif waited is not None:
        starved = waited >= STARVED_SHARE * lived
        why = f"QEMU waited {waited:.1f}s of {lived:.1f}s for a CPU"
    else:
        starved = load > cpus
        why = f"load average {load:.1f} on {cpus} CPU(s)"
    if starved:
        return ProbeResult(False, f"inconclusive: {reason} while the host was busy ({why})", definite=False)
    return ProbeResult(False, f"{reason}; {why}", definite=True)  # the reason may end in parentheses


def exited(reason: str, returncode: int | None, qemu_log: str, console: str) -> ProbeResult:
    """Classify a probe whose QEMU failed before the agent answered (pure).

    ``returncode``: QEMU's (negative: the signal that ended it; None: it had
    not exited).  Definite only when the guest panicked, or QEMU ended by
    itself (an exit status, or its own abort) saying KVM failed.
    """
    if panic := GUEST_PANIC.search(console):
        line = console[panic.start() :].splitlines()[0].strip()
        return ProbeResult(False, f"the guest kernel panicked ({line}); {reason}", definite=True)
    if returncode is None:
        return inconclusive(reason, "QEMU had not exited")
    if returncode < 0 and -returncode != signal.SIGABRT:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return inconclusive(reason, f"QEMU was killed by {name}")
    if KVM_FAULT.search(qemu_log):
        return ProbeResult(False, reason, definite=True)
    return inconclusive(reason, "QEMU did not name KVM as the cause")


def inconclusive(reason: str, why: str) -> ProbeResult:
    """A failure that says nothing about KVM: this run uses TCG, the next probes again."""
    return ProbeResult(False, f"inconclusive: {reason} ({why})", definite=False)


def run_id() -> str:
    """This test run: every xdist worker of one run shares it, the next run differs."""
    if xdist := os.environ.get("PYTEST_XDIST_TESTRUNUID"):
        return f"xdist {xdist}"
    started = process.start_time(os.getpid())
    return f"pid {os.getpid()} {started}"


@functools.cache
def qemu_version(qemu: str = "qemu-system-x86_64") -> str:
    out = subprocess.run(
        [require(qemu, "run virtual machines"), "--version"], capture_output=True, text=True, check=False
    ).stdout
    return out.splitlines()[0].strip() if out else "unknown"


@functools.cache
def qemu_release() -> tuple[int, int]:
    """QEMU's (major, minor); (0, 0) when it cannot be told (no QEMU: it fails later, by name)."""
    try:
        m = re.search(r"version (\d+)\.(\d+)", qemu_version())
    except HostDependencyError:
        return (0, 0)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def host_id() -> str:
    return f"{platform.node()}|{platform.release()}|{qemu_version()}"


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm cannot be opened ({e.strerror}; is this user in the 'kvm' group?)"
    os.close(fd)
    return None


def _verdict_file(cache_dir: Path) -> Path:
    return cache_dir / "accel.json"


def stored_verdict(cache_dir: Path) -> tuple[Verdict, str] | None:
    """The last probe's verdict for this host and the run that made it, or None."""
    try:
        data = json.loads(_verdict_file(cache_dir).read_text())
        if data.get("host") != host_id():
            return None
        definite = data.get("definite", True) is not False
        accel: Accel = "kvm" if data["accel"] == "kvm" else "tcg"
        return Verdict(accel, str(data["reason"]), True, definite), str(data.get("run"))
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def cached_verdict(cache_dir: Path) -> Verdict | None:
    """The stored verdict for this host: a definite one, or an inconclusive one of this run."""
    stored = stored_verdict(cache_dir)
    if stored is None:
        return None
    verdict, run = stored
    if not verdict.definite and run != run_id():
        return None  # inconclusive last time: probe again
    return verdict


# Boots a real guest with KVM, time-boxed (lifecycle.probe): accel.py only judges.
Probe = Callable[[float], "str | ProbeResult | None"]


def decide(requested: str, cache_dir: Path, probe: Probe) -> Verdict:
    """Resolve ``auto``/``kvm``/``tcg`` to ``kvm`` or ``tcg``.

    ``probe(timeout)`` boots a real guest with KVM and returns None (or an
    ok ProbeResult) on success, else a reason (a definite failure) or a
    ProbeResult.  A definite verdict is stored per host and QEMU version; an
    inconclusive one only for this run.  The probe runs under a lock, so
    xdist workers do not all probe.
    """
    if requested == "tcg":
        return Verdict("tcg", "requested")
    why_not, probed_now = kvm_usable(), False
    if why_not is None:
        verdict = cached_verdict(cache_dir)
        if verdict is None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(cache_dir / "accel.lock")):
                verdict = cached_verdict(cache_dir)
                if verdict is None:
                    verdict, probed_now = _probe(cache_dir, probe), True
        if verdict.accel == "kvm":
            return Verdict("kvm", "requested" if requested == "kvm" else verdict.reason, verdict.probed)
        why_not = verdict.reason
    if requested == "kvm":
        raise HostDependencyError("a working KVM", None, why_not)
    # Said once, when found out: every process (each xdist worker, each
    # `bottle run`, whose stderr is the command's) reading the stored verdict
    # would repeat it.  The report header and `bottle doctor` always show it.
    log.log(
        logging.WARNING if probed_now else logging.INFO, "pytest-bottle: using TCG (software emulation): %s", why_not
    )
    return Verdict("tcg", why_not)


def _probe(cache_dir: Path, probe: Probe) -> Verdict:
    started = time.monotonic()
    raw = probe(PROBE_TIMEOUT)
    took = time.monotonic() - started
    result = raw if isinstance(raw, ProbeResult) else ProbeResult(raw is None, raw or "")
    if result.ok:
        verdict = Verdict("kvm", f"a KVM test boot succeeded in {took:.1f}s", True)
    else:
        failure = " ".join(result.reason.split())[:300]  # one line: it goes into headers and log lines
        verdict = Verdict("tcg", f"KVM is present but a test boot failed: {failure}", True, result.definite)
    data = {
        "host": host_id(),
        "accel": verdict.accel,
        "reason": verdict.reason,
        "when": time.time(),
        "definite": verdict.definite,
        "run": run_id(),
    }
    write_json(_verdict_file(cache_dir), data)
    return verdict
