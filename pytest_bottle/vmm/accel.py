"""Choosing the accelerator: KVM only when a real, time-boxed boot proves it works.

Opening /dev/kvm proves nothing: on nested (PVM-backed) hosts it opens, and a
stock kernel then hangs right after "Probing EDD".  The verdict is cached per
host and QEMU version, so the probe runs once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..errors import HostDependencyError
from ..hostdeps import require

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class Verdict:
    accel: str  # "kvm" or "tcg"
    reason: str
    probed: bool = False


@functools.cache
def qemu_version(qemu: str = "qemu-system-x86_64") -> str:
    out = subprocess.run(
        [require(qemu, "run virtual machines"), "--version"], capture_output=True, text=True, check=False
    ).stdout
    return out.splitlines()[0].strip() if out else "unknown"


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


def cached_verdict(cache_dir: Path) -> Verdict | None:
    try:
        data = json.loads(_verdict_file(cache_dir).read_text())
    except (OSError, ValueError):
        return None
    if data.get("host") != host_id():
        return None
    return Verdict(data["accel"], data["reason"], True)


def decide(requested: str, cache_dir: Path, probe: Callable[[float], str | None]) -> Verdict:
    """Resolve ``auto``/``kvm``/``tcg`` to ``kvm`` or ``tcg``.

    ``probe(timeout)`` boots a real guest with KVM and returns None on
    success or a reason for failure.  It runs at most once per host and QEMU
    version (under a lock, so xdist workers do not all probe).
    """
    if requested == "tcg":
        return Verdict("tcg", "requested")
    why_not = kvm_usable()
    if why_not is None:
        verdict = cached_verdict(cache_dir)
        if verdict is None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(cache_dir / "accel.lock")):
                verdict = cached_verdict(cache_dir)
                if verdict is None:
                    verdict = _probe(cache_dir, probe)
        if verdict.accel == "kvm":
            return Verdict("kvm", "requested" if requested == "kvm" else verdict.reason, verdict.probed)
        why_not = verdict.reason
    if requested == "kvm":
        raise HostDependencyError("a working KVM", None, why_not)
    log.warning("pytest-bottle: using TCG (software emulation): %s", why_not)
    return Verdict("tcg", why_not)


def _probe(cache_dir: Path, probe: Callable[[float], str | None]) -> Verdict:
    started = time.monotonic()
    failure = probe(PROBE_TIMEOUT)
    took = time.monotonic() - started
    if failure is not None:  # one line: it goes into headers and log lines
        failure = " ".join(failure.split())[:300]
    if failure is None:
        verdict = Verdict("kvm", f"a KVM test boot succeeded in {took:.1f}s", True)
    else:
        verdict = Verdict("tcg", f"KVM is present but a test boot failed: {failure}", True)
    data = {"host": host_id(), "accel": verdict.accel, "reason": verdict.reason, "when": time.time()}
    tmp = _verdict_file(cache_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, _verdict_file(cache_dir))
    return verdict
