"""Start-up and cache faults against real QEMU, real sockets and real cache files (issue 11)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import processes_mentioning

import pytest_bottle
from pytest_bottle import BootError, BottleError
from pytest_bottle.agent.channel import AgentChannel
from pytest_bottle.host.mounts import unescape_mount_field
from pytest_bottle.host.paths import default_cache_dir, remove_tree, tree_size
from pytest_bottle.images import ensure_image
from pytest_bottle.images.cache import entry_dir
from pytest_bottle.images.recipes import get_recipe
from pytest_bottle.lifecycle.boot import prepare_run_dir, wait_ready
from pytest_bottle.lifecycle.probe import run_probe
from pytest_bottle.store import saved
from pytest_bottle.store.saved import SavedState
from pytest_bottle.store.seeds import SEED_VERSION, list_seeds
from pytest_bottle.vmm import accel, backend
from pytest_bottle.vmm.qemu import MachineConfig, Nic

CACHE = default_cache_dir()
launch_mod = sys.modules["pytest_bottle.lifecycle.launch"]  # the package's `launch` attribute is the function
resources_mod = sys.modules["pytest_bottle.lifecycle.resources"]


def _current_seed() -> SavedState:
    """The main cache's seed for a default bottle, made by this code."""
    with pytest_bottle.launch():
        pass
    image = ensure_image("debian-bookworm", CACHE)
    seeds = [
        s
        for s in list_seeds(CACHE)
        if s.manifest["key_parts"].get("seed_version") == SEED_VERSION
        and s.manifest["key_parts"]["image_built"] == image.manifest["created"]
        and tuple(s.manifest["key_parts"][k] for k in ("memory_mb", "cpus", "nics")) == (512, 1, 1)
    ]
    return max(seeds, key=lambda s: s.manifest["created"])


def _cp(src: Path, dst_dir: Path) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst_dir)], check=True)


def _own_cache(root: Path, with_image: bool) -> Path:
    """A cache holding a copy of the current seed and keys; the image is a
    copy too (``with_image``) or the main cache's entry, linked."""
    seed = _current_seed()
    root.mkdir(parents=True)
    entry = entry_dir(CACHE, get_recipe("debian-bookworm"))
    if with_image:
        _cp(entry, root / "images")
    else:  # the current entry only: nothing here may prune the main cache
        (root / "images").mkdir()
        os.symlink(entry, root / "images" / entry.name)
    _cp(seed.path, root / "seeds")
    _cp(CACHE / "keys", root)
    if (CACHE / "accel.json").exists():
        shutil.copy(CACHE / "accel.json", root / "accel.json")
    return root


@pytest.fixture
def seeded(tmp_path: Path, no_spare_starting: None) -> Path:
    # (Its tests patch module globals that a spare still starting would call.)
    return _own_cache(tmp_path / "cache", with_image=False)


# -- QEMU failing during a restore -------------------------------------------


