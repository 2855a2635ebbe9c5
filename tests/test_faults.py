"""Boot faults, accelerator choice and the CLI against real QEMU (issue: VM runtime)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import pytest_bottle
from pytest_bottle import BootError, BootTimeout, HostDependencyError
from pytest_bottle.boot import BootPlan, start_machine
from pytest_bottle.images import ensure_image
from pytest_bottle.paths import default_cache_dir
from pytest_bottle.vmm import accel
from pytest_bottle.vmm.qemu import Nic

CACHE = default_cache_dir()


def _plan(tmp_path: Path, initrd: Path | None = None) -> BootPlan:
    image = ensure_image("debian-bookworm", CACHE)
    return BootPlan(
        image.kernel, initrd or image.initrd, image.rootfs, "raw", 512, 1, "tcg", (Nic("net0", "52:54:00:b0:77:01"),)
    )


def _qemu_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.name() == "qemu-system-x86_64"}


def test_kernel_panic_is_a_boot_error_with_the_console_tail(tmp_path: Path) -> None:
    garbage = tmp_path / "initrd.img"
    garbage.write_bytes(b"not an initramfs" * 1000)
    started = time.monotonic()
    with pytest.raises(BootError) as info:
        start_machine(_plan(tmp_path, garbage), tmp_path, "panics", timeout=120)
    assert time.monotonic() - started < 60
    assert "Kernel panic" in info.value.console_tail
    assert "QEMU exited" in info.value.reason and "Kernel panic" in str(info.value)
    assert not _qemu_children()


def test_not_ready_in_time_is_a_boot_timeout(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(BootTimeout) as info:
        start_machine(_plan(tmp_path), tmp_path, "slow", timeout=1.0)
    assert isinstance(info.value, TimeoutError) and time.monotonic() - started < 10
    assert "within 1 s" in str(info.value)
    assert not _qemu_children()


def test_kvm_requested_where_it_cannot_boot_fails_fast() -> None:
    verdict = accel.cached_verdict(CACHE)
    if accel.kvm_usable() is None and verdict is not None and verdict.accel == "kvm":
        pytest.skip("KVM really works on this host")
    started = time.monotonic()
    with pytest.raises(HostDependencyError, match="KVM"):
        pytest_bottle.launch(accel="kvm")
    assert time.monotonic() - started < accel.PROBE_TIMEOUT + 15
    assert not _qemu_children()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={CACHE}", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_run_prints_and_exits_with_the_code() -> None:
    r = _cli("run", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr.splitlines()[-1]) == (7, "out\n", "err")


def test_cli_doctor_image_list_sweep() -> None:
    doctor = _cli("doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "accelerator:" in doctor.stdout and str(CACHE) in doctor.stdout and "qemu-img" in doctor.stdout
    listing = _cli("image", "list")
    assert "debian-bookworm " in listing.stdout and "seed of debian-bookworm" in listing.stdout
    build = _cli("image", "build", "debian-bookworm")
    assert build.returncode == 0 and "debian-bookworm" in build.stdout
    assert _cli("image", "rm", "windows").returncode == 1
    prune = _cli("image", "prune")  # only what no current recipe would build
    assert prune.returncode == 0 and "pruned" in prune.stdout
    assert (
        "debian-bookworm " in _cli("image", "list").stdout and ensure_image("debian-bookworm", CACHE).rootfs.is_file()
    )
    assert _cli("sweep").returncode == 0
