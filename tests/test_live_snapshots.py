"""Snapshots of a live bottle and their forks (real VMs).

One module snapshot is shared: it holds a file, a running process and a
service-like loop, so every fork checks that state came along.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import TESTS_DIR, check_release, processes_mentioning, wait_until

import pytest_bottle
from pytest_bottle import BootTimeout, Bottle, BottleError, Snapshot, SnapshotError, SnapshotGone, SpecError
from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.host.runstate import RunRecord
from pytest_bottle.host.sweep import sweep

TICKER = "while true; do date +%s%N >> /root/ticks; sleep 0.2; done"


@pytest.fixture(scope="module")
def prepared(module_bottle: Bottle) -> Snapshot:
    module_bottle.write_text("/root/state", "prepared\n")
    module_bottle.check_output(f"nohup sh -c '{TICKER}' >/dev/null 2>&1 & echo $! > /root/ticker.pid")
    module_bottle.wait_until_succeeds("test -s /root/ticks", timeout=30)
    return module_bottle.snapshot()


def identity(b: Bottle) -> dict[str, str]:
    out = b.check_output(
        "hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address; "
        "cat /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    ).split("\n")
    return dict(zip(["hostname", "machine_id", "mac", "host_key", "random"], out, strict=False))


def test_files_and_processes_survive_into_a_fork(prepared: Snapshot, bottle_factory: Callable[..., Bottle]) -> None:
    # Old enough that a fork keeping the snapshot's clock would be seconds off.
    time.sleep(max(0.0, 15 - (time.time() - prepared.created)))
    fork = bottle_factory(snapshot=prepared)
    assert fork.read_text("/root/state") == "prepared\n"
    pid = fork.read_text("/root/ticker.pid").strip()
    assert fork.exec(["kill", "-0", pid]).ok, "the process running at the snapshot runs in the fork"
    before = len(fork.read_text("/root/ticks").split())
    fork.wait_until_succeeds(f"test $(wc -l < /root/ticks) -gt {before + 2}", timeout=30)
    # The clock is the host's now, not the snapshot's.
    assert abs(float(fork.check_output("date +%s.%N")) - time.time()) < 2


def test_forks_are_independent_of_each_other_and_of_the_source(
    prepared: Snapshot, module_bottle: Bottle, bottle_factory: Callable[..., Bottle]
) -> None:
    a, b = bottle_factory(snapshot=prepared), bottle_factory(snapshot=prepared)
    a.write_text("/root/state", "a\n")
    module_bottle.write_text("/root/source-only", "x")
    assert b.read_text("/root/state") == "prepared\n"
    assert a.exec("test -e /root/source-only").returncode == 1
    assert module_bottle.read_text("/root/state") == "prepared\n"
    b.check_output("rm /root/state")
    assert a.read_text("/root/state") == "a\n"
    # What the source wrote (and flushed) after the snapshot is on no fork's disk.
    module_bottle.check_output("sync")
    later = bottle_factory(snapshot=prepared)
    later.check_output("sync && echo 3 > /proc/sys/vm/drop_caches")
    assert later.exec("test -e /root/source-only").returncode == 1


def test_concurrent_forks_of_one_snapshot(prepared: Snapshot) -> None:
    def fork_and_read(_: int) -> str:
        with prepared.start() as b:
            return b.read_text("/root/state") + b.name

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(fork_and_read, range(3)))
    assert all(r.startswith("prepared\nbtl-") for r in results) and len(set(results)) == 3


def test_forks_have_their_own_identity(
    prepared: Snapshot, module_bottle: Bottle, bottle_factory: Callable[..., Bottle], request: pytest.FixtureRequest
) -> None:
    # On both releases (conftest's RELEASE_TESTS): trixie's forks get new identities too.
    forks = [bottle_factory(snapshot=prepared) for _ in range(2)]
    for fork in forks:
        check_release(fork, request)
        assert fork.read_text("/root/state") == "prepared\n"  # the snapshot's state came along
    ids = [identity(b) for b in [module_bottle, *forks]]
    for key in ("hostname", "machine_id", "mac", "host_key", "random"):
        values = [i[key] for i in ids]
        assert len(set(values)) == 3, f"{key} is shared: {values}"
    assert ids[1]["hostname"] == forks[0].name
    # Real OpenSSH with StrictHostKeyChecking, pinned to the fork's new key: its sshd serves that key.
    assert ids[1]["host_key"] in (forks[0].ssh_config.parent / "known_hosts").read_text()
    r = forks[0].ssh("hostname")
    assert (r.returncode, r.stdout) == (0, forks[0].name + "\n"), r.stderr
    # The source kept its own identity through the snapshot.
    assert ids[0]["hostname"] == module_bottle.name


def test_fork_takes_forward_and_timeout_only(
    prepared: Snapshot, bottle_factory: Callable[..., Bottle], session_bottle_factory: Callable[..., Bottle]
) -> None:
    with pytest.raises(SpecError, match=r"bottle_factory\(\) arguments: memory= cannot be given to a fork"):
        bottle_factory(snapshot=prepared, memory="1G")
    with pytest.raises(SpecError, match=r"session_bottle_factory\(\) arguments: network= cannot be given"):
        session_bottle_factory(snapshot=prepared, network="nat")
    assert session_bottle_factory(snapshot=prepared, timeout=120).read_text("/root/state") == "prepared\n"
    other = "debian-bookworm" if prepared.spec.image == "debian-trixie" else "debian-trixie"
    # The same error as a marker's or factory's: a SpecError and, under pytest, a UsageError.
    with pytest.raises(pytest.UsageError, match=r"launch\(\): image= cannot be given") as refused:
        pytest_bottle.launch(snapshot=prepared, image=other)
    assert isinstance(refused.value, SpecError)
    with pytest.raises(pytest.UsageError, match=r"Snapshot.start\(\): unknown argument 'cpu'"):
        prepared.start(cpu=2)
    # What the snapshot has anyway may be said again (a cache_dir= on every launch).
    same: dict[str, Any] = {
        "image": prepared.spec.image,
        "cache_dir": str(prepared.spec.cache_dir),
        "accel": prepared.spec.accel,
    }
    with pytest_bottle.launch(snapshot=prepared, **same) as fork:
        assert fork.read_text("/root/state") == "prepared\n"
        # and the accelerator it ran on, where the source asked for "auto"
        assert prepared.accel == fork.accel in ("kvm", "tcg")
        with prepared.start(accel=fork.accel) as again:
            assert again.accel == fork.accel
    with prepared.start(forward=[8080], timeout=60) as fork:
        fork.check_output("nohup python3 -m http.server 8080 >/dev/null 2>&1 &")
        fork.wait_for_port(8080)
        host, port = fork.address(8080)
        assert port > 0 and host.startswith("127.")


@pytest.mark.bottle(forward=[8081], memory="1G")
def test_a_tests_marker_gives_its_forks_forward_only_of_its_machine_keys(
    prepared: Snapshot, module_bottle: Bottle, bottle_factory: Callable[..., Bottle]
) -> None:
    fork = bottle_factory(snapshot=prepared)
    fork.address(8081)  # the marker's forward=, as for any bottle of the test (BottleError if not forwarded)
    memory = "awk '/MemTotal/ {print $2}' /proc/meminfo"
    assert fork.check_output(memory) == module_bottle.check_output(memory)  # memory: the snapshot's, not 1G
    with pytest.warns(UserWarning, match=r"forward=\[8082\] is not used: .* sets forward=\[8081\]"):
        other = bottle_factory(snapshot=prepared, forward=[8082])  # the marker wins over the call, and says so
    other.address(8081)
    with pytest.raises(BottleError, match="not forwarded"):
        other.address(8082)


# 1 ms: QEMU cannot even start in it. A fork whose state file is in the page
# cache and whose parked agent answers at once took less than 50 ms once (a clean-clone CI run).
@pytest.mark.bottle(timeout=0.001)
def test_a_tests_marker_gives_its_forks_its_timeout(prepared: Snapshot, bottle_factory: Callable[..., Bottle]) -> None:
    before = {p.pid for p in processes_mentioning(prepared.name)}  # forks of other tests (a session factory's)
    with pytest.raises(BootTimeout):
        bottle_factory(snapshot=prepared)
    with pytest.warns(UserWarning, match="timeout=120 is not used"), pytest.raises(BootTimeout):
        bottle_factory(snapshot=prepared, timeout=120)  # the marker's, before the call's
    assert {p.pid for p in processes_mentioning(prepared.name)} <= before  # the timed-out forks' QEMUs are gone


def test_snapshot_outlives_its_source_and_remove_is_named(bottle_factory: Callable[..., Bottle]) -> None:
    source = bottle_factory()
    source.write_text("/root/mark", "kept")
    snap = source.snapshot()
    assert stat.S_IMODE(snap.path.stat().st_mode) == 0o700, "its disk holds the source's SSH host key"  # was 0755
    source.close()
    with snap.start() as fork:
        assert fork.read_text("/root/mark") == "kept"
    snap.remove()
    snap.remove()  # idempotent, and the second call leaves no lock file behind
    assert snap.removed and not snap.path.exists()
    assert not [p.name for p in snap.path.parent.iterdir() if p.name.startswith(snap.name)]
    with pytest.raises(SnapshotGone, match="removed"):
        snap.start()
    with pytest.raises(SnapshotGone):
        bottle_factory(snapshot=snap)


def test_the_source_runs_on_with_the_hosts_clock(bottle: Bottle) -> None:
    def offset() -> float:
        """The guest's clock against ours: the median of 5 readings (one
        command's latency is in each, the same before and after)."""
        readings = []
        for _ in range(5):
            before = time.time()
            guest = float(bottle.check_output("date +%s.%N"))
            assert guest < time.time() + 0.05, "the guest's clock is ahead of the host's"
            readings.append(guest - before)
        return sorted(readings)[2]

    before = offset()
    with bottle.snapshot() as snap:
        # Its clock stood still for the pause (0.2-0.5 s here): left there, it reads that much later.
        after = offset()
        assert after > before - snap.pause_seconds / 2, (
            f"the source's clock moved {after - before:+.3f} s against the host's in a pause of {snap.pause_seconds} s"
        )


