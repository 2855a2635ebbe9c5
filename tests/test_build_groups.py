"""host/groups.py: a process group (an image build's mmdebstrap, apt, dpkg and
the packages' scripts) dies with its owner however the owner dies, with real
processes and a real kill -9; no VM, no root."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from harness import group_members, kill_group, wait_until

OWNER = """
import os, subprocess, sys, time
import psutil
from pytest_bottle.host.groups import killed_with_owner

# A leader and a grandchild, as mmdebstrap and dpkg.
group = subprocess.Popen(["sh", "-c", "sleep 300 & wait"], process_group=0)
with killed_with_owner(group.pid):
    if sys.argv[1] == "fork":  # a child forked without exec holds a copy of the pipe's write end
        if os.fork() == 0:
            time.sleep(300)
            os._exit(0)
    print(group.pid, flush=True)
    if sys.argv[1] != "done":
        time.sleep(300)
time.sleep(0.5)  # the watcher would have killed it by now
mine = [p.name() for p in psutil.Process().children()]
print("alive" if group.poll() is None else "killed", mine, flush=True)
os.killpg(group.pid, 9)
group.wait()
"""


def _owner(how: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", OWNER, how], stdout=subprocess.PIPE, text=True, start_new_session=True
    )


def _armed(owner: int) -> bool:
    """Whether the owner's watcher is up and holds its pidfd (else a kill would
    only test the watcher's "the owner is gone before I looked")."""
    for child in psutil.Process(owner).children():
        with contextlib.suppress(OSError, psutil.Error):
            if "-I" in child.cmdline() and any(
                os.readlink(f"/proc/{child.pid}/fd/{fd}") == "anon_inode:[pidfd]"
                for fd in os.listdir(f"/proc/{child.pid}/fd")
            ):
                return True
    return False


@pytest.mark.parametrize("how", ["kill", "fork"])
def test_the_group_dies_with_its_owner_killed_alone(how: str) -> None:
    owner = _owner(how)
    assert owner.stdout is not None
    pgid = int(owner.stdout.readline())
    try:
        wait_until(lambda: len(group_members(pgid)) == 2, 10, "the leader and its child")
        wait_until(lambda: _armed(owner.pid), 10, "the watcher armed")
        os.kill(owner.pid, signal.SIGKILL)  # the owner only: its own group does not include this one
        killed = time.monotonic()
        wait_until(lambda: not group_members(pgid), 5, "the group gone after the owner's kill -9")
        assert time.monotonic() - killed < 5
    finally:
        kill_group(owner)
        for group in (owner.pid, pgid):  # the owner's forked child; the group, if it survived
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)


def test_an_owner_that_is_done_releases_the_watcher_without_a_kill() -> None:
    owner = _owner("done")
    out, _ = owner.communicate(timeout=30)
    lines = out.splitlines()
    assert len(lines) == 2 and lines[1] == "alive ['sh']", out  # the watcher exited; the group was left alone
    assert owner.returncode == 0
