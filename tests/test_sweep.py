"""Leases, run-state records and sweeping, with real processes (issue: leak sweeping)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from pytest_bottle.errors import PoolExhausted
from pytest_bottle.net import pools
from pytest_bottle.paths import default_cache_dir
from pytest_bottle.runstate import RunRecord
from pytest_bottle.sweep import sweep
from pytest_bottle.vmm.process import boot_id

CACHE = str(default_cache_dir())
LEASER = textwrap.dedent("""
    import json, sys, time
    from pytest_bottle.net import pools
    got = pools.lease("loopback", sys.argv[1], int(sys.argv[2]), size=int(sys.argv[3]))
    print(json.dumps(got), flush=True)
    time.sleep(float(sys.argv[4]))
""")


@pytest.fixture
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "state"
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(state))
    return state


def _leasers(n: int, count: int, size: int, hold: float) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", LEASER, f"holder{i}", str(count), str(size), str(hold)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]


def test_concurrent_processes_never_share_a_lease(private_state: Path) -> None:
    procs = _leasers(6, 10, 60, 3.0)
    results = []
    for p in procs:
        out = p.stdout.readline()  # type: ignore[union-attr]
        assert out, p.stderr.read()  # type: ignore[union-attr]
        results.append(json.loads(out))
    values = [v for r in results for v in r]
    assert len(values) == 60 and len(set(values)) == 60
    # The pool is full while they live: one more is refused with a clear error.
    with pytest.raises(PoolExhausted) as info:
        pools.lease("loopback", "late", 1, size=60)
    assert info.value.pool == "loopback" and "live owners" in str(info.value)
    for p in procs:
        p.communicate()
    # Their owners are dead now: the same values can be leased again.
    again = pools.lease("loopback", "late", 60, size=60)
    assert sorted(again) == sorted(values)


def test_release_and_dead_owner_reclaim(private_state: Path) -> None:
    mine = pools.lease("mac", "vm-a", 2)
    assert len(set(mine)) == 2
    pools.release("vm-a")
    assert "vm-a" not in json.dumps(pools.snapshot())
    (p,) = _leasers(1, 3, 100, 0)
    p.communicate()
    reclaimed = pools.reclaim_dead()
    assert len(reclaimed) == 3 and {h for _, _, h in reclaimed} == {"holder0"}


def test_pid_reuse_does_not_make_a_dead_owner_alive(private_state: Path, tmp_path: Path) -> None:
    # Same pid as a live process, different start time: that owner is dead.
    run_dir = tmp_path / "btl-reused"
    run_dir.mkdir()
    reused = f"12345@{boot_id()}"
    rec = RunRecord(name="btl-reused", owner_pid=os.getpid(), owner_start=reused, run_dir=str(run_dir))
    rec.save()
    live_dir = tmp_path / "btl-live"
    live_dir.mkdir()
    RunRecord.create("btl-live", live_dir)
    report = sweep()
    assert "btl-reused" in report.vms and not run_dir.exists()
    assert live_dir.exists() and {r.name for r in RunRecord.load_all()} == {"btl-live"}


HOLDER = """
import json, os, time
from pathlib import Path

def test_hold(bottle_factory):
    bottles = [bottle_factory(forward=[8080]), bottle_factory(lan="l"), bottle_factory(lan="l")]
    Path(os.environ["INFO"]).write_text(json.dumps([b.name for b in bottles]))
    go = Path(os.environ["INFO"] + ".go")
    deadline = time.time() + 600
    while not go.exists() and time.time() < deadline:
        time.sleep(0.2)
    for b in bottles:
        assert b.check_output("echo alive") == "alive\\n"
"""


def _start_holder(tmp_path: Path, tag: str) -> tuple[subprocess.Popen[bytes], Path]:
    test = tmp_path / f"test_hold_{tag}.py"
    test.write_text(HOLDER)
    info = tmp_path / f"info_{tag}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", str(test), f"--bottle-cache-dir={CACHE}", "-p", "no:cacheprovider", "-q"],
        cwd=tmp_path,
        env=dict(os.environ, INFO=str(info)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 300
    while not info.exists():
        assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
        assert time.time() < deadline
        time.sleep(0.2)
    return proc, info


def _trivial_run(tmp_path: Path) -> None:
    (tmp_path / "test_trivial.py").write_text("def test_nothing():\n    pass\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "test_trivial.py",
            f"--bottle-cache-dir={CACHE}",
            "-p",
            "no:cacheprovider",
            "-q",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _net_inodes() -> set[str]:
    seen = set()
    for pid in psutil.pids():
        for path in [f"/proc/{pid}/ns/net"] + [f"/proc/{pid}/fd/{fd}" for fd in _fds(pid)]:
            try:
                target = os.readlink(path)
            except OSError:
                continue
            if target.startswith("net:["):
                seen.add(target)
    return seen


def _fds(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []


@pytest.mark.slow
def test_kill_9_then_next_run_leaves_nothing(tmp_path: Path) -> None:
    proc, info = _start_holder(tmp_path, "killed")
    names = json.loads(info.read_text())
    records = {r.name: r for r in RunRecord.load_all() if r.name in names}
    assert set(records) == set(names)
    qemu_pids = [r.qemu_pid for r in records.values()]
    netns = {r.netns for r in records.values() if r.netns}
    assert len(netns) == 1 and netns <= _net_inodes()

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # QEMU goes by itself (parent-death signal), before any sweep.
    deadline = time.time() + 10
    while any(psutil.pid_exists(p) for p in qemu_pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) for p in qemu_pids), "QEMU outlived its killed owner"

    _trivial_run(tmp_path)  # its startup sweep cleans up after the killed run
    assert not {r.name for r in RunRecord.load_all()} & set(names)
    assert not any(Path(r.run_dir).exists() for r in records.values()), "run dirs (overlays) left"
    leased = json.dumps(pools.snapshot())
    assert not any(n in leased for n in names), "leases left"
    assert not netns & _net_inodes(), "the LAN's network namespace is still referenced"


@pytest.mark.slow
def test_sweep_leaves_a_live_run_alone(tmp_path: Path) -> None:
    proc, info = _start_holder(tmp_path, "live")
    names = json.loads(info.read_text())
    _trivial_run(tmp_path)  # another run starts and sweeps
    r = subprocess.run(
        [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={CACHE}", "sweep"], capture_output=True, text=True
    )
    assert r.returncode == 0 and not any(n in r.stdout for n in names), r.stdout
    Path(str(info) + ".go").touch()
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out
    assert "1 passed" in out