def test_port_taken_between_check_and_bind_is_picked_again(seeded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another program binds the bottle's SSH port right after ``_host_port``
    found it free: QEMU's hostfwd then cannot bind it and exits."""
    real = resources_mod._host_port
    held: list[socket.socket] = []
    calls: list[tuple[int, int]] = []

    def racing(alias: str, port: int, *rest: Any) -> int:
        host_port: int = real(alias, port, *rest)
        calls.append((port, host_port))
        if not held:
            s = socket.socket()  # a real listener on exactly that address
            s.bind((alias, host_port))
            s.listen()
            held.append(s)
        return host_port

    monkeypatch.setattr(resources_mod, "_host_port", racing)
    try:
        with pytest_bottle.launch(cache_dir=seeded) as b:
            taken = held[0].getsockname()
            assert b.address(22) != taken
            assert [p for p, _ in calls] == [22, 22]  # picked again once
            assert b.ssh("echo through-ssh", timeout=60).stdout == "through-ssh\n"
            assert "host forwarding" not in (Path(b.console_log_path).parent / "qemu.log").read_text()
    finally:
        for s in held:
            s.close()
    assert not processes_mentioning(str(seeded))


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["memory.state", "disk.qcow2", "the whole seed"])
def test_seed_removed_after_its_check_is_rebuilt_once(
    seeded: Path, monkeypatch: pytest.MonkeyPatch, victim: str
) -> None:
    """A seed that goes between ``ensure_seed``'s check and QEMU opening it
    (a concurrent discard or prune) takes the discard-and-rebuild path."""
    real = launch_mod.ensure_seed
    seen: list[SavedState] = []
    (original,) = list_seeds(seeded)
    # A seed of an older format: creating the new one prunes it.
    stale = seeded / "seeds" / (original.path.name[:-16] + "0" * 16)
    subprocess.run(["cp", "-a", "--sparse=always", str(original.path), str(stale)], check=True)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["key_parts"]["seed_version"] = SEED_VERSION - 1
    (stale / "manifest.json").write_text(json.dumps(manifest))

    def racing(*args: Any, **kwargs: Any) -> SavedState:
        seed: SavedState = real(*args, **kwargs)
        seen.append(seed)
        if len(seen) == 1:
            if victim == "the whole seed":
                shutil.rmtree(seed.path)
            else:
                (seed.path / victim).unlink()
        return seed

    monkeypatch.setattr(launch_mod, "ensure_seed", racing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest_bottle.launch(cache_dir=seeded) as b:
            assert b.check_output("echo rebuilt") == "rebuilt\n"
    discarded = [w for w in caught if "discarded seed" in str(w.message)]
    # A seed still there is discarded with a warning; one already gone is just rebuilt.
    assert len(discarded) == (0 if victim == "the whole seed" else 1), [str(w.message) for w in caught]
    assert len(seen) == 2
    (rebuilt,) = list_seeds(seeded)
    assert rebuilt.path == original.path and rebuilt.manifest["created"] > original.manifest["created"]
    assert not stale.exists()
    assert not processes_mentioning(str(seeded))


def test_image_removed_under_a_seed_is_a_boot_error_with_qemus_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_spare_starting: None
) -> None:
    cache = _own_cache(tmp_path / "cache", with_image=True)
    real = launch_mod.ensure_seed

    def racing(*args: Any, **kwargs: Any) -> SavedState:
        seed: SavedState = real(*args, **kwargs)
        (cache / "images" / entry_dir(CACHE, get_recipe("debian-bookworm")).name / "rootfs.ext4").unlink()
        return seed

    monkeypatch.setattr(launch_mod, "ensure_seed", racing)
    with pytest.raises(BootError) as info:
        pytest_bottle.launch(cache_dir=cache)
    assert "QEMU exited" in info.value.reason and "rootfs.ext4" in info.value.reason
    assert "No such file" in info.value.reason
    assert not processes_mentioning(str(cache))
    assert not list((cache / "run").iterdir())
    assert len(list_seeds(cache)) == 1  # the seed was not at fault


# -- a moved cache ------------------------------------------------------------


def test_a_moved_cache_uses_only_its_new_location(tmp_path: Path) -> None:
    old = _own_cache(tmp_path / "old", with_image=True)
    with pytest_bottle.launch(cache_dir=old) as b:
        assert b.check_output("echo here") == "here\n"
    new = tmp_path / "elsewhere" / "cache"
    new.parent.mkdir()
    os.rename(old, new)  # as a CI cache restore puts it at another path
    with pytest_bottle.launch(cache_dir=new) as b:
        assert b.check_output("echo moved") == "moved\n"
        files = [f.path for f in psutil.Process(b.pid).open_files()]
    disks = [f for f in files if f.endswith(("rootfs.ext4", "disk.qcow2"))]
    assert any(f.endswith("rootfs.ext4") for f in disks), files
    assert all(os.path.realpath(f).startswith(str(new) + "/") for f in disks), disks


# -- pruning ------------------------------------------------------------------


KEEP_LOGS = 5  # documented: the newest 5 failed-build logs per image entry


