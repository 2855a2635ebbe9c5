"""Leases, run-state records and sweeping, with real processes (issue: leak sweeping)."""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from harness import VERSION_IDS, kill_group, run_isolated, wait_until

from pytest_bottle.errors import PoolExhausted
from pytest_bottle.host.deps import which
from pytest_bottle.host.paths import default_cache_dir, state_dir
from pytest_bottle.host.runstate import RunRecord
from pytest_bottle.host.sweep import sweep
from pytest_bottle.net import pools
from pytest_bottle.vmm.process import boot_id

CACHE = str(default_cache_dir())
LEASER = textwrap.dedent("""
    import json, sys
    from pytest_bottle.net import pools
    got = pools.lease("loopback", sys.argv[1], int(sys.argv[2]), size=int(sys.argv[3]))
    print(json.dumps(got), flush=True)
    sys.stdin.read()  # hold the lease until the test closes our stdin
""")


def _isolated(body: str, state: Path) -> None:
    """Run ``test_sweep.<body>()`` with its own BOTTLE_STATE_DIR, in a process of
    its own: changing it here would also move a spare the pre-start thread is
    starting right now."""
    run_isolated(f"import test_sweep; test_sweep.{body}()", env={"BOTTLE_STATE_DIR": str(state)})


def _leasers(n: int, count: int, size: int) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", LEASER, f"holder{i}", str(count), str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]


def test_concurrent_processes_never_share_a_lease(tmp_path: Path) -> None:
    _isolated("_concurrent_leases", tmp_path / "state")


def _concurrent_leases() -> None:
    procs = _leasers(6, 10, 60)
    try:
        results = []
        for p in procs:
            out = p.stdout.readline()  # type: ignore[union-attr]
            assert out, p.stderr.read()  # type: ignore[union-attr]
            results.append(json.loads(out))
        values = [v for r in results for v in r]
        assert len(values) == 60 and len(set(values)) == 60, values
        # The pool is full while they live: one more is refused with a clear error.
        with pytest.raises(PoolExhausted) as info:
            pools.lease("loopback", "late", 1, size=60)
        assert info.value.pool == "loopback" and "live owners" in str(info.value)
    finally:
        for p in procs:
            p.communicate()  # closes stdin: they let go and exit
    # Their owners are dead now: the same values can be leased again.
    again = pools.lease("loopback", "late", 60, size=60)
    assert sorted(again) == sorted(values)


def test_release_and_dead_owner_reclaim(tmp_path: Path) -> None:
    _isolated("_release_and_reclaim", tmp_path / "state")


def _release_and_reclaim() -> None:
    mine = pools.lease("mac", "vm-a", 2)
    assert len(set(mine)) == 2
    assert sorted(pools.release("vm-a")) == sorted(("mac", m) for m in mine)
    assert "vm-a" not in json.dumps(pools.snapshot())
    (p,) = _leasers(1, 3, 100)
    assert p.stdout.readline()  # type: ignore[union-attr]
    p.communicate()
    reclaimed = pools.reclaim_dead()
    assert len(reclaimed) == 3 and {h for _, _, h in reclaimed} == {"holder0"}, reclaimed


def test_pid_reuse_does_not_make_a_dead_owner_alive(tmp_path: Path) -> None:
    _isolated("_pid_reuse", tmp_path / "state")


def _pid_reuse() -> None:
    # Same pid as a live process, different start time: that owner is dead.
    base = state_dir()
    run_dir = base / "btl-reused"
    run_dir.mkdir()
    reused = f"12345@{boot_id()}"
    rec = RunRecord(name="btl-reused", owner_pid=os.getpid(), owner_start=reused, run_dir=str(run_dir))
    rec.save()
    live_dir = base / "btl-live"
    live_dir.mkdir()
    RunRecord.create("btl-live", live_dir)
    report = sweep()
    assert "btl-reused" in report.vms and not run_dir.exists()
    assert live_dir.exists() and {r.name for r in RunRecord.load_all()} == {"btl-live"}


def test_a_qemu_its_dead_owner_had_not_recorded_is_ended(tmp_path: Path) -> None:
    """A detached QEMU (``--bottle-keep``) has no parent-death signal, and its pid
    goes into the record only once it runs: an owner killed in between left it
    running past every sweep, which removed its record and run directory."""
    _isolated("_unrecorded_qemu", tmp_path / "state")


