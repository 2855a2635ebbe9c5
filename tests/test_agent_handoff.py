"""The Python agent parked behind its compiled core, on this host (issue 18).

The real agent runs in a child process on a socket pair standing in for its
virtio port, with the real core compiled from ``guest/core``; the host side
is the real ``AgentChannel``.  Commands run on this host: only harmless ones.
``setup`` is never sent here (it would rename this host); the VM tests cover it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import wait_until

from pytest_bottle import AgentError
from pytest_bottle.agent.channel import AgentChannel
from pytest_bottle.agent.client import AgentClient
from pytest_bottle.agent.replies import ExecReply
from pytest_bottle.images.guest_files import build_core
from pytest_bottle.images.recipes import GUEST_DIR

CORE_COMM = "bottle-agent-co"
PY_COMM = Path(sys.executable).name[:15]  # the agent here runs as this
SERVE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import agent, execute, frames, handoff
handoff.CORE = sys.argv[2]
os.chdir(execute.HOME)
os.environ["PATH"] = execute.DEFAULT_PATH
agent.Agent(frames.Channel(int(sys.argv[3]))).serve()
"""


# Widens the moment between a worker sending its reply and counting its call done.
LAG = """
import sys, time
sys.path.insert(0, sys.argv[1])
import frames
_send = frames.Channel.send
def _lagging(self, data):
    _send(self, data)
    time.sleep({lag})
frames.Channel.send = _lagging
"""


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler on this host")
    path = tmp_path_factory.mktemp("core") / "bottle-agent-core"
    assert build_core(path), "the core did not compile (see the warning logged)"
    return path


class Agent:
    """The real Python agent in a child process, and the host's client of it."""

    def __init__(self, core: Path, lag: float = 0.0) -> None:
        host, port = socket.socketpair()
        serve = SERVE if not lag else LAG.format(lag=lag) + SERVE
        self.proc = subprocess.Popen(
            [sys.executable, "-c", serve, str(GUEST_DIR), str(core), str(port.fileno())],
            pass_fds=[port.fileno()],
            start_new_session=True,
        )
        port.close()
        self.channel = AgentChannel(host, "local-agent")
        host.close()  # the channel keeps its own dup
        self.channel.send_sync()
        assert self.channel.synced.wait(20), "the agent did not answer SYNC"
        self.client = AgentClient(self.channel)

    def run(self, argv: list[str], timeout: float | None = 30, env: dict[str, str] | None = None) -> ExecReply:
        r = self.client.exec(argv, env=env or {}, cwd=None, user=None, timeout=timeout, stdin=None, cap=64 << 20)
        return r.finish(10, argv)

    def server(self) -> str:
        return self.run(["sh", "-c", "cat /proc/$PPID/comm"]).stdout.decode().strip()

    def close(self) -> None:
        self.channel.close()
        with contextlib.suppress(ProcessLookupError):  # gone already
            os.killpg(self.proc.pid, signal.SIGKILL)  # the agent, its core and their commands
        self.proc.wait(10)


@pytest.fixture
def parked(core: Path) -> Iterator[Agent]:
    a = Agent(core)
    try:
        assert a.client.park(timeout=30) is None
        yield a
    finally:
        a.close()


@pytest.fixture
def python_agent(core: Path) -> Iterator[Agent]:
    a = Agent(core)
    try:
        yield a
    finally:
        a.close()


CASES = [
    ["true"],
    ["sh", "-c", "echo out; echo err >&2; exit 3"],
    ["env"],
    ["no-such-command-here"],
    ["/etc"],  # a directory: 126
    ["/proc/version"],  # not executable: 126
    ["sh", "-c", "kill -TERM $$"],
    ["sh", "-c", "sleep 5 & echo left-in-background"],  # returns without waiting for it
    ["sh", "-c", "head -c 9000000 /dev/zero | tr '\\0' x; echo; seq 3 >&2"],
]


def _same(r: ExecReply) -> tuple[int, bool, bytes, bytes]:
    return r.rc, r.timed_out, r.stdout, r.stderr


