"""The core's spare (guest/core/spare.c): the process a clone's first plain
exec runs in, made before the snapshot.  On this host, no VM, as in
test_agent_core.py: the first exec of each core is the spare's, the second
posix_spawn's, and the two must not differ."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import test_agent_core
from test_agent_core import SPAWN_FAILURES, Core, dead, reply, spawn_failure

from pytest_bottle.guest import frames
from pytest_bottle.guest.frames import CALL

# test_agent_core's fixtures: pytest finds them by these names
core_bin, start, core = test_agent_core.core_bin, test_agent_core.start, test_agent_core.core


def _spare_of(c: Core) -> list[int]:
    """The core's children once it has any (it makes its spare before it reads GO)."""
    deadline = time.monotonic() + 10
    while not (kids := c.children()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return kids


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def test_the_first_exec_runs_in_the_spare_made_before_go(start: Callable[..., Core]) -> None:
    c = start()
    spare = _spare_of(c)
    assert len(spare) == 1, spare
    c.go()
    c.sync()  # the core read GO after the spare said it was ready
    assert _stat(spare[0])[3] == str(spare[0])  # already the leader of a session of its own
    out, _, got, _ = c.run(1, {"argv": ["sh", "-c", "echo $$; cut -d' ' -f6 /proc/$$/stat; ls -l /proc/$$/fd"]})
    lines = out.decode().splitlines()
    assert got["rc"] == 0 and lines[:2] == [str(spare[0])] * 2, out
    fds = sorted(line.split()[-3] for line in lines[2:] if "->" in line)
    assert fds == ["0", "1", "2"], out  # nothing of the core's
    out, _, _, _ = c.run(2, {"argv": ["sh", "-c", "echo $$"]})
    assert int(out) != spare[0]  # used once: the next exec is posix_spawn's
    assert c.children() == []


@pytest.mark.parametrize(("argv0", "rc", "text"), [*SPAWN_FAILURES, ("{dir}", 126, "{dir}: Permission denied\n")])
def test_a_spawn_failure_reads_the_same_from_the_spare_and_from_posix_spawn(
    core: Core, tmp_path: Path, argv0: str, rc: int, text: str
) -> None:
    argv0, text = spawn_failure(tmp_path, argv0, text)
    for rid in (4, 5):  # the spare's exec, then posix_spawn's
        _out, _err, _got, raw = core.run(rid, {"argv": [argv0, "arg"]})
        assert raw == reply(rid, {"rc": rc, "stderr_text": text, "timed_out": False, "ok": True})
    assert core.children() == []  # the failed spare is reaped, as posix_spawn reaps its child
    out, _, _, _ = core.run(6, {"argv": ["echo", "still", "serving"]})
    assert out == b"still serving\n"


NAME = "pytest-bottle-spare-probe"
# The core in a mount namespace of its own, with both /usr/local PATH entries
# on tmpfs: NAME is in the first, not executable, and maybe in the second.
IN_NAMESPACE = f"""
mount -t tmpfs spare /usr/local/sbin && mount -t tmpfs spare /usr/local/bin || exit 99
: > /usr/local/sbin/{NAME}; chmod 644 /usr/local/sbin/{NAME}
if [ "$LATER" = yes ]; then
    printf '#!/bin/sh\\necho found-in-local-bin\\n' > /usr/local/bin/{NAME}; chmod 755 /usr/local/bin/{NAME}
fi
exec "$@"
"""


@pytest.mark.parametrize(("later", "rc", "out", "text"), [
    ("yes", 0, b"found-in-local-bin\n", None),  # past the EACCES, as posix_spawnp goes on
    ("no", 126, b"", f"{NAME}: Permission denied\n"),  # EACCES, not the last entry's ENOENT
])  # fmt: skip
def test_the_spare_searches_path_as_posix_spawnp_does(
    start: Callable[..., Core], later: str, rc: int, out: bytes, text: str | None
) -> None:
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare (util-linux) for a mount namespace")
    c = start(prefix=("env", f"LATER={later}", unshare, "--mount", "--propagation", "private", "--",
                      "sh", "-c", IN_NAMESPACE, "sh"))  # fmt: skip
    c.go()
    c.sync()
    want: dict[str, object] = {"rc": rc, "timed_out": False, "ok": True}
    if text is not None:
        want = {"rc": rc, "stderr_text": text, "timed_out": False, "ok": True}
    for rid in (1, 2):  # the spare's exec, then posix_spawn's
        got_out, _, _, raw = c.run(rid, {"argv": [NAME]})
        assert (got_out, raw) == (out, reply(rid, want))


def test_a_handback_ends_the_unused_spare(core: Core) -> None:
    (spare,) = core.children()
    call = frames.jframe(CALL, 7, {"op": "write", "path": "/tmp/x"})
    core.send(call)
    info, left, fds = core.handback()
    assert (info["execs"], left, fds) == ([], call, [])
    assert core.children() == [] and dead(spare)  # reaped before the handback: not the Python agent's to find
    assert core.ack() == 0


def test_the_spare_ends_with_the_core(start: Callable[..., Core]) -> None:
    c = start()
    (spare,) = _spare_of(c)
    c.agent.close()  # the Python agent gone: the core ends
    assert c.proc.wait(10) == 1
    assert dead(spare)


def test_the_first_commands_signal_state_is_posix_spawns(core: Core) -> None:
    """Blocked, ignored and caught signals: glibc's posix_spawn ignores its two
    internal signals (32, 33) in the child, and so does the spare."""
    state = [core.run(rid, {"argv": ["grep", "^Sig[BIC]", "/proc/self/status"]})[0] for rid in (1, 2)]
    assert state[0] == state[1], state
    ignored = int(next(line for line in state[0].splitlines() if line.startswith(b"SigIgn:")).split()[1], 16)
    internal = (1 << (32 - 1)) | (1 << (33 - 1))
    assert ignored & internal == internal, state[0]


@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"])
def test_a_spare_stopped_or_killed_from_outside_gives_way_to_posix_spawn(core: Core, how: str) -> None:
    (spare,) = core.children()
    os.kill(spare, getattr(signal, how))
    want = "Z" if how == "SIGKILL" else "T"  # the signal has landed before the exec is asked for
    deadline = time.monotonic() + 10
    while _stat(spare)[0] != want and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    out, _, got, _ = core.run(1, {"argv": ["sh", "-c", "echo $$"]})
    assert got["rc"] == 0 and int(out) != spare
    assert time.monotonic() - started < 5  # a stopped one is given up within seconds
    assert dead(spare)  # ended and reaped: nothing the Python agent would ever see
    assert core.children() == []
