"""Boot faults, accelerator choice and the CLI against real QEMU (issue: VM runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import processes_mentioning

import pytest_bottle
from pytest_bottle import BootError, BootTimeout, HostDependencyError
from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.images import BuiltImage, ensure_image
from pytest_bottle.lifecycle.boot import start_machine
from pytest_bottle.vmm import accel
from pytest_bottle.vmm.qemu import MachineConfig, Nic, Restore

CACHE = default_cache_dir()


def _plan(image: BuiltImage, initrd: Path | None = None) -> MachineConfig:
    return MachineConfig(
        image.kernel, initrd or image.initrd, image.rootfs, 512, 1, "tcg", (Nic("net0", "52:54:00:b0:77:01"),)
    )


def _stuck_restore(tmp_path: Path, image: BuiltImage, mac: str) -> tuple[MachineConfig, Path, Path]:
    """A restore whose QEMU runs and never answers (its path names it); and a run dir."""
    stuck = tmp_path / "qemu-that-never-answers"
    stuck.write_text('#!/bin/sh\nexec tail -f /dev/null "$0"\n')
    stuck.chmod(0o755)
    saved = tmp_path / "saved"
    saved.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(saved / "disk.qcow2"), "1G"], check=True)
    for name in ("memory.state", "memory.ram"):
        (saved / name).write_bytes(b"")
    restore = Restore(saved / "memory.state", saved / "disk.qcow2", ram=saved / "memory.ram")
    cfg = MachineConfig(
        image.kernel, image.initrd, image.rootfs, 512, 1, "tcg", (Nic("net0", mac),), restore=restore, qemu=str(stuck)
    )
    run = tmp_path / "run"
    run.mkdir()
    return cfg, stuck, run


def test_a_restore_qemu_does_not_answer_is_a_boot_timeout_within_the_bottles_timeout(
    tmp_path: Path, default_image: BuiltImage
) -> None:
    """QEMU's commands wait 60 s each; a bottle's shorter start timeout bounds a restore's."""
    cfg, stuck, run = _stuck_restore(tmp_path, default_image, "52:54:00:b0:77:02")
    started = time.monotonic()
    with pytest.raises(BootTimeout, match=r"did not answer QMP in time \(QEMU of stuck did not answer"):
        start_machine(cfg, run, "stuck", timeout=3)
    assert time.monotonic() - started < 15  # not QMP's own 60 s
    assert not processes_mentioning(str(stuck), name="tail")  # stopped, not left running


def test_a_detached_qemus_pid_is_on_record_before_its_state_load_is_waited_for(
    tmp_path: Path, default_image: BuiltImage
) -> None:
    """A kept bottle's QEMU (--bottle-keep) has no parent-death signal: a run
    killed while the state loaded left a QEMU that no record named, so no sweep
    could end it."""
    cfg, stuck, run = _stuck_restore(tmp_path, default_image, "52:54:00:b0:77:03")
    seen: list[tuple[int, bool]] = []
    with pytest.raises(BootTimeout):
        start_machine(cfg, run, "stuck", timeout=3, detached=True, on_spawn=lambda m: seen.append((m.pid, m.alive())))
    assert len(seen) == 1 and seen[0][1], seen  # told while it ran, before the wait that failed
    assert not processes_mentioning(str(stuck), name="tail")


# The plans are made before the clock starts: the image is built by then (warm_cache).
def test_kernel_panic_is_a_boot_error_with_the_console_tail(tmp_path: Path, default_image: BuiltImage) -> None:
    garbage = tmp_path / "initrd.img"
    garbage.write_bytes(b"not an initramfs" * 1000)
    plan = _plan(default_image, garbage)
    started = time.monotonic()
    with pytest.raises(BootError) as info:
        start_machine(plan, tmp_path, "panics", timeout=120)
    assert time.monotonic() - started < 110  # the panic ended it, not the start's timeout
    assert "Kernel panic" in info.value.console_tail
    assert "QEMU exited" in info.value.reason and "Kernel panic" in str(info.value)
    assert not processes_mentioning(str(tmp_path))


def test_not_ready_in_time_is_a_boot_timeout(tmp_path: Path, default_image: BuiltImage) -> None:
    plan = _plan(default_image)
    started = time.monotonic()
    with pytest.raises(BootTimeout) as info:
        start_machine(plan, tmp_path, "slow", timeout=1.0)
    assert isinstance(info.value, TimeoutError) and time.monotonic() - started < 10
    assert "within 1 s" in str(info.value)
    assert not processes_mentioning(str(tmp_path))


