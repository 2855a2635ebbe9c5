"""The compiled agent core (issue 18, CORE_SPEC.md) on this host, no VM.

Each test builds nothing new: the core is compiled once per session, then run
for real with fd 3 = a socketpair standing in for the virtio port (the test
plays the host with the ``frames`` helpers) and fd 4 = a socketpair standing
in for the Python agent (the test sends GO, reads HANDBACK, sends the ACK).
Only calls that are harmless on a host are sent: never ``setup``, which would
set this machine's hostname, clock and NICs (it is tested in real VMs).
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_bottle.guest import execute, frames
from pytest_bottle.guest.frames import (
    CALL,
    CANCEL,
    HEADER,
    HELLO,
    HOST_WINDOW,
    PING,
    REPLY,
    STDERR,
    STDOUT,
    SYNC_FRAME,
    SYNC_MAGIC,
)

SOURCES = Path(frames.__file__).parent / "core"
PR_SET_CHILD_SUBREAPER = 36
INSTANCE = bytes(range(16))
GO = struct.Struct("=III")  # synced, leftover bytes, the park request id (0: none)
FIRST = 100  # the core's ends go here before they move to 3 and 4: never 3 or 4 themselves
# Puts the core's ends at fd 3 and 4, then becomes the core.
WRAP = "import os, sys; a, b = int(sys.argv[1]), int(sys.argv[2]); os.dup2(a, 3); os.dup2(b, 4); os.close(a); os.close(b); os.execv(sys.argv[3], sys.argv[3:])"


@pytest.fixture(scope="session")
def core_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) on this host: the agent core cannot be built here")
    out = tmp_path_factory.mktemp("core") / "bottle-agent-core"
    cmd = [cc, "-O2", "-static", "-Wall", "-Wextra", "-Werror", "-o", str(out), *map(str, sorted(SOURCES.glob("*.c")))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not res.stderr, res.stderr  # warnings are errors: nothing at all may be said
    return out


class Core:
    """One running core: ``port`` is the host's end, ``agent`` the Python agent's."""

    def __init__(
        self,
        binary: Path,
        port_type: int = socket.SOCK_STREAM,
        instance: bytes = INSTANCE,
        prefix: tuple[str, ...] = (),  # runs the wrapper: e.g. into a namespace of its own
    ) -> None:
        self.port, core_port = socket.socketpair(socket.AF_UNIX, port_type)
        self.agent, core_agent = socket.socketpair()
        a, b = (
            fcntl.fcntl(core_port.fileno(), fcntl.F_DUPFD, FIRST),
            fcntl.fcntl(core_agent.fileno(), fcntl.F_DUPFD, FIRST),
        )
        core_port.close()
        core_agent.close()
        # The Python agent spawns it with its own signal dispositions (SIGPIPE
        # ignored): restore_signals=False keeps ours, as posix_spawn would.
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", WRAP, str(a), str(b), str(binary), instance.hex()],
            pass_fds=(a, b),
            restore_signals=False,
        )
        os.close(a)
        os.close(b)
        self.buf = bytearray()
        self.port.settimeout(10)
        self.agent.settimeout(10)

    # -- the Python agent's side
    def go(self, synced: bool = False, leftover: bytes = b"") -> None:
        self.agent.sendall(GO.pack(int(synced), len(leftover), 0) + leftover)

    def handback(self) -> tuple[dict[str, Any], bytes, list[int]]:
        fds = array.array("i")
        data, anc, _, _ = self.agent.recvmsg(4, socket.CMSG_SPACE(253 * fds.itemsize))
        for level, kind, payload in anc:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        data += self.recv_agent(4 - len(data))
        (n,) = struct.unpack("=I", data)
        info = json.loads(self.recv_agent(n))
        return info, self.recv_agent(info["bytes"]), list(fds)

    def recv_agent(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self.agent.recv(n - len(out))
            assert got, "the core closed fd 4"
            out += got
        return out

    def ack(self) -> int:
        self.agent.sendall(b"\x01")
        return self.proc.wait(10)

    # -- the host's side
    def send(self, data: bytes) -> None:
        self.port.sendall(data)

    def call(self, rid: int, obj: dict[str, Any]) -> None:
        self.send(frames.jframe(CALL, rid, obj))

    def recv(self, timeout: float = 10) -> tuple[int, int, bytes]:
        self.port.settimeout(timeout)
        while True:
            if len(self.buf) >= HEADER.size:
                kind, rid, size = HEADER.unpack_from(self.buf)
                assert size <= frames.limit(kind), (kind, size)
                if len(self.buf) >= HEADER.size + size:
                    payload = bytes(self.buf[HEADER.size : HEADER.size + size])
                    del self.buf[: HEADER.size + size]
                    return kind, rid, payload
            got = self.port.recv(1 << 20)
            assert got, "the core closed the port"
            self.buf += got

    def quiet(self, secs: float) -> None:
        """Nothing arrives for ``secs``."""
        with pytest.raises(TimeoutError):
            frame = self.recv(secs)
            pytest.fail(f"unexpected frame {frame!r}")

    def sync(self) -> None:
        self.send(SYNC_FRAME)
        assert self.recv() == (HELLO, 0, SYNC_MAGIC + INSTANCE)

    def run(self, rid: int, call: dict[str, Any]) -> tuple[bytes, bytes, dict[str, Any], bytes]:
        """An exec to its end: stdout, stderr, the reply and its raw payload."""
        self.call(rid, {"op": "exec", **call})
        out, err = b"", b""
        while True:
            kind, r, payload = self.recv()
            assert r == rid
            if kind == STDOUT:
                out += payload
            elif kind == STDERR:
                err += payload
            else:
                assert kind == REPLY
                return out, err, json.loads(payload), payload

    def children(self) -> list[int]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def close(self) -> None:
        for pid in self.children():  # every exec leads its own session
            killpg(pid)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.port.close()
        self.agent.close()


def dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # reaped between the open and the read: ESRCH
        return True


def killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def start(core_bin: Path) -> Iterator[Callable[..., Core]]:
    cores: list[Core] = []

    def make(**kw: Any) -> Core:
        core = Core(core_bin, **kw)
        cores.append(core)
        return core

    yield make
    for core in cores:
        core.close()


@pytest.fixture
def core(start: Callable[..., Core]) -> Core:
    """A core past GO and SYNC: a host is connected."""
    c = start()
    c.go()
    c.sync()
    return c


def reply(rid: int, obj: dict[str, Any]) -> bytes:
    """The payload the Python agent would send (agent.Agent.run: json.dumps)."""
    return frames.jframe(REPLY, rid, obj)[HEADER.size :]


# -- GO, SYNC, PING ------------------------------------------------------------


def test_go_leftover_bytes_are_served_first(start: Callable[..., Core]) -> None:
    c = start()
    c.go(False, SYNC_FRAME + frames.jframe(CALL, 1, {"op": "hello"}) + frames.frame(PING, 0))
    assert c.recv() == (HELLO, 0, SYNC_MAGIC + INSTANCE)
    kind, rid, payload = c.recv()
    assert (kind, rid, json.loads(payload)["ok"]) == (REPLY, 1, True)
    assert c.recv() == (HELLO, 0, SYNC_MAGIC + INSTANCE)


def test_go_synced_takes_calls_without_a_sync(start: Callable[..., Core]) -> None:
    c = start()
    c.go(True, frames.frame(PING, 0)[:5])  # half a frame: the rest comes from the port
    c.send(frames.frame(PING, 0)[5:])
    assert c.recv() == (HELLO, 0, SYNC_MAGIC + INSTANCE)


def test_go_unsynced_ignores_everything_before_sync(start: Callable[..., Core]) -> None:
    c = start()
    c.go(False, frames.frame(PING, 0) + frames.jframe(CALL, 1, {"op": "hello"}))
    c.quiet(0.3)
    c.sync()


def test_sync_answers_hello_with_the_instance(start: Callable[..., Core]) -> None:
    other = bytes.fromhex("ff" * 8 + "01" * 8)
    c = start(instance=other)
    c.go()
    c.send(SYNC_FRAME)
    assert c.recv() == (HELLO, 0, SYNC_MAGIC + other)
    c.send(SYNC_FRAME + SYNC_FRAME)
    assert c.recv()[2] == SYNC_MAGIC + other
    assert c.recv()[2] == SYNC_MAGIC + other


def test_ping(core: Core) -> None:
    core.send(frames.frame(PING, 0))
    assert core.recv() == (HELLO, 0, SYNC_MAGIC + INSTANCE)


def test_garbage_before_sync_is_ignored(start: Callable[..., Core]) -> None:
    c = start()
    c.go()
    bogus = HEADER.pack(CALL, 1, 1 << 30) + b"\x00" * 100 + frames.jframe(CALL, 2, {"op": "hello"})
    c.send(b"garbage" + bogus + SYNC_FRAME[:7])
    c.quiet(0.2)
    c.send(SYNC_FRAME[7:] + frames.jframe(CALL, 3, {"op": "hello"}))
    assert c.recv() == (HELLO, 0, SYNC_MAGIC + INSTANCE)
    kind, rid, _ = c.recv()
    assert (kind, rid) == (REPLY, 3)  # nothing for the call before the SYNC
    c.quiet(0.2)


def test_an_oversized_frame_resynchronises(core: Core) -> None:
    core.send(HEADER.pack(PING, 0, 1) + b"x" + frames.frame(PING, 0))  # PING takes no payload
    core.quiet(0.3)
    core.send(SYNC_FRAME + frames.frame(PING, 0))
    assert core.recv()[0] == HELLO
    assert core.recv()[0] == HELLO


def test_host_leaves_and_a_new_one_syncs(start: Callable[..., Core]) -> None:
    # A datagram pair: an empty datagram reads as 0 like a port without a host,
    # and the same pair still carries the next host's frames.
    c = start(port_type=socket.SOCK_DGRAM)
    c.go()
    c.send(SYNC_FRAME)
    assert c.recv()[0] == HELLO
    c.call(1, {"op": "exec", "argv": ["sh", "-c", "echo $$; exec sleep 30"]})
    pid = int(c.recv()[2])
    c.send(frames.jframe(CALL, 2, {"op": "hello"})[:6])  # half a frame, then the host is gone
    c.port.send(b"")
    time.sleep(0.2)
    c.send(frames.jframe(CALL, 3, {"op": "hello"}))  # not synced: dropped
    c.quiet(0.2)
    assert not dead(pid)  # commands run on while no host is there
    c.send(SYNC_FRAME)
    assert c.recv() == (HELLO, 0, SYNC_MAGIC + INSTANCE)
    c.call(4, {"op": "hello"})
    kind, rid, _ = c.recv()
    assert (kind, rid) == (REPLY, 4)
    deadline = time.monotonic() + 5
    while not dead(pid) and time.monotonic() < deadline:  # the old session's exec was killed
        time.sleep(0.02)
    assert dead(pid)
    c.quiet(0.3)  # and sends nothing


# -- hello ----------------------------------------------------------------------


def test_hello_op(core: Core) -> None:
    core.call(7, {"op": "hello", "extra": [1, {"x": None}]})
    kind, rid, payload = core.recv()
    now = time.clock_gettime(time.CLOCK_BOOTTIME)
    got = json.loads(payload)
    assert (kind, rid) == (REPLY, 7)
    assert list(got) == ["version", "boot_id", "uptime", "ok"]
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert got["boot_id"] == f.read().strip()
    assert (got["version"], got["ok"]) == (frames.VERSION, True)
    assert isinstance(got["uptime"], float) and now - 5 < got["uptime"] <= now


# -- exec -----------------------------------------------------------------------


def test_exec_true(core: Core) -> None:
    assert core.run(1, {"argv": ["true"]}) == (
        b"",
        b"",
        {"rc": 0, "timed_out": False, "ok": True},
        reply(1, {"rc": 0, "timed_out": False, "ok": True}),
    )


def test_exec_output_and_rc(core: Core) -> None:
    out, err, _got, raw = core.run(9, {"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"], "timeout": 30})
    assert (out, err) == (b"out\n", b"err\n")
    assert raw == reply(9, {"rc": 3, "timed_out": False, "ok": True})


def test_exec_env_matches_the_python_agent(core: Core) -> None:
    env = {"ZED": "1", "HOME": "/elsewhere", "A": "é ☃", "PATH": execute.DEFAULT_PATH}
    out, _, got, _ = core.run(2, {"argv": ["env"], "env": env, "cwd": "/root", "user": None})
    assert got["rc"] == 0
    assert out.decode().splitlines() == [
        f"PATH={execute.DEFAULT_PATH}",
        "LANG=C.UTF-8",
        "HOME=/elsewhere",
        "USER=root",
        "LOGNAME=root",
        "ZED=1",
        "A=é ☃",
    ]
    # and the Python agent's own spawn gives the very same
    child = execute.spawn(["env"], env, None, None, False)
    chunks: list[bytes] = []
    execute.pump(child, lambda _k, data: chunks.append(data), None)
    assert b"".join(chunks) == out


IGNORED = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))


def _ignored(status: bytes) -> int:
    """The SigIgn mask of a /proc/PID/status text."""
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(b"SigIgn:")), 16)


def _python_spawn(cwd: str | None) -> bytes:
    child = execute.spawn(["cat", "/proc/self/status"], {}, cwd, None, False)
    chunks: list[bytes] = []
    execute.pump(child, lambda _k, data: chunks.append(data), None)
    return b"".join(chunks)


def test_commands_start_with_sigpipe_ignored_on_every_path(core: Core) -> None:
    """docs/reference.md (exec): as the agent has them, so a background writer
    an exec left behind outlives the agent's reading.  The Python agent's
    subprocess path (a cwd or a user) used to give them back."""
    assert signal.getsignal(signal.SIGPIPE) == signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    out, _, got, _ = core.run(2, {"argv": ["cat", "/proc/self/status"]})
    assert got["rc"] == 0
    assert _ignored(out) & IGNORED == IGNORED
    assert _ignored(_python_spawn(None)) & IGNORED == IGNORED  # posix_spawn
    assert _ignored(_python_spawn("/tmp")) & IGNORED == IGNORED  # subprocess


def test_exec_runs_in_root_with_devnull_stdin_in_its_own_session(core: Core) -> None:
    out, _, _, _ = core.run(3, {"argv": ["sh", "-c", "pwd; cat; echo $$; cut -d' ' -f6 /proc/$$/stat"]})
    lines = out.decode().split()
    assert lines[0] == execute.HOME
    assert lines[1] == lines[2]  # the session leader is the command itself


# (argv[0], rc, stderr_text): {file} is a script without the execute bit, {dir} a directory
SPAWN_FAILURES = [
    ("no-such-command-xyz", 127, "no-such-command-xyz: not found\n"),
    ("/no/such/path", 127, "/no/such/path: not found\n"),
    ("{file}", 126, "{file}: Permission denied\n"),
    ("{file}/x", 126, "{file}/x: Not a directory\n"),
    ("{garbage}", 126, "{garbage}: Exec format error\n"),  # no #!, no ELF: a shell says 126 too
]


def spawn_failure(tmp_path: Path, argv0: str, text: str) -> tuple[str, str]:
    """A SPAWN_FAILURES case made real in ``tmp_path``: its argv[0] and text."""
    (tmp_path / "file").write_text("#!/bin/sh\n")
    (tmp_path / "file").chmod(0o644)
    (tmp_path / "garbage").write_bytes(b"\x00\x01\x02\x03")
    (tmp_path / "garbage").chmod(0o755)
    for name, path in (("{file}", tmp_path / "file"), ("{garbage}", tmp_path / "garbage"), ("{dir}", tmp_path)):
        argv0, text = argv0.replace(name, str(path)), text.replace(name, str(path))
    return argv0, text


@pytest.mark.parametrize(("argv0", "rc", "text"), SPAWN_FAILURES)
def test_exec_spawn_failures_are_worded_like_a_shell(
    core: Core, tmp_path: Path, argv0: str, rc: int, text: str
) -> None:
    argv0, text = spawn_failure(tmp_path, argv0, text)
    _out, _err, _got, raw = core.run(4, {"argv": [argv0, "arg"]})
    assert raw == reply(4, {"rc": rc, "stderr_text": text, "timed_out": False, "ok": True})
    with pytest.raises(execute.SpawnFailed) as failed:  # the Python agent's words
        execute.spawn([argv0, "arg"], {}, None, None, False)
    assert (failed.value.rc, failed.value.message) == (rc, text)


def test_exec_other_spawn_errors_are_handed_back(start: Callable[..., Core]) -> None:
    # Out of descriptors (EMFILE): the agent's own trouble, not the program's: the Python agent reports it.
    core = start(prefix=("prlimit", "--nofile=8:8"))
    core.go()
    core.sync()
    data = frames.jframe(CALL, 3, {"op": "exec", "argv": ["true"]})
    core.send(data)
    info, left, _ = core.handback()
    assert (info["execs"], left) == ([], data)
    assert core.ack() == 0


def test_exec_timeout_kills_the_group(core: Core) -> None:
    t0 = time.monotonic()
    out, _, _got, raw = core.run(5, {"argv": ["sh", "-c", "sleep 30 & echo $!; sleep 30"], "timeout": 0.5})
    assert raw == reply(5, {"rc": -9, "timed_out": True, "ok": True})
    assert 0.5 <= time.monotonic() - t0 < 5
    background = int(out)
    deadline = time.monotonic() + 5
    while not dead(background) and time.monotonic() < deadline:  # it died with its group
        time.sleep(0.02)
    assert dead(background)


def test_cancel_kills_and_still_replies(core: Core) -> None:
    core.call(6, {"op": "exec", "argv": ["sh", "-c", "echo started; exec sleep 30"]})
    assert core.recv() == (STDOUT, 6, b"started\n")
    core.send(frames.frame(CANCEL, 99))  # unknown: ignored
    core.send(frames.frame(CANCEL, 6))
    assert core.recv() == (REPLY, 6, reply(6, {"rc": -9, "timed_out": False, "ok": True}))


def test_a_killed_groups_reply_waits_until_every_member_is_gone(core: Core) -> None:
    # Zombies too: a ``pgrep`` right after the reply must not see the group
    # dying or waiting for init (this host's, here) to reap it.
    for rid, call in ((7, {"timeout": 60}), (8, {"timeout": 0.5})):
        cmd = "sleep 30 & sleep 30 & echo $!; exec sleep 30"
        core.call(rid, {"op": "exec", "argv": ["sh", "-c", cmd], **call})
        kind, _, payload = core.recv()
        assert kind == STDOUT
        member, t0 = int(payload), time.monotonic()
        if rid == 7:
            core.send(frames.frame(CANCEL, rid))
        got = core.recv()
        assert got == (REPLY, rid, reply(rid, {"rc": -9, "timed_out": rid == 8, "ok": True}))
        assert not os.path.exists(f"/proc/{member}")
        assert time.monotonic() - t0 < 3  # not the bound (execute.GROUP_GONE_WAIT)


@pytest.fixture
def subreaper() -> Iterator[None]:
    """This process takes the core's orphans and leaves them unreaped, as a
    busy init might: a killed group's member stays, a zombie, until we reap it."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.mark.parametrize("handback", [False, True])
