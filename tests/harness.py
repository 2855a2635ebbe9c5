"""Helpers the integration tests share: polling, process ownership, isolated runs.

Tests run in random order, under xdist, next to the manager's pre-start thread
(which may be starting a spare bottle at any moment).  So a test counts only
processes it can prove it started (by a path or marker in their command line),
polls instead of sleeping, and makes process-wide changes (``PATH``,
``BOTTLE_STATE_DIR``, rlimits, mounts) only in a process of its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from pytest_bottle import Bottle, matrix
from pytest_bottle.agent.channel import AgentChannel
from pytest_bottle.guest import agent
from pytest_bottle.guest.frames import HELLO, SYNC_MAGIC, Channel, frame

T = TypeVar("T")
TESTS_DIR = Path(__file__).resolve().parent
QEMU = "qemu-system-x86_64"


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def outcome_in_thread(
    call: Callable[[], object], *expected: type[BaseException]
) -> tuple[threading.Thread, list[object]]:
    """Start ``call`` in a thread of its own: what it returns, or the ``expected``
    error it raises, lands in the list (one item) when the thread ends."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except expected as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of process group ``pgid``, their names read as they were
    listed (``p.info["name"]``: a process may end at once)."""
    found = []
    for p in psutil.process_iter(["status", "name"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def processes_mentioning(marker: str, name: str = QEMU) -> list[psutil.Process]:
    """Live processes called ``name`` whose command line mentions ``marker``
    (a test's own tmp_path or cache): what *this test* started, whoever the parent."""
    found = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.info["name"] != name:
                continue
            if any(marker in arg for arg in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def run_isolated(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` in a process of its own (tests/ importable) and
    require exit code 0; returns the completed process for its output."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), full_env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, f"isolated run failed ({proc.returncode}):\n{out}\n{err}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """Kill a child started with ``start_new_session=True`` and all it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    close_pipes(proc)


def close_pipes(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """A reaped child's pipes, closed now rather than by the collector (a ResourceWarning)."""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether process ``pid`` is gone or a zombie within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True
        except (FileNotFoundError, ProcessLookupError):  # reaped between the open and the read: ESRCH
            return True
        time.sleep(0.02)
    return False


# /etc/os-release's VERSION_ID of each release the suite runs on.
VERSION_IDS = {"debian-bookworm": "12", "debian-trixie": "13"}


def version_id(b: Bottle) -> str:
    return b.check_output(". /etc/os-release && echo $VERSION_ID").strip()


def check_release(b: Bottle, request: pytest.FixtureRequest) -> None:
    """``b`` runs the release its test's id names (its matrix parameter), so a
    test put on both releases cannot pass by running one of them twice."""
    image = getattr(getattr(request.node, "callspec", None), "params", {}).get(matrix.FIXTURE)
    if image in VERSION_IDS:
        assert version_id(b) == VERSION_IDS[image], f"{b.name} is not {image}"


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes and not one more (what follows stays in the socket); EOFError
    if it closes first.  ``MSG_WAITALL`` does not wait on a socket with a timeout."""
    got = b""
    while len(got) < n:
        piece = sock.recv(n - len(got))
        if not piece:
            raise EOFError
        got += piece
    return got


def serve_in_thread(sock: socket.socket) -> None:
    """Serve ``sock`` with the real guest agent in a daemon thread of this process.

    The agent reads its port for good (a port without a host reads as EOF), so
    the fd stays open to the end of the process, owned by no socket object: no
    ResourceWarning, and no fd pulled from under the thread."""
    fd = sock.detach()
    threading.Thread(target=agent.Agent(Channel(fd)).serve, daemon=True).start()


def fake_agent_channel(name: str, instance: bytes = b"A" * 16) -> tuple[AgentChannel, socket.socket]:
    """A host channel, synced, and the guest's end of it, where a test writes a
    fake agent's frames by hand; a silent guest is taken for dead within ~1 s."""
    host, guest = socket.socketpair()
    channel = AgentChannel(host, name, idle=0.2, dead_after=1.0)
    host.close()  # the channel has its own descriptor
    guest.sendall(frame(HELLO, 0, SYNC_MAGIC + instance))
    assert channel.synced.wait(5), "the channel took no fake HELLO"
    return channel, guest


@contextlib.contextmanager
def in_process_agent(name: str = "local-agent") -> Iterator[AgentChannel]:
    """A host channel, synced, to the real guest agent served in this process."""
    host, peer = socket.socketpair()
    serve_in_thread(peer)
    channel = AgentChannel(host, name)
    host.close()  # the channel has a descriptor of its own
    try:
        channel.send_sync()
        assert channel.synced.wait(10), "the in-process agent did not answer SYNC"
        yield channel
    finally:
        channel.close()


# A kernel built with transparent huge pages (else THP_enabled always reads 0).
HAS_THP = Path("/sys/kernel/mm/transparent_hugepage").is_dir()


def thp_enabled(pid: int | str) -> str:
    """A process's THP_enabled line in /proc/PID/status: "1", or "0" when its flag is set."""
    found = re.search(r"^THP_enabled:\s*(\S+)", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert found, f"no THP_enabled in /proc/{pid}/status"
    return found[1]