def test_a_boot_timeout_before_any_console_output_says_so(tmp_path: Path, default_image: BuiltImage) -> None:
    """An empty console tail is the guest's silence, not a lost log."""
    with pytest.raises(BootTimeout, match=r"within 0.01 s \(the console printed nothing in that time\)") as info:
        start_machine(_plan(default_image), tmp_path, "quiet", timeout=0.01)
    assert info.value.console_tail == ""
    assert not processes_mentioning(str(tmp_path))


def test_kvm_requested_after_a_failed_probe_is_refused_at_once(private_cache: Path) -> None:
    # The verdict a failed probe leaves (for this host and QEMU): any host can take this path.
    (private_cache / "accel.json").write_text(
        json.dumps({"host": accel.host_id(), "accel": "tcg", "reason": "KVM is present but a test boot failed: x"})
    )
    started = time.monotonic()
    with pytest.raises(HostDependencyError, match="KVM"):
        pytest_bottle.launch(accel="kvm", cache_dir=private_cache).close()  # close: a VM it wrongly started
    assert time.monotonic() - started < 10
    assert not processes_mentioning(str(private_cache))


def test_kvm_requested_where_it_cannot_boot_fails_fast(private_cache: Path) -> None:
    verdict = accel.cached_verdict(CACHE)  # decided by warm_cache, before any clock
    assert verdict is not None or accel.kvm_usable() is not None
    if verdict is not None and verdict.accel == "kvm":
        pytest.skip(f"KVM really works on this host ({verdict.reason}): nothing to refuse")
    (private_cache / "accel.json").unlink(missing_ok=True)  # so the real probe runs again, timed
    started = time.monotonic()
    with pytest.raises(HostDependencyError, match="KVM"):
        pytest_bottle.launch(accel="kvm", cache_dir=private_cache).close()
    assert time.monotonic() - started < accel.PROBE_TIMEOUT + 15
    assert not processes_mentioning(str(private_cache))
    if accel.kvm_usable() is None:  # the failed probe is remembered
        again = accel.cached_verdict(private_cache)
        assert again is not None and again.accel == "tcg" and "test boot failed" in again.reason


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={CACHE}", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_run_prints_and_exits_with_the_code(warm_cache: Path) -> None:
    r = _cli("run", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr.splitlines()[-1]) == (7, "out\n", "err")


def test_cli_doctor_without_qemu_still_reports_the_rest(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()  # no program on PATH: QEMU and every other tool are missing
    r = subprocess.run(
        [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={tmp_path / 'cache'}", "doctor"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": str(empty)},
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "MISSING qemu-system-x86_64" in r.stdout and "qemu: not installed" in r.stdout
    assert "accelerator: none until QEMU is installed" in r.stdout
    assert f"cache: {tmp_path / 'cache'}" in r.stdout and "run state: " in r.stdout


def test_cli_doctor_probe_gives_a_cache_without_one_its_verdict(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cache = tmp_path / "cache"  # no verdict yet: a fresh machine's first `bottle doctor`

    def doctor(*more: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={cache}", "doctor", *more]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    if accel.kvm_usable() is not None:  # no usable /dev/kvm: TCG is the verdict already; nothing is probed or built
        r = doctor("--probe")
        line = next(x for x in r.stdout.splitlines() if x.startswith("accelerator:"))
        assert r.returncode == 0 and line.startswith("accelerator: tcg (") and "probing" not in r.stdout, r.stdout
        assert not (cache / "images").exists()
        return
    image: BuiltImage = request.getfixturevalue("default_image")  # built once, so this test boots, not builds
    (cache / "images").mkdir(parents=True, mode=0o700)
    cache.chmod(0o700)
    for how in ("-al", "-a"):  # hard links where the file system allows
        if subprocess.run(["cp", how, str(image.path), str(cache / "images")], capture_output=True).returncode == 0:
            break
    line = next(x for x in doctor().stdout.splitlines() if x.startswith("accelerator:"))
    assert "not probed yet" in line and "`bottle doctor --probe` does it now" in line, line
    r = doctor("--probe")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"probing KVM: booting {image.name} once under KVM" in r.stdout, r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("accelerator:"))
    assert line.startswith(("accelerator: kvm (", "accelerator: tcg (", "accelerator: tcg for the last run")), line
    assert "using TCG" not in r.stderr, r.stderr  # said once, by that line
    assert "Negotiation failed" not in r.stderr and "establish session" not in r.stderr, r.stderr  # qemu.qmp's logging
    assert not list((cache / "run").glob("kvm-probe-*")) and not processes_mentioning(str(cache))
    stored = accel.stored_verdict(cache)
    if stored is not None and stored[0].definite:
        again = doctor("--probe")  # a definite verdict stands: no second probe
        assert "probing KVM" not in again.stdout and line in again.stdout, again.stdout


def test_cli_doctor_image_list_sweep(warm_cache: Path) -> None:
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