def _unrecorded_qemu() -> None:
    run_dir = state_dir() / "btl-gap"
    run_dir.mkdir()
    qemu = subprocess.Popen(  # holds its pid file in the run directory open, as a bottle's QEMU holds its files
        [
            "qemu-system-x86_64",
            "-M",
            "microvm",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-pidfile",
            str(run_dir / "qemu.pid"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: (run_dir / "qemu.pid").exists(), 30, "QEMU's pid file")
        dead_owner = f"12345@{boot_id()}"
        RunRecord(name="btl-gap", owner_pid=os.getpid(), owner_start=dead_owner, run_dir=str(run_dir)).save()
        report = sweep()
        assert report.processes == [qemu.pid] and report.vms == ["btl-gap"], report
        qemu.wait(timeout=10)  # ended by the sweep (SIGTERM first: it exits at once)
        assert not run_dir.exists() and RunRecord.load_all() == []
    finally:
        kill_group(qemu)


def test_the_startup_sweep_says_what_it_removed(tmp_path: Path) -> None:
    _isolated("_startup_sweep_says", tmp_path / "state")


def _startup_sweep_says() -> None:
    # It ran before pytest's logging was set up: a run after a kill -9 cleaned up in silence.
    run_dir = state_dir() / "btl-dead"
    run_dir.mkdir()
    RunRecord(name="btl-dead", owner_pid=os.getpid(), owner_start=f"12345@{boot_id()}", run_dir=str(run_dir)).save()
    assert len(pools.lease("mac", "btl-dead", 2)) == 2  # a VM's leases count with it
    with tempfile.TemporaryDirectory() as tmp:
        out = _trivial_run(Path(tmp))
    said = (
        "pytest-bottle: the startup sweep removed what dead runs left: swept 1 VM record(s), 0 process(es), 2 lease(s)"
    )
    assert said in out and not run_dir.exists(), out


HOLDER = """
import json, os, time
from pathlib import Path

def test_hold(bottle_factory):
    bottles = [bottle_factory(forward=[8080]), bottle_factory(lan="l"), bottle_factory(lan="l")]
    for b in bottles:  # the release the test asked for (--bottle-image)
        assert b.check_output(". /etc/os-release && echo $VERSION_ID").strip() == os.environ["VERSION_ID"]
    Path(os.environ["INFO"]).write_text(json.dumps([b.name for b in bottles]))
    go = Path(os.environ["INFO"] + ".go")
    deadline = time.time() + 300
    while not go.exists() and time.time() < deadline:
        time.sleep(0.2)
    for b in bottles:
        assert b.check_output("echo alive") == "alive\\n"
"""


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[bytes]]]:
    """pytest runs holding three VMs: killed when the test ends, passed or not,
    and what they leave swept (their VMs die with them; records and leases stay)."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    if any(p.poll() is None for p in procs):
        for proc in procs:
            kill_group(proc)
        subprocess.run([sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={CACHE}", "sweep"], check=False)


@pytest.fixture
def image() -> str:
    """The holder's image; a test parametrized over ``image`` replaces it."""
    return "debian-bookworm"


@pytest.fixture
def holder_seeds(warm_seed: Callable[..., None], image: str) -> None:
    """The seeds the holder's bottles restore from (one NIC, and two for a LAN
    member): made before its deadline."""
    warm_seed(image=image)
    warm_seed(image=image, lan="warm")