def test_a_killed_groups_reply_waits_for_its_zombies_across_a_handback(
    core: Core, subreaper: None, handback: bool
) -> None:
    core.call(7, {"op": "exec", "argv": ["sh", "-c", "sleep 30 & echo $!; exec sleep 30"], "timeout": 60})
    kind, _, payload = core.recv()
    assert kind == STDOUT
    member = int(payload)
    core.send(frames.frame(CANCEL, 7))
    # Until the core has reaped the leader: a hand-back that comes sooner
    # passes the exec on, not yet ended, for the Python agent to finish.
    deadline = time.monotonic() + 5
    while (core.children() or not dead(member)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not core.children()
    assert dead(member) and os.path.exists(f"/proc/{member}")  # a zombie, ours to reap
    later = frames.jframe(CALL, 8, {"op": "stat", "path": "/"})  # the core hands it back
    if handback:
        core.send(later)
    core.quiet(0.5)  # no reply while the zombie is there
    reaper = threading.Timer(0.5, os.waitpid, (member, 0))
    reaper.start()
    try:
        assert core.recv() == (REPLY, 7, reply(7, {"rc": -9, "timed_out": False, "ok": True}))
        assert not os.path.exists(f"/proc/{member}")
        if handback:
            info, left, _fds = core.handback()
            assert (info["execs"], left) == ([], later)
    finally:
        reaper.join()


def test_output_waits_for_credit(core: Core) -> None:
    expected = subprocess.run(["seq", "1", "1000000"], capture_output=True, check=True).stdout
    assert len(expected) > HOST_WINDOW + 1024 * 1024
    core.call(8, {"op": "exec", "argv": ["seq", "1", "1000000"]})
    got = b""
    while len(got) < HOST_WINDOW:
        kind, rid, payload = core.recv()
        assert (kind, rid) == (STDOUT, 8)
        assert len(payload) <= execute.PIPE_CHUNK
        got += payload
    assert len(got) == HOST_WINDOW
    core.quiet(0.5)  # the window is spent
    core.send(frames.credit_frame(8, 1000))
    kind, _, payload = core.recv()
    assert (kind, len(payload)) == (STDOUT, 1000)
    got += payload
    core.quiet(0.3)
    core.send(frames.credit_frame(8, HOST_WINDOW))
    while True:
        kind, rid, payload = core.recv()
        if kind == REPLY:
            break
        got += payload
    assert got == expected  # all of it, in order
    assert payload == reply(8, {"rc": 0, "timed_out": False, "ok": True})


def test_two_execs_at_once(core: Core, tmp_path: Path) -> None:
    go = tmp_path / "go"  # the first waits for it: a file, not a sleep, orders them
    core.call(1, {"op": "exec", "argv": ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.01; done; echo one"]})
    core.call(2, {"op": "exec", "argv": ["sh", "-c", "echo two >&2"]})
    seen = [core.recv(), core.recv()]
    go.touch()
    seen += [core.recv(), core.recv()]
    assert seen == [
        (STDERR, 2, b"two\n"),
        (REPLY, 2, reply(2, {"rc": 0, "timed_out": False, "ok": True})),
        (STDOUT, 1, b"one\n"),
        (REPLY, 1, reply(1, {"rc": 0, "timed_out": False, "ok": True})),
    ]


def test_background_output_is_cut_after_the_grace(core: Core) -> None:
    # The command exits at once; what it left behind holds the pipe open.
    t0 = time.monotonic()
    out, _, got, _ = core.run(3, {"argv": ["sh", "-c", "echo $$; (sleep 5; echo never) &"]})
    assert time.monotonic() - t0 < 2
    assert got == {"rc": 0, "timed_out": False, "ok": True}
    killpg(int(out))


def test_sync_kills_an_exec_in_flight_without_reply(core: Core) -> None:
    core.call(1, {"op": "exec", "argv": ["sh", "-c", "echo $$; exec sleep 30"]})
    _kind, _, payload = core.recv()
    pid = int(payload)
    core.sync()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:  # killed and reaped
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}")
    core.quiet(0.3)
    core.send(frames.credit_frame(1, 10))  # the old exec's id means nothing now
    assert core.run(1, {"argv": ["true"]})[2] == {"rc": 0, "timed_out": False, "ok": True}


# -- handback -------------------------------------------------------------------


def test_handback_unknown_op(core: Core) -> None:
    call = frames.jframe(CALL, 7, {"op": "write", "path": "/tmp/x"})
    core.send(call + frames.frame(PING, 0))
    info, left, fds = core.handback()
    assert info == {"synced": True, "syncs": 1, "execs": [], "bytes": len(call) + HEADER.size}
    assert left == call + frames.frame(PING, 0)
    assert fds == []
    assert core.ack() == 0
    assert core.port.recv(100) == b""  # no HELLO: the PING after it was left for the Python agent


def test_handback_passes_execs_in_flight(core: Core, tmp_path: Path) -> None:
    go = tmp_path / "go"  # touched after the handback: what it writes then must come through our pipes
    wait_go = f"while [ ! -e {go} ]; do sleep 0.01; done"
    core.call(
        1,
        {
            "op": "exec",
            "argv": ["sh", "-c", f"echo $$; {wait_go}; echo second; echo more >&2; exec sleep 30"],
            "timeout": 60,
        },
    )
    _kind, _, payload = core.recv()
    pid = int(payload)
    stdin_call = frames.jframe(CALL, 2, {"op": "exec", "argv": ["cat"], "stdin": True})
    core.send(stdin_call)
    info, left, fds = core.handback()
    try:
        assert left == stdin_call
        assert info["synced"] is True and info["syncs"] == 1 and info["bytes"] == len(stdin_call)
        (ex,) = info["execs"]
        assert 55 < ex.pop("left") <= 60
        assert ex == {
            "rid": 1,
            "pid": pid,
            "out": True,
            "err": True,
            "credit": HOST_WINDOW - len(payload),
            "timed_out": False,
            "killed": False,
            "stale": False,
        }
        assert len(fds) == 2
        assert core.ack() == 0
        os.kill(pid, 0)  # alive after the core's exit
        go.touch()
        # what it writes after the handback comes through the pipes we got
        with os.fdopen(fds[0], "rb") as out, os.fdopen(fds[1], "rb") as err:
            assert out.readline() == b"second\n"
            assert err.readline() == b"more\n"
    finally:
        killpg(pid)


def test_handback_counts_syncs_and_stale_execs(core: Core) -> None:
    core.call(1, {"op": "exec", "argv": ["sh", "-c", "echo $$; exec sleep 30"]})
    pid = int(core.recv()[2])
    call = frames.jframe(CALL, 5, {"op": "stat", "path": "/"})
    core.send(SYNC_FRAME + call)  # killed, stale, and handed back before its exit is seen
    assert core.recv()[0] == HELLO
    info, left, fds = core.handback()
    assert left == call
    assert (info["synced"], info["syncs"]) == (True, 2)
    assert info["execs"] == [
        {
            "rid": 1,
            "pid": pid,
            "out": True,
            "err": True,
            "left": None,
            "credit": HOST_WINDOW - len(f"{pid}\n"),
            "timed_out": False,
            "killed": True,
            "stale": True,
        }
    ]
    assert len(fds) == 2
    assert core.ack() == 0
    for fd in fds:
        os.close(fd)
    killpg(pid)


@pytest.mark.parametrize(
    "call",
    [
        {"op": "exec", "argv": ["true"], "cwd": "/tmp"},
        {"op": "exec", "argv": ["true"], "user": "nobody"},
        {"op": "exec", "argv": ["true"], "env": {"PATH": "/bin"}},
        {"op": "exec", "argv": ["true"], "env": {"A": 1}},
        {"op": "exec", "argv": ["true"], "env": {"A=B": "1"}},
        {"op": "exec", "argv": ["true"], "notify": True},
        {"op": "exec", "argv": ["true"], "stdin": True},
        {"op": "exec", "argv": ["true"], "timeout": "5"},
        {"op": "exec", "argv": ["true"], "other": 1},
        {"op": "exec", "argv": ["tr\u0000ue"]},
        {"op": "exec", "argv": ["\ud800"]},
        {"op": "exec", "argv": []},
        {"op": "exec", "argv": [""]},
        {"op": "exec", "argv": [1]},
        {"op": "nope"},
        {"no_op": 1},
    ],
)
def test_handback_what_the_core_does_not_handle(core: Core, call: dict[str, Any]) -> None:
    data = frames.jframe(CALL, 3, call)
    core.send(data)
    info, left, _ = core.handback()
    assert (info["execs"], left) == ([], data)
    assert core.ack() == 0


@pytest.mark.parametrize(
    "payload",
    [b"{", b"[]", b'{"op":"hello"} x', b'{"op":"hello","op":"hello"}', b'{"op":"hello\xff"}', b"\xef\xbb\xbf{}"],
)
def test_handback_json_it_does_not_read(core: Core, payload: bytes) -> None:
    data = frames.frame(CALL, 3, payload)
    core.send(data)
    assert core.handback()[1] == data
    assert core.ack() == 0


def test_the_python_agent_gone_ends_the_core(start: Callable[..., Core]) -> None:
    c = start()
    c.agent.close()
    assert c.proc.wait(10) == 1


def test_a_bad_instance_is_refused(start: Callable[..., Core]) -> None:
    c = start(instance=b"")
    assert c.proc.wait(10) == 2


# (payload, the core serves it) — the core reads what json.loads reads; what it
# hands back instead, the Python agent decides about.
JSON_CASES = [
    (b'{"op":"hello"}', True),
    (
        b' \t\r\n{ "op" : "hello" , "x" : [1, -0, 0.5e-3, 1E+2, true, false, null, NaN, -Infinity, {"a":{}}, []] } \n',
        True,
    ),
    (b'{"op":"hel\\u006Co"}', True),
    (b'{"op":"hello","s":"\\ud83d\\ude00 \\u00e9 \\" \\\\ \\/ \\b\\f\\n\\r\\t"}', True),
    (b'{"op":"hello","s":"\xc3\xa9\xf0\x9f\x98\x80"}', True),
    (b'{"op":"hello","n":1e5,"m":-12.5E-3}', True),
    (b'{"op":"hello",}', False),
    (b'{"op":"hello","n":01}', False),
    (b'{"op":"hello","n":1.}', False),
    (b'{"op":"hello","n":.5}', False),
    (b'{"op":"hello","n":-}', False),
    (b'{"op":"hello","n":1e}', False),
    (b'{"op":"hello","n":Infinityx}', False),
    (b'{"op":"hello","t":tru}', False),
    (b'{"op":"hello","s":"\t"}', False),
    (b'{"op":"hello","s":"\\x"}', False),
    (b'{"op":"hello","s":"\\u12"}', False),
    (b'{"op":"hello","s":"\xc0\xaf"}', False),
    (b"{'op':'hello'}", False),
    (b'{"op":"hello"}}', False),
    (b'{"op":"hello"', False),
    (b"", False),
]


@pytest.mark.parametrize(("payload", "served"), JSON_CASES)
def test_json_is_read_as_python_reads_it(core: Core, payload: bytes, served: bool) -> None:
    try:
        python_reads = isinstance(json.loads(payload), dict)
    except ValueError:
        python_reads = False
    assert python_reads == served  # the cases themselves are right
    data = frames.frame(CALL, 3, payload)
    core.send(data)
    if served:
        kind, rid, got = core.recv()
        assert (kind, rid, json.loads(got)["ok"]) == (REPLY, 3, True)
    else:
        assert core.handback()[1] == data
        assert core.ack() == 0


@pytest.mark.parametrize(
    "payload",
    [
        b'{"op":"hello","s":"\xed\xa0\x80"}',  # json.loads decodes with surrogatepass
        b'{"op":"hello","s":"\\udc80"}',
        b'{"op":"hello","s":1,"s":2}',
    ],
)
def test_json_python_would_read_oddly_is_handed_back(core: Core, payload: bytes) -> None:
    json.loads(payload)
    data = frames.frame(CALL, 3, payload)
    core.send(data)
    assert core.handback()[1] == data
    assert core.ack() == 0


def test_json_nesting_is_bounded(core: Core) -> None:
    deep = b'{"op":"hello","x":' + b"[" * 60 + b"]" * 60 + b"}"
    core.send(frames.frame(CALL, 1, deep))
    assert core.recv()[:2] == (REPLY, 1)
    deeper = frames.frame(CALL, 2, b'{"op":"hello","x":' + b"[" * 100 + b"]" * 100 + b"}")
    core.send(deeper)  # the Python agent takes what goes that deep
    assert core.handback()[1] == deeper
    assert core.ack() == 0


def test_a_host_gone_mid_output_kills_the_exec(core: Core) -> None:
    core.call(1, {"op": "exec", "argv": ["sh", "-c", "echo $$; exec seq 1 1000000000"]})
    pid = int(core.recv()[2].split(b"\n")[0])  # seq's first lines may share its frame
    core.port.close()  # the core is stuck writing a window's worth of output
    deadline = time.monotonic() + 5
    while not dead(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dead(pid)
    assert core.proc.poll() is None  # the core itself stays for the next host


def test_the_python_agent_gone_before_the_ack(core: Core) -> None:
    core.call(1, {"op": "write", "path": "/nonexistent"})
    core.handback()
    core.agent.close()
    assert core.proc.wait(10) == 1


# -- pure helpers (a harness linked with util.c and json.c) -------------------


@pytest.fixture(scope="session")
def helpers(core_bin: Path) -> Callable[[list[str]], list[str]]:
    out = core_bin.parent / "helpers"
    cmd = ["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out)]
    cmd += [str(Path(__file__).parent / "core" / "helpers.c"), str(SOURCES / "util.c"), str(SOURCES / "json.c")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0 and not res.stderr, res.stderr

    def ask(queries: list[str]) -> list[str]:
        done = subprocess.run([out], input="".join(q + "\n" for q in queries), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    return ask


INT64 = [0, 1, -1, 42, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**19, 10**30, -(10**30)]


def test_time_ns_is_read_as_an_int64_or_handed_back(helpers: Callable[[list[str]], list[str]]) -> None:
    got = helpers([f"i64 {n}" for n in INT64] + ["i64 -", "i64 1x", "i64 1.5"])
    want = [str(n) if -(2**63) <= n < 2**63 else "no" for n in INT64] + ["no", "no", "no"]
    assert got == want


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "-0",
        "7",
        "-3",
        "100000000000000000000",
        "0.0",
        "-0.0",
        "0.5",
        "1e-400",
        "0e7",
        "1e3",
        "NaN",
        "Infinity",
        "-Infinity",
    ],
)
def test_a_number_is_true_as_python_reads_it(helpers: Callable[[list[str]], list[str]], text: str) -> None:
    want = "1" if json.loads(text) else "0"
    assert helpers(['truthy {"v": ' + text + "}"]) == [want]


ADDRESSES = ["10.0.2.15", "0.0.0.0", "255.255.255.255", "192.168.100.1", "1.2.3.4"]
NOT_PLAIN = [
    "010.0.2.15",
    "10.0.2",
    "10.0.2.15.1",
    "256.0.0.1",
    "10.0.2.15 ",
    "0x7f.0.0.1",
    "1..2.3",
    "",
    "1.2.3.4/24",
    "1.2.3.1000",
]


def test_plain_addresses_are_read_without_inet_aton(helpers: Callable[[list[str]], list[str]]) -> None:
    got = helpers([f"ip {a}" for a in ADDRESSES + NOT_PLAIN])
    # each plain one as written, and formatted as inet_ntop does (the harness prints inet_ntoa's too)
    assert got == [f"{socket.inet_ntoa(socket.inet_aton(a))} {a}" for a in ADDRESSES] + ["no"] * len(NOT_PLAIN)