def test_corrupt_snapshot_is_named(prepared: Snapshot, bottle_factory: Callable[..., Bottle]) -> None:
    fork = bottle_factory(snapshot=prepared)
    fork.write_text("/root/second", "of the fork")
    with fork.snapshot() as snap:  # a snapshot of a fork: its layers collapsed into one on the seed
        with snap.start() as grandchild:
            assert grandchild.read_text("/root/state") + grandchild.read_text("/root/second") == "prepared\nof the fork"
        with open(snap.path / "memory.state", "r+b") as f:
            f.seek(4096)
            byte = f.read(1)
            f.seek(4096)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(SnapshotError, match="corrupt: memory.state does not match its checksum"):
            snap.start()
        # A manifest that does not parse said the snapshot "was removed".
        (snap.path / "manifest.json").write_bytes(b'{"files": ')
        with pytest.raises(SnapshotError, match="it is corrupt: .*manifest.json does not read as") as info:
            snap.start()
        assert not isinstance(info.value, SnapshotGone) and not snap.removed, info.value
    assert not snap.path.exists(), "leaving the with block removes it"


def test_a_snapshot_of_a_fork_has_every_layer_even_after_its_parent_is_removed(
    bottle_factory: Callable[..., Bottle],
) -> None:
    source = bottle_factory()
    source.check_output("echo from-the-source > /root/a && sync")
    parent = source.snapshot()
    fork = bottle_factory(snapshot=parent)
    fork.check_output("echo from-the-fork > /root/b && sync")
    parent.remove()  # the fork runs on: its QEMU keeps the parent's layer open
    assert fork.check_output("cat /root/a") == "from-the-source\n"
    with fork.snapshot() as child, child.start() as grandchild:
        # From the disk, not from the page cache the RAM state brought along.
        grandchild.check_output("sync && echo 3 > /proc/sys/vm/drop_caches")
        assert grandchild.check_output("cat /root/a /root/b") == "from-the-source\nfrom-the-fork\n"


