"""Whose is this pid?  Process identity across odd names, forks, pid namespaces
and machines, and the errors and locks around it (review of issue 11).

Real processes throughout: a process renamed with PR_SET_NAME, a real fork, a
real pid namespace (``unshare``), real locks held by other processes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from filelock import FileLock
from harness import close_pipes

import pytest_bottle
from pytest_bottle.host.paths import state_dir
from pytest_bottle.host.runstate import MARKER, RunRecord, create_run_dir
from pytest_bottle.host.sweep import SweepReport, stop_vm, sweep
from pytest_bottle.net import pools
from pytest_bottle.vmm import process

# BOTTLE_STATE_DIR is set for the whole process here: no spare may be starting.
pytestmark = pytest.mark.usefixtures("no_spare_starting")

OTHER_BOOT = "11111111-1111-1111-1111-111111111111"


@pytest.fixture
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    return state_dir()


def _wait_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"child exited early ({proc.wait()})"
    return line


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    close_pipes(proc)


# --- an owner whose name is not UTF-8 -----------------------------------------------------------------------------

# PR_SET_NAME (15) with a name cut in the middle of a two-byte character, and a ')'.
RENAMED_OWNER = textwrap.dedent("""
    import ctypes, sys, time
    from pathlib import Path
    from pytest_bottle.host.runstate import RunRecord, create_run_dir
    ctypes.CDLL(None).prctl(15, b"py) t\\xc3", 0, 0, 0)
    run_dir = create_run_dir(Path(sys.argv[1]))
    RunRecord.create("btl-renamed", run_dir)
    print("made", flush=True)
    time.sleep(300)
""")


def test_owner_with_a_name_that_is_not_utf8_is_alive(private_state: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_dir = cache / "run" / "btl-renamed"
    owner = subprocess.Popen([sys.executable, "-c", RENAMED_OWNER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert _wait_line(owner) == "made\n"
        with open(f"/proc/{owner.pid}/comm", "rb") as f:
            assert f.read() == b"py) t\xc3\n"  # the kernel kept the broken name
        ident = process.start_time(owner.pid)
        assert ident is not None and process.is_same_process(owner.pid, ident)
        report = sweep([cache])
        assert [r.name for r in RunRecord.load_all()] == ["btl-renamed"], report
        assert run_dir.is_dir() and "btl-renamed" not in report.vms, report
    finally:
        _stop(owner)
    assert not process.is_alive(owner.pid, ident)


# --- a forked owner -----------------------------------------------------------------------------------------------

FORKED_OWNER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from pytest_bottle.host.runstate import RunRecord, create_run_dir, owner_identity
    owner_identity()  # the parent knows itself before it forks
    if os.fork() == 0:
        run_dir = create_run_dir(Path(sys.argv[1]))
        RunRecord.create("btl-forked", run_dir)
        print(os.getpid(), flush=True)
        time.sleep(300)
        os._exit(0)
    os._exit(0)
""")