def _start_holder(
    tmp_path: Path, tag: str, holders: list[subprocess.Popen[bytes]], image: str = "debian-bookworm"
) -> tuple[subprocess.Popen[bytes], Path]:
    test = tmp_path / f"test_hold_{tag}.py"
    test.write_text(HOLDER)
    info = tmp_path / f"info_{tag}.json"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "pytest", str(test), f"--bottle-cache-dir={CACHE}", f"--bottle-image={image}"),
            *("-p", "no:cacheprovider", "-q"),
        ],
        cwd=tmp_path,
        env=dict(os.environ, INFO=str(info), VERSION_ID=VERSION_IDS[image]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    holders.append(proc)

    def ready() -> bool:
        assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
        return info.exists() and bool(info.read_text())

    wait_until(ready, 300, "the holder run started its three bottles", interval=0.2)
    return proc, info


def _trivial_run(tmp_path: Path) -> str:
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
    return r.stdout


def _netns_refs() -> dict[str, list[str]]:
    """Every network namespace some process references (as its own or by an
    open fd): ``net:[inode]`` → the /proc paths that reach it."""
    seen: dict[str, list[str]] = {}
    for pid in psutil.pids():
        for path in [f"/proc/{pid}/ns/net"] + [f"/proc/{pid}/fd/{fd}" for fd in _fds(pid)]:
            try:
                target = os.readlink(path)
            except OSError:
                continue
            if target.startswith("net:["):
                seen.setdefault(target, []).append(path)
    return seen


def _fds(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET, SO_NETNS_COOKIE = 0x40000000, 71


def _netns_cookie(path: str) -> int | None:
    """The namespace's cookie: unlike its inode number, never reused (Linux 5.14+)."""
    box: list[int | None] = [None]

    def enter() -> None:  # in a thread of its own: the switch dies with it
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) == 0:
                with socket.socket() as s:
                    box[0] = struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        finally:
            os.close(fd)

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    return box[0]


def _cookies(ns: str) -> set[int | None]:
    return {_netns_cookie(path) for path in _netns_refs().get(ns, [])}


@pytest.mark.slow
@pytest.mark.usefixtures("holder_seeds")
@pytest.mark.parametrize("image", ["debian-bookworm", "debian-trixie"])  # the holder checks its release
def test_kill_9_then_next_run_leaves_nothing(
    tmp_path: Path, holders: list[subprocess.Popen[bytes]], image: str
) -> None:
    proc, info = _start_holder(tmp_path, "killed", holders, image)
    names = json.loads(info.read_text())
    records = {r.name: r for r in RunRecord.load_all() if r.name in names}
    assert set(records) == set(names)
    qemu_pids = [r.qemu_pid for r in records.values() if r.qemu_pid is not None]
    assert len(qemu_pids) == len(records), "every bottle's record names its QEMU"
    netns = {r.netns for r in records.values() if r.netns}
    assert len(netns) == 1
    (ns,) = netns
    cookie = _cookies(ns) - {None}
    assert len(cookie) == 1, "the LAN's namespace is not reachable while its run lives"

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # QEMU goes by itself (parent-death signal), before any sweep.
    wait_until(lambda: not any(psutil.pid_exists(p) for p in qemu_pids), 10, "QEMU dies with its killed owner")

    _trivial_run(tmp_path)  # its startup sweep cleans up after the killed run
    assert not {r.name for r in RunRecord.load_all()} & set(names)
    assert not any(Path(r.run_dir).exists() for r in records.values()), "run dirs (overlays) left"
    leased = json.dumps(pools.snapshot())
    assert not any(n in leased for n in names), "leases left"
    # The inode number may already name a new namespace: the cookie tells them apart.
    assert not cookie & _cookies(ns), "the LAN's network namespace is still referenced"


@pytest.mark.slow
@pytest.mark.usefixtures("holder_seeds")
def test_sweep_leaves_a_live_run_alone(tmp_path: Path, holders: list[subprocess.Popen[bytes]]) -> None:
    proc, info = _start_holder(tmp_path, "live", holders)
    names = json.loads(info.read_text())
    records = {r.name: r for r in RunRecord.load_all() if r.name in names}
    _trivial_run(tmp_path)  # another run starts and sweeps
    r = subprocess.run(
        [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={CACHE}", "sweep"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # Everything of the live run is still there (the sweep's output names no VMs).
    assert set(names) <= {r.name for r in RunRecord.load_all()}
    assert all(Path(rec.run_dir).is_dir() and psutil.pid_exists(rec.qemu_pid or 0) for rec in records.values())
    leased = json.dumps(pools.snapshot())
    assert all(n in leased for n in names), "a live run's leases were reclaimed"
    Path(str(info) + ".go").touch()
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out
    assert "1 passed" in out


def test_sweep_removes_the_progress_files_of_dead_runs_only(tmp_path: Path) -> None:
    _isolated("_progress_files", tmp_path / "state")


def _progress_files() -> None:
    # An xdist controller killed with -9 leaves its workers' progress file; only
    # the next xdist run removed it.
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    progress = state_dir() / "progress"
    progress.mkdir(mode=0o700, exist_ok=True)
    dead, live = progress / f"{done.stdout.strip()}-0badcafe.jsonl", progress / f"{os.getpid()}-0badcafe.jsonl"
    for f in (dead, live):
        f.write_text('{"event": "x"}\n')
    report = sweep()
    assert not dead.exists() and live.exists()
    assert report.paths == [str(dead)]


def test_a_process_killed_while_it_makes_an_ssh_key_leaves_it_to_the_sweep(tmp_path: Path) -> None:
    _isolated("_killed_keygen", tmp_path / "state")


KEYGEN = "import sys; from pathlib import Path; from pytest_bottle.ssh import new_host_key; new_host_key('x', Path(sys.argv[1]))"


def _killed_keygen() -> None:
    # ssh-keygen writes a bottle's host key to files; a run killed meanwhile
    # left them, private key and all, in a "bottle-key-*" directory in /tmp.
    base = state_dir().parent
    cache, tmp, bindir, mark = base / "cache", base / "tmp", base / "bin", base / "written"
    for d in (tmp, bindir):
        d.mkdir()
    real = which("ssh-keygen")
    assert real is not None
    wrapper = bindir / "ssh-keygen"  # the real one, then a pause: the moment the kill comes
    wrapper.write_text(f'#!/bin/sh\n{real} "$@" || exit\n: > "{mark}"\nexec sleep 300\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", TMPDIR=str(tmp))
    proc = subprocess.Popen([sys.executable, "-c", KEYGEN, str(cache / "run")], env=env, start_new_session=True)
    try:
        wait_until(mark.exists, 60, "ssh-keygen wrote the key pair")
    finally:
        kill_group(proc)
    (left,) = (cache / "run").glob("keygen-*/key")
    assert "PRIVATE KEY" in left.read_text()
    assert not list(tmp.iterdir()), "nothing of it in TMPDIR"
    report = sweep([cache])
    assert not list((cache / "run").iterdir()), "the sweep removes the dead process's key"
    assert report.paths == [str(left.parent)]


DIES = """
import os, signal
from pathlib import Path

def test_dies(bottle, tmp_path_factory):
    snap = bottle.snapshot()  # a snapshot of its session too: swept with the rest
    Path(os.environ["INFO"]).write_text(f"{os.getpid()} {bottle.name} {snap.name}")
    os.kill(os.getpid(), signal.SIGKILL)

def test_other():
    pass
"""


def test_a_worker_killed_with_its_bottle_is_swept_by_the_controller(tmp_path: Path, warm_cache: Path) -> None:
    """kill -9, the OOM killer or pytest-timeout's thread method end a worker:
    its QEMU dies with it, and the controller sweeps the rest before the run
    ends, not the next run."""
    (tmp_path / "test_dies.py").write_text(DIES)
    info, state = tmp_path / "info", tmp_path / "state"
    # A state directory of its own: any other run on this host (this suite's
    # other worker) sweeps dead owners' records too, and one that got there
    # first would leave the controller nothing to sweep and nothing to say.
    r = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "test_dies.py", f"--bottle-cache-dir={CACHE}", "-n", "2"),
            *("--max-worker-restart=0", "-p", "no:cacheprovider"),
        ],
        cwd=tmp_path,
        env=dict(os.environ, INFO=str(info), BOTTLE_STATE_DIR=str(state)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    _, name, snap = info.read_text().split()
    swept = re.search(r"went down; the sweep after it swept (\d+) VM record", r.stdout)
    assert r.returncode == 1 and swept and int(swept[1]) >= 1, r.stdout + r.stderr
    assert not list((state / "vms").iterdir()), "no VM record left, the dead worker's or any other"
    leases = json.loads((state / "leases.json").read_text())
    assert leases["cursor"]["mac"], "the run leased here (every bottle's NIC has a MAC of the pool)"
    assert not {pool: held for pool, held in leases.items() if pool != "cursor" and held}, "and none is left"
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if name in " ".join(p.info["cmdline"] or ())]
    assert not (Path(CACHE) / "snapshots" / snap).exists()


KILLED_WRITER = """
import os, sys, time
from pathlib import Path
os.replace = lambda *a: time.sleep(600)  # held between the write and the rename
from pytest_bottle.host.paths import write_json
write_json(Path(sys.argv[1]) / "leases.json", {"x": 1})
"""


@pytest.mark.usefixtures("no_spare_starting")  # a spare's lease would write its own temporary here
def test_a_temporary_of_a_state_file_whose_writer_was_killed_is_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(state))
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(state)])
    try:
        wait_until(lambda: list(state.glob(f".leases.json.{writer.pid}.*.tmp")), 30, "the writer's temporary")
    finally:
        writer.kill()
        writer.wait()
    (left,) = state.glob(f".leases.json.{writer.pid}.*.tmp")
    assert sweep().paths == []  # just written: its pid may be another host's (a shared directory)
    live = state / f".leases.json.{os.getpid()}.abcdefgh.tmp"  # a writer still at work: not touched
    odd = state / ".x.99999999999999999999.y.tmp"  # not a pid: never one of ours, and no crash
    for path in (live, odd):
        path.write_text("{}")
    long_ago = time.time() - 3600
    for path in (left, live, odd):
        os.utime(path, (long_ago, long_ago))
    report = sweep()
    assert sorted(p.name for p in state.glob(".*.tmp")) == sorted([live.name, odd.name])
    assert report.paths == [str(left)], report.paths