def test_a_second_snapshot_of_a_bottle_has_what_it_wrote_before_the_first(
    bottle_factory: Callable[..., Bottle],
) -> None:
    source = bottle_factory()
    # 2 MB: more qcow2 clusters than the later writes copy up into the next layer.
    a = source.check_output("head -c 2M /dev/urandom > /root/a && sync && md5sum < /root/a")
    with source.snapshot():
        source.check_output("echo before-the-second > /root/b && sync")
        with source.snapshot() as second, second.start() as fork:
            fork.check_output("sync && echo 3 > /proc/sys/vm/drop_caches")  # read from the disk
            assert fork.check_output("md5sum < /root/a; cat /root/b") == a + "before-the-second\n"


def test_lan_bottle_snapshot_is_refused(bottle_factory: Callable[..., Bottle], no_spare_starting: None) -> None:
    b = bottle_factory(lan="snapnet")
    root = Path(default_cache_dir(), "snapshots")

    def mine() -> list[str]:  # named after this bottle: the other worker's snapshots come and go there
        return [p.name for p in root.iterdir() if b.name in p.name] if root.is_dir() else []

    children = {p.pid for p in psutil.Process().children(recursive=True)}  # no spare is starting
    with pytest.raises(SnapshotError, match="lan='snapnet'") as refused:
        b.snapshot()
    assert "snapshot a bottle without lan=" in str(refused.value)  # not "before joining": it joins at launch
    assert b.exec("true").ok, "the bottle runs on"
    assert mine() == [], "nothing written"
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children, "no receiver QEMU started"
    assert not list(b.console_log_path.parent.glob("disk-*.qcow2")), "no overlay put on its disk"