def test_the_core_answers_as_the_python_agent_does(parked: Agent, python_agent: Agent) -> None:
    assert parked.server() == CORE_COMM and python_agent.server() == PY_COMM
    for argv in CASES:
        env = {"EXTRA": "1", "HOME": "/elsewhere"} if argv == ["env"] else {}
        assert _same(parked.run(argv, env=env)) == _same(python_agent.run(argv, env=env)), argv
    assert parked.server() == CORE_COMM  # none of these woke the Python agent


def test_a_timeout_and_a_cancel_through_the_core(parked: Agent) -> None:
    started = time.monotonic()
    r = parked.run(["sleep", "30"], timeout=1)
    assert (r.timed_out, r.rc) == (True, -9) and time.monotonic() - started < 5
    run = parked.client.exec(["sleep", "30"], env={}, cwd=None, user=None, timeout=None, stdin=None, cap=1024)
    time.sleep(0.3)
    assert run.rid
    parked.channel.cancel(run.rid)
    assert run.finish(10, "sleep").rc == -9
    assert parked.server() == CORE_COMM


def test_the_handback_keeps_running_commands_and_their_deadlines(parked: Agent, tmp_path: Path) -> None:
    s, c_, go = (tmp_path / n for n in ("s", "c", "go"))  # files order the steps, not sleeps
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(
            parked.run,
            ["sh", "-c", f"cat /proc/$PPID/comm; touch {s}; while [ ! -e {go} ]; do sleep 0.02; done; "
             "cat /proc/$(cut -d' ' -f4 /proc/$$/stat)/comm; exit 5"],
        )  # fmt: skip
        cut_started = time.monotonic()
        cut = pool.submit(parked.run, ["sh", "-c", f"touch {c_}; exec sleep 30"], 10)
        wait_until(lambda: s.exists() and c_.exists(), 30, "both commands running")
        parked.client.write(str(tmp_path / "f"), b"handed back", mode=None, timeout=30)  # the core cannot
        assert not slow.done() and not cut.done()
        go.touch()
        r = slow.result(60)
        assert (r.rc, r.stdout.decode()) == (5, f"{CORE_COMM}\n{PY_COMM}\n")
        c = cut.result(60)
        assert c.timed_out and 10 <= time.monotonic() - cut_started < 15
    assert (tmp_path / "f").read_bytes() == b"handed back"
    assert parked.server() == PY_COMM


def test_a_dead_core_ends_the_agent_so_that_its_service_restarts(parked: Agent) -> None:
    # In the guest, systemd then restarts the whole unit: the core's commands
    # die with it and the new agent says HELLO with a new instance.
    pid = int(parked.run(["sh", "-c", "echo $PPID"]).stdout)
    os.kill(pid, signal.SIGKILL)
    assert parked.proc.wait(20) == 1
    with pytest.raises(AgentError):
        parked.run(["true"])


def test_an_agent_with_calls_running_does_not_park(python_agent: Agent, tmp_path: Path) -> None:
    with ThreadPoolExecutor(1) as pool:
        gate = f"touch {tmp_path}/s; while [ ! -e {tmp_path}/go ]; do sleep 0.02; done"  # runs until told
        busy = pool.submit(python_agent.run, ["sh", "-c", gate])
        wait_until((tmp_path / "s").exists, 30, "the command running")
        assert python_agent.client.park(timeout=30) == "calls or commands still running"
        (tmp_path / "go").touch()
        assert busy.result(30).rc == 0
    assert python_agent.client.park(timeout=30) is None
    assert python_agent.server() == CORE_COMM


def test_a_park_sent_on_the_last_reply_is_not_refused(core: Path) -> None:
    """The host sends ``park`` as soon as the call before it is answered; the
    worker that answered counts its call done a moment later (here 0.3 s):
    a seed must still park (it once got "calls or commands still running")."""
    a = Agent(core, lag=0.3)
    try:
        a.client.hello(timeout=30)
        assert a.client.park(timeout=30) is None
        assert a.server() == CORE_COMM
    finally:
        a.close()
