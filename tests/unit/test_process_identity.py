"""Process identity from /proc/PID/stat (kernel start ticks + boot id), and the new errors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_bottle.errors import BottleError, LockTimeout, UnsafeDirectory
from pytest_bottle.vmm import process


@pytest.mark.parametrize(
    ("comm", "state"),
    [(b"python3", "S"), (b"a b) c (d", "R"), (b")", "Z"), (b"", "S"), (b"py) t\xc3", "S"), (b"\xff\xfe) (", "D")],
)
def test_parse_stat_counts_fields_after_the_last_paren(comm: bytes, state: str) -> None:
    # Fields 3..52 of a real line, with start time (field 22) set to 987654321.
    fields = [state] + [str(n) for n in range(4, 53)]
    fields[22 - 3] = "987654321"
    line = b"4242 (" + comm + b") " + " ".join(fields).encode() + b"\n"
    assert process.parse_stat(line) == (state, 987654321)


def test_identity_is_kernel_ticks_and_boot_id() -> None:
    with open("/proc/self/stat", "rb") as f:
        raw = f.read().decode()
    ticks = raw.rsplit(")", 1)[1].split()[19]
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    assert process.start_time(os.getpid()) == f"{ticks}@{boot}"


def test_legacy_and_foreign_identities() -> None:
    me = os.getpid()
    ident = process.start_time(me)
    assert ident is not None and process.is_same_process(me, ident) and process.is_alive(me, ident)
    ticks, _, _ = ident.partition("@")
    # Another boot: gone, whatever holds that pid now.
    assert not process.is_alive(me, f"{ticks}@00000000-0000-0000-0000-000000000000")
    # A wall-clock float (older records) proves nothing: alive while the pid exists, never "same".
    assert process.is_alive(me, 1.0) and not process.is_same_process(me, 1.0)
    assert process.is_alive(me, None) and not process.is_same_process(me, None)


@pytest.mark.parametrize(
    "err",
    [UnsafeDirectory("/tmp/x", "it belongs to uid 7", "remove it"), LockTimeout("/run/x.lock", 60.0, "pid 1 (init)")],
    ids=lambda e: type(e).__name__,
)
def test_new_errors_pickle(err: BottleError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)
    assert isinstance(LockTimeout("l", 1.0), TimeoutError)


@pytest.mark.skipif(process._setpriv() is None, reason="no setpriv with --pdeathsig here")
def test_a_leashed_command_does_not_run_once_its_parent_is_gone(tmp_path: Path) -> None:
    # setpriv sets the death signal, then the check runs: a parent already gone
    # (here: any pid but ours) sent no signal, so the command must not start.
    setpriv = process._setpriv()
    assert setpriv is not None
    ran = tmp_path / "ran"
    r = subprocess.run(process.leashed(setpriv, ["touch", str(ran)], parent=os.getpid() + 1_000_000), timeout=30)
    assert r.returncode == 1 and not ran.exists()
    r = subprocess.run(process.leashed(setpriv, ["sh", "-c", 'touch "$1"; exit 7', "sh", str(ran)]), timeout=30)
    assert r.returncode == 7 and ran.exists()  # our child: it runs, its argv and exit code as given
    # Through the check's exec the death signal stays: a parent killed takes the command along.
    code = "import subprocess as s; from pytest_bottle.vmm import process as p; "
    code += "c = s.Popen(p.leashed(p._setpriv(), ['sleep', '60'])); print(c.pid, flush=True); c.wait()"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_the_fallback_leash_runs_nothing_for_a_parent_that_is_not_its_own(tmp_path: Path) -> None:
    # Without setpriv, preexec_fn sets the signal and then compares pids: an
    # orphan may be re-parented to a subreaper, not init, so "ppid == 1" is not enough.
    ran = tmp_path / "ran"
    gone = os.getpid() + 1_000_000
    r = subprocess.run(["touch", str(ran)], preexec_fn=lambda: process.die_with(gone, 9), timeout=30)
    assert r.returncode == 1 and not ran.exists()
    me = os.getpid()
    r = subprocess.run(["touch", str(ran)], preexec_fn=lambda: process.die_with(me, 9), timeout=30)
    assert r.returncode == 0 and ran.exists()


def test_parent_pid_reads_the_stat_line_and_says_none_for_no_process() -> None:
    import subprocess
    import sys

    assert process.parent_pid(os.getpid()) == os.getppid()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert process.parent_pid(int(done.stdout)) is None  # reaped: no such process


_THP_PROBE = """
import ctypes, subprocess, sys
from pytest_bottle.vmm import process
# Set or cleared first: a start in another thread of the parent could have
# handed this process the flag.
ctypes.CDLL(None).prctl(process.PR_SET_THP_DISABLE, int(sys.argv[1] == "set"), 0, 0, 0)
grep = ["grep", "-h", "THP_enabled", "/proc/self/status"]
with process.no_huge_pages():
    inside = subprocess.run(grep, capture_output=True, text=True, check=True).stdout.split()[1]
after = subprocess.run(grep, capture_output=True, text=True, check=True).stdout.split()[1]
print(inside, after)
"""


@pytest.mark.parametrize(("before", "after"), [("unset", "1"), ("set", "0")])
def test_no_huge_pages_reaches_the_child_and_puts_back_what_was(before: str, after: str) -> None:
    # In a process of its own: the flag belongs to the whole process.
    out = subprocess.run([sys.executable, "-c", _THP_PROBE, before], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", after]