def test_a_closed_bottle_cannot_be_snapshotted_and_says_so(bottle_factory: Callable[..., Bottle]) -> None:
    b = bottle_factory()
    b.close()
    with pytest.raises(SnapshotError, match=f"bottle {b.name} cannot be snapshotted: it was closed$"):
        b.snapshot()


def test_a_bottle_closed_while_it_is_being_snapshotted_says_so(bottle_factory: Callable[..., Bottle]) -> None:
    """Closed by another thread once the capture began, the snapshot failed with
    whatever QEMU or qemu-img saw next (a ConnectError, a disk gone)."""
    b = bottle_factory()
    root = Path(default_cache_dir(), "snapshots")
    outcome: list[object] = []

    def snap() -> None:
        try:
            outcome.append(b.snapshot())
        except (SnapshotError, BottleError) as e:
            outcome.append(e)

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(snap)
        wait_until(lambda: bool(list(root.glob(f"{b.name}-*.lock"))) or done.done(), 60, "the capture begins")
        b.close()
        done.result(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], SnapshotError), outcome
    assert f"bottle {b.name} was closed while it was being snapshotted" in str(outcome[0]), outcome
    assert not list(root.glob(f"{b.name}-*")), "nothing of it left in the cache"


def test_a_pause_qemu_confirms_too_late_still_runs_the_source_on(
    bottle: Bottle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``stop`` the host gave up waiting for is still carried out by QEMU:
    the snapshot fails, and the source runs on (it stayed paused, and its
    next call died as "has not answered"), its clock caught up."""
    from pytest_bottle.vmm.machine import QemuMachine

    real = QemuMachine.pause

    def late(self: QemuMachine) -> None:
        real(self)
        time.sleep(3)  # paused, its clock standing still
        raise TimeoutError(f"QEMU of {bottle.name} did not answer 'stop' within 60 s")

    monkeypatch.setattr(QemuMachine, "pause", late)
    with pytest.raises(SnapshotError, match="did not answer 'stop' within 60 s"):
        bottle.snapshot()
    assert bottle.check_output("echo alive", timeout=20) == "alive\n"
    before = time.time()
    assert float(bottle.check_output("date +%s.%N")) > before - 1.5, "its clock was not caught up after the pause"
    assert not list(default_cache_dir().glob(f"snapshots/*{bottle.name}*"))  # nothing half-made kept


KILLED = """
import pytest_bottle
b = pytest_bottle.launch()
print(b.name, b.snapshot().path, flush=True)
b.snapshot()
"""


def test_kill_9_during_a_snapshot_leaves_nothing_after_a_sweep(warm_cache: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR))
    proc = subprocess.Popen([sys.executable, "-c", KILLED], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        name, first = proc.stdout.readline().split()
        root = warm_cache / "snapshots"
        # Killed while the second snapshot's receiver is up.
        wait_until(lambda: list(root.glob(f".tmp-{name}-*/receiver")), 120, "the second snapshot under way")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while (alive := processes_mentioning(name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    shown = []
    for p in alive:  # what stayed, for the report: which one, and in what state
        with contextlib.suppress(psutil.Error):
            shown.append((p.pid, p.status(), p.ppid(), p.cmdline()[-6:]))
    assert not shown, f"QEMU (source and receiver) did not die with their owner: {shown}"
    report = sweep([warm_cache])
    # Another run's startup sweep may hold an entry this one skips while it removes it: wait for it.
    deadline = time.monotonic() + 30
    while (left := [p for p in root.iterdir() if name in p.name]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"left after the sweep: {left} ({report.summary()})"
    assert not Path(first).exists()
    assert not (warm_cache / "run" / name).exists()
    assert not [p for p in psutil.process_iter(["cmdline"]) if name in " ".join(p.info["cmdline"] or ())]


FORKED = """
import multiprocessing as mp, sys
import pytest_bottle

def child(snap, q):
    with snap.start() as fork:
        q.put(fork.check_output("hostname").strip())
    b = pytest_bottle.launch()  # neither closed nor removed: the child's exit does both
    q.put((b.name, str(b.snapshot().path)))

if __name__ == "__main__":
    mp.set_start_method("fork")
    with pytest_bottle.launch() as src:  # the parent has started a bottle before the fork
        snap = src.snapshot()
    q = mp.Queue()
    p = mp.Process(target=child, args=(snap, q))
    p.start()
    p.join(300)
    if p.exitcode is None:
        p.kill()
        sys.exit("the child hung")
    print(p.exitcode, q.get(timeout=10), *q.get(timeout=10), src.name)
"""


def test_a_multiprocessing_child_forks_and_cleans_up_after_itself(tmp_path: Path) -> None:
    # The child's start waited for ever on the parent's thread pools (not in a
    # forked child), and a child that returned left its bottle and snapshot to the sweep.
    script = tmp_path / "forked.py"
    script.write_text(FORKED)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr
    exitcode, forked, name, snapshot, parent = r.stdout.split()
    assert exitcode == "0" and forked.startswith("btl-") and forked not in (name, parent), r.stdout
    assert not Path(snapshot).exists(), "the child's snapshot outlived it"
    assert not (RunRecord.records_dir() / f"{name}.json").exists(), "the child's bottle was left to the sweep"
    assert not processes_mentioning(name)


FAILING = """
def test_broken(bottle):
    bottle.write_text("/root/clue", "the clue")
    assert False, "look inside"

def test_fine(bottle):
    assert bottle.exec("true").ok
"""


def bottle_cli(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The cache is named, never derived here: pytester points HOME at its own directory.
    argv = [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={cache}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def test_save_failed_under_xdist_prints_how_to_open_it(pytester: pytest.Pytester, warm_cache: Path) -> None:
    pytester.makepyfile(test_fail=FAILING)
    result = pytester.runpytest_subprocess(
        f"--bottle-cache-dir={warm_cache}", "-p", "no:cacheprovider", "-n", "2", "--bottle-save-failed"
    )
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "bottles saved as snapshots (--bottle-save-failed)" in out
    found = re.search(r"run --snapshot (test_broken-[0-9a-f]{6}-btl-[0-9a-f]{8}) -- CMD", out)
    assert found, out
    name = found.group(1)
    assert f"shell {name}" in out and f"snapshot rm {name}" in out
    assert out.count("run --snapshot") == 1, "only the failed test's bottle is saved"
    try:
        assert (warm_cache / "snapshots" / name).is_dir(), "a saved snapshot outlives its session"
        r = bottle_cli(warm_cache, "run", "--snapshot", name, "--", "cat", "/root/clue")
        assert (r.returncode, r.stdout) == (0, "the clue"), r.stderr
        # The shell runs in a fork of its own: the saved state, a new identity; with input that is
        # not a terminal, no pty (as ssh without -t; a pty is test_processes' real-terminal test).
        argv = [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={warm_cache}", "shell", name]
        sh = subprocess.run(
            [*argv, "--", "sh", "-c", "tty; cat /root/clue; echo; exit 7"],
            input="",
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert (sh.returncode, sh.stdout) == (7, "not a tty\nthe clue\n"), (sh.stdout, sh.stderr)
        listed = bottle_cli(warm_cache, "snapshot", "list").stdout
        assert re.search(rf"^{name}\s+kept\s+debian-bookworm", listed, re.M), listed
    finally:
        assert bottle_cli(warm_cache, "snapshot", "rm", name).returncode == 0
    gone = bottle_cli(warm_cache, "run", "--snapshot", name, "--", "true")
    assert gone.returncode == 125 and f"SnapshotGone: snapshot {name}: no such snapshot" in gone.stderr


def test_a_nat_bottle_forks_with_egress(bottle_factory: Callable[..., Bottle]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        source = bottle_factory(network="nat")
        with source.snapshot() as snap, snap.start() as fork:
            assert "10.0.2.3" in fork.read_text("/etc/resolv.conf")
            # 10.0.2.2 is the host's loopback, reachable only with egress (network="nat").
            connect = f"import socket; socket.create_connection(('10.0.2.2', {port}), timeout=10).sendall(b'hi')"
            fork.check_output(["python3", "-c", connect])
            conn, _ = server.accept()
            with conn:
                assert conn.recv(2) == b"hi"


SESSION = """
import pytest

@pytest.fixture(scope="module")
def snap(module_bottle):
    s = module_bottle.snapshot()
    print("SNAPSHOT", s.path)
    return s

def test_fork(snap, bottle_factory):
    assert bottle_factory(snapshot=snap).exec("true").ok
"""


def test_a_sessions_snapshots_are_gone_after_it(pytester: pytest.Pytester, warm_cache: Path) -> None:
    pytester.makepyfile(test_session=SESSION)
    result = pytester.runpytest_subprocess(f"--bottle-cache-dir={warm_cache}", "-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=1)
    found = re.search(r"SNAPSHOT (\S+)", result.stdout.str())
    assert found, result.stdout.str()
    path = Path(found.group(1))
    assert path.parent == warm_cache / "snapshots"
    assert not path.exists() and not Path(f"{path}.lock").exists()


XDIST_FORKS = """
import os
from pathlib import Path

import pytest

@pytest.fixture(scope="module")
def snap(module_bottle):
    module_bottle.write_text("/root/state", "prepared\\n")
    s = module_bottle.snapshot()
    # Each worker records its own: the source's name (a snapshot's name starts with it) and path.
    Path(__file__).with_name(f"snapshot-{os.getpid()}").write_text(f"{module_bottle.name} {s.path}")
    return s

@pytest.mark.parametrize("i", range(6))
def test_fork(snap, module_bottle, bottle_factory, i):
    fork = bottle_factory(snapshot=snap)
    assert fork.name != module_bottle.name
    assert fork.read_text("/root/state") == "prepared\\n"
    assert fork.exec("test -e /root/mine").returncode == 1, "another test's fork wrote here"
    fork.write_text("/root/mine", str(i))
"""


def test_module_snapshot_forked_under_xdist_is_gone_after_it(pytester: pytest.Pytester, warm_cache: Path) -> None:
    pytester.makepyfile(test_xdist_forks=XDIST_FORKS)
    result = pytester.runpytest_subprocess(f"--bottle-cache-dir={warm_cache}", "-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=6)
    taken = [p.read_text().split() for p in pytester.path.glob("snapshot-*")]
    assert 1 <= len(taken) <= 2, taken  # one per worker that ran a test
    root = warm_cache / "snapshots"
    for source, path in taken:
        assert Path(path).parent == root and Path(path).name.startswith(source + "-")
        assert not [p.name for p in root.iterdir() if p.name.startswith((source, f".tmp-{source}"))]


def test_a_spawned_process_runs_on_detached_in_a_fork_and_attached_in_the_source(
    bottle_factory: Callable[..., Bottle],
) -> None:
    """A fork's new host detaches the source's spawned processes: they run on,
    their output (far more than a pipe and the window) read and dropped."""
    src = bottle_factory()
    # /root/n is replaced by a rename, never rewritten in place: a read between
    # the shell's truncate and its write would see an empty file.
    loop = (
        "n=0; while :; do n=$((n+1)); echo $n > /root/n.new; mv /root/n.new /root/n;"
        " head -c 131072 /dev/zero; echo tick $n; sleep 0.2; done"
    )
    p = src.spawn(["sh", "-c", loop])
    p.wait_for_output("tick 2\n", 60)
    fork = bottle_factory(snapshot=src.snapshot())
    assert fork.exec(["kill", "-0", str(p.pid)]).ok, "the spawned process runs in the fork"
    before = int(fork.read_text("/root/n"))
    # More output than a pipe and the host's window (4 MiB): the agent drains it.
    fork.wait_until_succeeds(f"test $(cat /root/n) -gt {before + 40}", timeout=90)
    fork.check_output(f"kill {p.pid}")  # no handle in the fork: plain kill ends it
    fork.wait_until_succeeds(f"! kill -0 {p.pid} 2>/dev/null", timeout=30)
    # In the source it is still the test's, output and all.
    now = int(src.read_text("/root/n"))
    p.wait_for_output(f"tick {now + 2}\n", 60)
    assert p.kill().wait(30).returncode == -9