def test_image_prune_removes_stale_seeds_and_logs_and_reports_bytes(seeded: Path) -> None:
    (current,) = list_seeds(seeded)
    stale = {}
    for label, change in {
        "old-format": {"seed_version": SEED_VERSION - 1},
        "old-qemu": {"qemu": "QEMU emulator version 1.0"},
        "old-build": {"image_built": 1.0},
        "in-use": {"seed_version": SEED_VERSION - 2},
    }.items():
        path = seeded / "seeds" / f"debian-bookworm-512m1c1n-{label}"
        subprocess.run(["cp", "-a", "--sparse=always", str(current.path), str(path)], check=True)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["key_parts"].update(change)
        (path / "manifest.json").write_text(json.dumps(manifest))
        stale[label] = path
    logs = seeded / "logs"
    logs.mkdir()
    entry = entry_dir(CACHE, get_recipe("debian-bookworm")).name
    for i in range(KEEP_LOGS + 3):
        (logs / f"{entry}-failed-{i}.log").write_text("E: boom\n")
        os.utime(logs / f"{entry}-failed-{i}.log", (1000 + i, 1000 + i))
    (logs / "gone-recipe-0123-failed-1.log").write_text("E: old\n")

    busy = SavedState(stale["in-use"], json.loads((stale["in-use"] / "manifest.json").read_text()))
    with saved.in_use(busy):  # a clone is starting from it
        r = subprocess.run(
            [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={seeded}", "image", "prune"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 0, r.stderr
    for label in ("old-format", "old-qemu", "old-build"):
        assert not stale[label].exists()
        assert f"removed {stale[label]} (" in r.stdout
    assert stale["in-use"].exists() and current.path.exists()
    kept_logs = sorted(p.name for p in logs.iterdir())
    assert kept_logs == sorted(f"{entry}-failed-{i}.log" for i in range(3, KEEP_LOGS + 3))
    last = r.stdout.strip().splitlines()[-1]
    freed = re.fullmatch(r"pruned 7 entries, freed ([\d.]+) (MB|GB)", last)
    assert freed, r.stdout
    assert float(freed[1]) * (1000 if freed[2] == "GB" else 1) > 100  # three seeds of > 100 MB each


# -- the KVM probe ------------------------------------------------------------


def test_probe_timeout_classification() -> None:
    busy = accel.timed_out("no answer", 20, waited=9.0, load=0, cpus=2)
    idle = accel.timed_out("no answer", 20, waited=0.5, load=9, cpus=2)
    assert (busy.ok, busy.definite, idle.ok, idle.definite) == (False, False, False, True)
    assert idle.reason == "no answer; QEMU waited 0.5s of 20.0s for a CPU"
    assert busy.reason == "inconclusive: no answer while the host was busy (QEMU waited 9.0s of 20.0s for a CPU)"
    assert accel.timed_out("x", 20, waited=None, load=5, cpus=2).definite is False
    assert accel.timed_out("x", 20, waited=None, load=1, cpus=2).definite is True
    # The wait counts against the time QEMU lived; a QEMU that started late proves nothing.
    assert accel.timed_out("x", 20, waited=3.0, load=0, cpus=2, lived=11).definite is False
    assert accel.timed_out("x", 20, waited=0.0, load=0, cpus=2, lived=9).definite is False
    assert accel.timed_out("x", 20, waited=0.5, load=0, cpus=2, lived=19).definite is True


@pytest.fixture
def one_busy_cpu(no_spare_starting: None) -> Iterator[None]:
    """Pin this process (so the QEMU it starts) to CPU 0 next to real
    busy loops of higher priority: a host too busy for a boot.  The image is
    built first: from an empty cache its build ran under the loops (0.3% of a
    CPU: decompressing apt's lists alone took minutes) and held up the run."""
    ensure_image("debian-bookworm", CACHE)
    cpu = min(os.sched_getaffinity(0))
    before = {int(t): os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}
    hogs = [
        subprocess.Popen(
            ["taskset", "-c", str(cpu), "nice", "-n", "-20", sys.executable, "-c", "while True: pass"],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(3)
    ]
    for tid in before:
        os.sched_setaffinity(tid, {cpu})
    try:
        yield
    finally:
        for tid, cpus in before.items():
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass
        for h in hogs:
            h.send_signal(signal.SIGKILL)
            h.wait()


def _plan(**changes: Any) -> MachineConfig:
    image = ensure_image("debian-bookworm", CACHE)
    plan = MachineConfig(image.kernel, image.initrd, image.rootfs, 512, 1, "tcg", (Nic("net0", "52:54:00:b0:77:01"),))
    return dataclasses.replace(plan, **changes)


@pytest.mark.skipif(accel.kvm_usable() is not None, reason="decide() probes only where /dev/kvm opens")
def test_a_probe_that_timed_out_on_a_busy_host_is_retried_next_run(
    tmp_path: Path, one_busy_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[accel.ProbeResult] = []

    def probe(timeout: float) -> accel.ProbeResult:  # a real boot, starved of CPU
        run_dir = tmp_path / f"probe-{len(probes)}"
        run_dir.mkdir()
        probes.append(run_probe(_plan(), run_dir, 4.0))
        return probes[-1]

    monkeypatch.setenv("PYTEST_XDIST_TESTRUNUID", "run-1")
    verdict = accel.decide("auto", tmp_path, probe)
    assert verdict.accel == "tcg" and "inconclusive" in verdict.reason, verdict
    assert probes[0].definite is False
    accel.decide("auto", tmp_path, probe)  # the same run: no second probe
    assert len(probes) == 1
    monkeypatch.setenv("PYTEST_XDIST_TESTRUNUID", "run-2")
    accel.decide("auto", tmp_path, probe)
    assert len(probes) == 2
    assert not processes_mentioning(str(tmp_path))


def _decide_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **changes: Any) -> list[accel.ProbeResult]:
    """decide() in two runs, with a real probe boot of ``_plan(**changes)``."""
    probes: list[accel.ProbeResult] = []

    def probe(timeout: float) -> accel.ProbeResult:
        run_dir = tmp_path / f"probe-{len(probes)}"
        run_dir.mkdir()
        probes.append(run_probe(_plan(**changes), run_dir, 60.0))
        return probes[-1]

    for run in ("run-1", "run-2"):
        monkeypatch.setenv("PYTEST_XDIST_TESTRUNUID", run)
        verdict = accel.decide("auto", tmp_path, probe)
        assert verdict.accel == "tcg" and probes[-1].reason in verdict.reason
    assert not processes_mentioning(str(tmp_path))
    return probes


@pytest.mark.skipif(accel.kvm_usable() is not None, reason="decide() probes only where /dev/kvm opens")
def test_a_probe_where_the_guest_kernel_panics_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-initrd"
    empty.write_bytes(b"")  # no initramfs: the kernel cannot mount its root and panics
    probes = _decide_twice(tmp_path, monkeypatch, initrd=empty)
    assert len(probes) == 1 and probes[0].definite
    assert "Kernel panic - not syncing" in probes[0].reason


@pytest.mark.skipif(accel.kvm_usable() is not None, reason="decide() probes only where /dev/kvm opens")
def test_a_probe_where_qemu_exits_for_a_host_side_reason_is_retried_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes = _decide_twice(tmp_path, monkeypatch, kernel=tmp_path / "no-such-kernel")
    assert len(probes) == 2 and not any(p.definite for p in probes)
    assert "QEMU exited with 1" in probes[0].reason and "no-such-kernel" in probes[0].reason


def test_a_qemu_gone_before_the_handshake_is_a_boot_error_with_its_reason(tmp_path: Path) -> None:
    """QEMU exits (a bad kernel) after the agent's socket connected, before the
    first write: the race CI hit, forced. Its reason, not a broken pipe."""
    cfg = _plan(kernel=tmp_path / "no-such-kernel")
    prepare_run_dir(cfg, tmp_path, "gone")
    machine = backend.start(cfg, tmp_path, name="gone")
    try:
        assert machine.wait(30) == 1
        channel = AgentChannel(machine.agent_sock, "gone")
        with pytest.raises(BootError, match="QEMU exited with 1.*no-such-kernel"):
            wait_ready(machine, channel, 10, "gone", time.monotonic() + 10)
        channel.close()
    finally:
        machine.stop()
    assert not processes_mentioning(str(tmp_path))


def test_a_probe_that_cannot_make_its_disk_is_inconclusive(tmp_path: Path) -> None:
    """A host-side fault before QEMU starts (an image gone, a full disk)."""
    run_dir = tmp_path / "probe"
    run_dir.mkdir()
    result = run_probe(_plan(disk=tmp_path / "no-such-rootfs.ext4"), run_dir, 60.0)
    assert (result.ok, result.definite) == (False, False)
    assert "cannot create the disk overlay" in result.reason and "inconclusive" in result.reason
    assert not processes_mentioning(str(tmp_path))


def test_a_probe_whose_qemu_is_killed_by_a_signal_is_inconclusive(tmp_path: Path) -> None:
    """The OOM killer's SIGKILL says nothing about KVM."""
    run_dir = tmp_path / "probe"
    run_dir.mkdir()
    killed: list[int] = []

    def oom_killer() -> None:
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for p in processes_mentioning(str(run_dir)):  # only this probe's QEMU, never a spare
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p.pid)
            time.sleep(0.01)

    thread = threading.Thread(target=oom_killer)
    thread.start()
    try:
        result = run_probe(_plan(), run_dir, 60.0)
    finally:
        thread.join()
    assert killed
    assert (result.ok, result.definite) == (False, False), result
    assert "SIGKILL" in result.reason
    assert not processes_mentioning(str(tmp_path))


# -- keep() on launch() -------------------------------------------------------


def test_keep_on_an_attached_launch_bottle_raises_and_leaves_it_usable(seeded: Path) -> None:
    with pytest_bottle.launch(cache_dir=seeded) as b:
        with pytest.raises(BottleError, match="cannot be kept"):
            b.keep()
        assert not b.kept and b.check_output("echo still") == "still\n"
    assert not processes_mentioning(str(seeded))


def test_a_kept_detached_launch_bottle_outlives_its_process(seeded: Path) -> None:
    script = (
        "import sys, pytest_bottle\n"
        f"b = pytest_bottle.launch(detached=True, cache_dir={str(seeded)!r})\n"
        "b.keep()\n"
        "print(b.name, b.pid, flush=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    name, pid = r.stdout.split()
    qemu = psutil.Process(int(pid))
    try:
        time.sleep(1)
        assert qemu.is_running() and qemu.name() == "qemu-system-x86_64"
        stop = subprocess.run(
            [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={seeded}", "stop", name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stop.returncode == 0, stop.stderr
        qemu.wait(10)
    finally:
        if qemu.is_running():
            qemu.kill()


SLOW_KEYGEN = """
import sys, time
import pytest_bottle
from pytest_bottle import BootTimeout
started = time.monotonic()
try:
    with pytest_bottle.launch(timeout=5, cache_dir=sys.argv[1]):
        print("started", round(time.monotonic() - started, 1))
except BootTimeout as e:
    print("timeout", round(time.monotonic() - started, 1), str(e).replace(chr(10), " | ")[:3000])
"""


def test_a_start_waits_for_its_handshake_no_longer_than_its_timeout(seeded: Path, tmp_path: Path) -> None:
    """The clone handshake waited for the bottle's SSH host key as long as
    ssh-keygen took, and for the guest's answer up to 120 s, whatever the
    bottle's ``timeout``: a start of ``timeout=5`` took 14 s here."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    slow = bindir / "ssh-keygen"  # the real one, after a pause (a host under heavy load)
    slow.write_text(f'#!/bin/sh\nsleep 14\nexec {shutil.which("ssh-keygen")} "$@"\n')
    slow.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    for seed in list_seeds(seeded):  # hashed now, not inside the 5 s (a copy's stamp no longer matches)
        saved.verify(seed)
    r = subprocess.run([sys.executable, "-c", SLOW_KEYGEN, str(seeded)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    word, took, *why = r.stdout.split(maxsplit=2)
    assert word == "timeout" and float(took) < 11, r.stdout
    assert "the clone handshake did not finish within the bottle's timeout (5 s)" in why[0], r.stdout
    assert not processes_mentioning(str(seeded))


# -- paths with spaces ----------------------------------------------------------


@pytest.mark.slow
def test_a_cache_dir_with_spaces_seeds_boots_and_serves_ssh(tmp_path: Path) -> None:
    """A seed made there (a cold boot, its state saved), a clone restored from it.
    A build under such a path: test_contract_images' tiny image."""
    cache = tmp_path / "a cache dir" / "with spaces"
    _cp(ensure_image("debian-bookworm", CACHE).path, cache / "images")
    # The seed's cold boot (15 s or more under TCG) is not part of the start's
    # timeout: a clone handshake measured against a deadline set before it failed.
    with pytest_bottle.launch(cache_dir=cache, timeout=6) as b:
        assert b.ssh("echo via-ssh", timeout=60).stdout == "via-ssh\n"
        r = subprocess.run(b.ssh_argv("cat", "/etc/hostname"), capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout) == (0, f"{b.name}\n"), r.stderr
    assert not processes_mentioning(str(cache))


def test_ssh_config_names_paths_with_spaces_quotes_and_percent(tmp_path: Path) -> None:
    """What OpenSSH itself reads from the generated file (``ssh -G``)."""
    from pytest_bottle.ssh import SshAccess

    odd = tmp_path / 'a dir "with" 100% \\odd'
    odd.mkdir()
    identity = odd / "id key"
    identity.write_text("")
    access = SshAccess.create("btl-0dd", "127.0.0.1", 2222, identity, "ssh-ed25519 AAAAC3Nz", odd)
    r = subprocess.run(
        ["ssh", "-G", "-F", str(access.config_path), "btl-0dd"], capture_output=True, text=True, timeout=30, check=True
    )
    seen = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert seen["userknownhostsfile"] == str(odd / "known_hosts")
    # ssh -G prints IdentityFile before %-expansion: %% stands for %.
    assert seen["identityfile"].replace("%%", "%") == str(identity)
    assert (seen["hostname"], seen["port"]) == ("127.0.0.1", "2222")


def _mount_points() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {unescape_mount_field(line.split()[1]) for line in f}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a file system needs root")
def test_remove_tree_unmounts_what_a_killed_build_left_under_a_path_with_spaces(tmp_path: Path) -> None:
    """A killed mmdebstrap leaves its /proc, /sys, /dev mounts in the build
    root; the cache dir has spaces, which /proc/self/mounts writes as \\040."""
    entry = tmp_path / "a cache" / ".tmp-debian 1234"
    mnt = entry / "root" / "dev pts"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "bottle-test", str(mnt)], check=True)
    try:
        (mnt / "file").write_text("in the mount\n")
        remove_tree(entry)
        assert str(mnt) not in _mount_points()
        assert not entry.exists()
    finally:
        if str(mnt) in _mount_points():
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a file system needs root")
def test_tree_size_does_not_enter_a_builds_mounts(tmp_path: Path) -> None:
    """``bottle doctor`` sizes the cache while a build in it has /proc mounted
    in its root: walking into it failed with EINVAL (a task's ``net``).
    A mount below the cache is not entered (a tmpfs with data shows it)."""
    build_root = tmp_path / "images" / ".tmp-x-1" / "root"
    (build_root / "proc").mkdir(parents=True)
    (build_root / "etc").mkdir()
    (build_root / "etc" / "hostname").write_bytes(b"x" * 8192)
    subprocess.run(["mount", "-t", "tmpfs", "bottle-test", str(build_root / "proc")], check=True)
    try:
        (build_root / "proc" / "big").write_bytes(os.urandom(8 << 20))
        size = tree_size(tmp_path)
        assert 8192 <= size < 1 << 20  # the file counted, nothing of the mount
    finally:
        subprocess.run(["umount", "-l", str(build_root / "proc")], check=False)