def test_records_of_a_forked_child_name_the_child(private_state: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_dir = cache / "run" / "btl-forked"
    parent = subprocess.Popen([sys.executable, "-c", FORKED_OWNER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    child = int(_wait_line(parent))
    try:
        parent.wait(30)
        (record,) = RunRecord.load_all()
        assert (record.owner_pid, record.owner_start) == (child, process.start_time(child))
        marker = json.loads((run_dir / MARKER).read_text())
        assert (marker["pid"], marker["start"]) == (child, record.owner_start)
        report = sweep([cache])
        assert run_dir.is_dir() and [r.name for r in RunRecord.load_all()] == ["btl-forked"], report
    finally:
        os.kill(child, signal.SIGKILL)


# --- another pid namespace sharing the state dir ------------------------------------------------------------------

IN_NAMESPACE = textwrap.dedent("""
    import os, subprocess, sys, time
    from pathlib import Path
    from pytest_bottle.net import pools
    from pytest_bottle.host.runstate import RunRecord, create_run_dir
    from pytest_bottle.vmm.process import start_time
    run_dir = create_run_dir(Path(sys.argv[1]))
    record = RunRecord.create("btl-in-ns", run_dir)
    qemu = subprocess.Popen(["sleep", "300"])  # the VM's QEMU, as far as the record says
    record.qemu_pid, record.qemu_start = qemu.pid, start_time(qemu.pid)
    record.save()
    pools.lease("mac", "btl-in-ns")
    print(os.getpid(), qemu.pid, flush=True)
    time.sleep(300)
""")


def _unshare_pid() -> list[str]:
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare")
    r = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here: {r.stderr.decode().strip()}")
    return [unshare, "--pid", "--fork", "--mount-proc", "--kill-child"]


def test_run_of_another_pid_namespace_is_left_whole(private_state: Path, tmp_path: Path) -> None:
    """A state dir and cache shared with a container: its pids mean other
    processes here, so neither its record, run dir nor leases may go."""
    argv = _unshare_pid()
    cache = tmp_path / "cache"
    run_dir = cache / "run" / "btl-in-ns"
    ns = subprocess.Popen([*argv, sys.executable, "-c", IN_NAMESPACE, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        owner_in_ns, qemu_in_ns = map(int, _wait_line(ns).split())
        assert owner_in_ns == 1  # what the record says means init here
        (inner,) = psutil.Process(ns.pid).children()
        qemu = inner.children()[0]
        report = sweep([cache])
        assert [r.name for r in RunRecord.load_all()] == ["btl-in-ns"], report
        assert run_dir.is_dir() and (run_dir / MARKER).is_file(), report
        assert any(o["holder"] == "btl-in-ns" for o in pools.snapshot()["mac"].values()), report
        assert qemu.is_running() and qemu.status() != psutil.STATUS_ZOMBIE
        # Even asked to stop it (a kept VM, `bottle sweep --kept`), nothing is removed.
        (record,) = RunRecord.load_all()
        assert record.qemu_pid == qemu_in_ns and qemu.pid != qemu_in_ns
        stopped = SweepReport()
        assert not stop_vm(record, stopped)
        assert any("btl-in-ns" in s and "another pid namespace" in s for s in stopped.skipped), stopped
        assert run_dir.is_dir() and record.path.is_file() and qemu.is_running()
        assert any(o["holder"] == "btl-in-ns" for o in pools.snapshot()["mac"].values())
    finally:
        _stop(ns)


# --- another machine sharing the cache (an NFS home) --------------------------------------------------------------


def test_run_dirs_and_records_of_another_machine_are_left(private_state: Path, tmp_path: Path) -> None:
    run = tmp_path / "cache" / "run"
    sleeper = subprocess.Popen(["sleep", "300"])  # a pid that is in use here, as pids of the other host may be
    try:
        for name, change in (
            ("btl-other-host", {"machine": "0" * 32, "boot_id": OTHER_BOOT}),
            ("btl-other-host-dead-pid", {"machine": "0" * 32, "boot_id": OTHER_BOOT, "pid": 999999}),
            ("btl-unsaid-machine", {"machine": None, "boot_id": OTHER_BOOT}),
            ("btl-earlier-boot", {"boot_id": OTHER_BOOT}),  # this machine, before a reboot
        ):
            d = create_run_dir(run / name)
            marker = json.loads((d / MARKER).read_text())
            (d / MARKER).write_text(json.dumps({k: v for k, v in {**marker, **change}.items() if v is not None}))
        their_run = tmp_path / "their-run"  # a state dir shared with the other host too
        their_run.mkdir()
        theirs = RunRecord("btl-their-vm", sleeper.pid, f"5@{OTHER_BOOT}", str(their_run))
        theirs.machine, theirs.qemu_pid, theirs.qemu_start = "0" * 32, sleeper.pid, f"6@{OTHER_BOOT}"
        theirs.save()
        report = sweep([tmp_path / "cache"])
        left = {d.name for d in run.iterdir()}
        assert left == {"btl-other-host", "btl-other-host-dead-pid", "btl-unsaid-machine"}, report
        assert [r.name for r in RunRecord.load_all()] == ["btl-their-vm"] and their_run.is_dir(), report
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


# --- a start that fails while the lease lock is held --------------------------------------------------------------

FAILING_START = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    import pytest_bottle
    from pytest_bottle.lifecycle import handshake
    from pytest_bottle.net import pools
    pools.LOCK_TIMEOUT = 1.0
    real = handshake.clone_setup
    def gated(*args, **kwargs):  # QEMU runs; the test kills it before the handshake can finish
        print("spawned", flush=True)
        sys.stdin.readline()
        return real(*args, **kwargs)
    handshake.clone_setup = gated
    try:
        with pytest_bottle.launch(cache_dir=sys.argv[1]):
            print("booted", flush=True)
    except Exception as e:
        print("raised", type(e).__name__, flush=True)
""")


def test_a_held_lease_lock_does_not_hide_why_a_start_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU is killed during the boot while another process holds the lease
    lock: the start fails with its boot error, and the leases it could not
    release are logged (not raised over it)."""
    from pytest_bottle.host.paths import default_cache_dir

    cache = default_cache_dir()
    with pytest_bottle.launch(cache_dir=cache):
        pass  # image and seed are built before the timed part
    state = tmp_path / "state"
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(state))
    env = dict(os.environ, BOTTLE_STATE_DIR=str(state))
    starter = subprocess.Popen(
        [sys.executable, "-c", FAILING_START, str(cache)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert starter.stdout is not None
        assert starter.stdout.readline() == "spawned\n", "the start never spawned QEMU"  # it waits for us now
        (record,) = (state / "vms").glob("*.json")
        qemu = json.loads(record.read_text())["qemu_pid"]
        with FileLock(str(state / "leases.lock")):
            os.kill(qemu, signal.SIGKILL)
            out, err = starter.communicate("\n", timeout=120)
    finally:
        if starter.poll() is None:
            _stop(starter)
    # A QEMU killed mid-start breaks the agent channel (AgentError) or the boot (BootError).
    assert out.split() in (["raised", "AgentError"], ["raised", "BootError"]), out + err
    assert "could not release the leases of btl-" in err and "not acquired within 1 s" in err, err


# --- start-up errors are usage errors -----------------------------------------------------------------------------


def test_unsafe_state_dir_at_startup_is_a_usage_error(tmp_path: Path) -> None:
    wide = tmp_path / "state"
    wide.mkdir()
    wide.chmod(0o777)
    (tmp_path / "test_trivial.py").write_text("def test_nothing():\n    pass\n")
    env = dict(os.environ, BOTTLE_STATE_DIR=str(wide))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "test_trivial.py", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = r.stdout + r.stderr
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert "INTERNALERROR" not in out and "Traceback" not in out, out
    assert f"ERROR: refusing to use {wide}: its mode 0777 lets other users in" in r.stderr, out


def test_startup_usage_errors_keep_their_type() -> None:
    from pytest_bottle.plugin import BottleLockTimeout, UnsafeBottleDirectory

    e = UnsafeBottleDirectory(path="/x", reason="it is a symlink")
    assert isinstance(e, pytest_bottle.UnsafeDirectory) and isinstance(e, pytest.UsageError)
    e = UnsafeBottleDirectory(path="/x", reason="it cannot be made (No such file or directory)", source="ini file")
    back = pickle.loads(pickle.dumps(e))  # it crosses xdist workers as it reads: once named
    assert str(back) == str(e) == "ini file: refusing to use /x: it cannot be made (No such file or directory)"
    assert vars(back) == vars(e)
    assert isinstance(BottleLockTimeout("/l", 1.0), pytest_bottle.LockTimeout)
    assert {"UnsafeDirectory", "LockTimeout"} <= set(pytest_bottle.__all__)


# --- build locks say who holds them -------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_a_long_wait_for_a_build_lock_names_the_holder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pytest_bottle.host.locks import reporting_lock

    lock = tmp_path / "image-x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert _wait_line(holder) == "held\n"  # 3 s left: the wait below is 1 s or more on a loaded host too
        caplog.set_level(logging.WARNING, logger="pytest_bottle.host.locks")
        t = time.monotonic()
        with reporting_lock(lock, "the build of image x", every=0.3):
            waited = time.monotonic() - t
    finally:
        _stop(holder)
    assert waited >= 1.0  # not bounded: a build may take minutes
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) >= 2, notes
    assert all(f"the build of image x ({lock}), held by pid {holder.pid} (uid {os.getuid()}: " in n for n in notes)


def test_a_lock_let_go_just_before_a_note_is_taken_not_blamed_on_an_unseen_holder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_bottle.host import locks

    lock = tmp_path / "image-x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "60"], stdout=subprocess.PIPE, text=True)
    real, looks = locks.lock_holder, []

    def holder_gone_by_the_note(path: Path) -> str:  # it exits between our wait's timeout and the note
        looks.append(path)
        _stop(holder)
        return real(path)

    try:
        assert _wait_line(holder) == "held\n"
        monkeypatch.setattr(locks, "lock_holder", holder_gone_by_the_note)
        caplog.set_level(logging.WARNING, logger="pytest_bottle.host.locks")
        with locks.reporting_lock(lock, "the build of image x", every=0.3, show_after=600):
            assert not _lock_free_elsewhere(lock)  # ours now
    finally:
        _stop(holder)
    assert looks == [lock]
    assert not [r.getMessage() for r in caplog.records]  # not "held by a process not visible here"


def _lock_free_elsewhere(lock: Path) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", LOCK_PROBE, str(lock)],
        capture_output=True,
        timeout=30,
    )
    assert probe.returncode in (0, 3), probe.stderr  # free, or held: nothing else proves either
    return probe.returncode == 0


LOCK_PROBE = textwrap.dedent("""
    import sys, filelock
    try:
        filelock.FileLock(sys.argv[1]).acquire(timeout=0)
    except filelock.Timeout:
        sys.exit(3)
""")


def test_a_holders_command_line_is_shown_not_obeyed(tmp_path: Path) -> None:
    """Another user's process names itself: its escapes must not reach our terminal."""
    from pytest_bottle.host.locks import lock_holder

    lock = tmp_path / "image-x.lock"
    argv = [sys.executable, "-c", "#\x1b]0;pwned\x07\x1b[2J" + HOLD, str(lock), "60"]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert _wait_line(holder) == "held\n"
        shown = lock_holder(lock)
    finally:
        _stop(holder)
    assert f"pid {holder.pid} " in shown and "\\x1b]0;pwned\\x07\\x1b[2J" in shown and "\x1b" not in shown, shown
