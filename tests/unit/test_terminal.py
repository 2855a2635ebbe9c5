"""The agent's pty operation, ``bottle shell``'s terminal side, and the guest
files under the images' Pythons, against the agent served in this process."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import gone as _gone
from harness import in_process_agent

from pytest_bottle import cli
from pytest_bottle.agent import resync
from pytest_bottle.agent.channel import AgentChannel
from pytest_bottle.agent.client import AgentClient
from pytest_bottle.errors import BottleError
from pytest_bottle.guest import agent, execute
from pytest_bottle.guest.frames import CHUNK, HELLO, REPLY, STDOUT, SYNC_MAGIC, Channel, frame, jframe
from pytest_bottle.guest.terminal import set_size
from pytest_bottle.host.runstate import RunRecord
from pytest_bottle.process import GuestProcess
from pytest_bottle.shell import _attach, run_shell
from pytest_bottle.vmm.process import start_time


@pytest.fixture(scope="module")
def local() -> Iterator[AgentClient]:
    with in_process_agent() as channel:
        yield AgentClient(channel)


def run(client: AgentClient, cmd: str, **kw: object) -> tuple[int, bytes, bytes]:
    r = client.exec(["/bin/sh", "-c", cmd], env={}, cwd=None, user=None, timeout=30, stdin=None, cap=1 << 20, **kw)  # type: ignore[arg-type]
    got = r.finish(5, cmd)
    return got.rc, got.stdout, got.stderr


# -- the pty operation ----------------------------------------------------------------


def test_pty_has_a_terminal_its_size_and_resizes(local: AgentClient) -> None:
    """Also when this process ignores SIGINT (started in the background of a
    shell): the terminal's shell starts with the signals at their defaults."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _pty_session(local)
    finally:
        signal.signal(signal.SIGINT, old)


def _pty_session(local: AgentClient) -> None:
    out = bytearray()
    rid, call = local.channel.start(
        "pty", lambda k, d: out.extend(d), argv=["/bin/sh", "-i"], term="xterm", rows=33, cols=101
    )
    local.channel.send_data_frame(rid, b"stty size; tty; echo T=$TERM\n")
    _until(lambda: b"33 101" in out and b"T=xterm" in out)
    assert b"/dev/pts/" in out
    local.resize(rid, 40, 120)
    local.channel.send_data_frame(rid, b"stty size\n")
    _until(lambda: b"40 120" in out)
    local.channel.send_data_frame(rid, b"echo sh=$$\n")
    _until(lambda: re.search(rb"sh=(\d+)\r\n", out))  # the echo of what was typed does not match
    shell = int(re.search(rb"sh=(\d+)\r\n", out).group(1))  # type: ignore[union-attr]
    local.channel.send_data_frame(rid, b"sleep 30\n")
    _until(lambda: _foreground_sleep(shell))  # so that the Ctrl-C is not the shell's
    local.channel.send_data_frame(rid, b"\x03")  # Ctrl-C: SIGINT to the foreground job, not the shell
    local.channel.send_data_frame(rid, b"echo after-$?\n")
    _until(lambda: b"after-130" in out)
    local.channel.send_data_frame(rid, b"(yes; echo yes-rc-$? >&2) | head -1 >/dev/null\n")
    _until(lambda: b"yes-rc-141" in out)  # killed by SIGPIPE (128 + 13), not ignoring it
    local.channel.send_data_frame(rid, b"exit 5\n")
    assert local.channel.wait(call, 10, "pty") == {"rc": 5, "ok": True}


def _foreground_sleep(shell: int) -> bool:
    """The shell's child ``sleep`` is the terminal's foreground job."""
    with contextlib.suppress(OSError):
        for pid in Path(f"/proc/{shell}/task/{shell}/children").read_text().split():
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat.rpartition(")")[2].split()  # state ppid pgrp session tty_nr tpgid
            if "(sleep)" in stat and fields[2] == fields[5]:
                return True
    return False


def _until(cond: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- bottle shell's terminal side --------------------------------------------------------


def test_a_missing_command_on_a_pty_is_reported_as_a_shell_reports_it(local: AgentClient) -> None:
    """Not in the name of the terminal (the wrapper that opens it had it as $0)."""
    out = bytearray()
    _, call = local.channel.start("pty", lambda k, d: out.extend(d), argv=["no-such-command-x", "arg"])
    assert local.channel.wait(call, 10, "pty") == {"rc": 127, "ok": True}
    assert out.startswith(b"sh: ") and b"no-such-command-x: not found" in out, bytes(out)
    assert b"/dev/pts" not in out, bytes(out)


def test_run_shell_drives_a_guest_terminal_from_a_local_one(local: AgentClient) -> None:
    """``run_shell`` between a local pty (the user's terminal) and the agent's:
    raw keystrokes go through, the window size is passed on at start and on SIGWINCH."""
    master, slave = os.openpty()
    set_size(master, 30, 90)
    seen = bytearray()

    def user() -> None:
        def expect(text: bytes) -> None:
            deadline = time.monotonic() + 10
            while text not in seen and time.monotonic() < deadline:
                if select.select([master], [], [], 0.1)[0]:
                    seen.extend(os.read(master, 4096))
            assert text in seen, (text, bytes(seen))

        try:
            expect(b"# ")  # the prompt: typing before run_shell made the terminal raw is flushed
            os.write(master, b"stty size\r")
            expect(b"30 90")
            set_size(master, 50, 132)
            os.kill(os.getpid(), signal.SIGWINCH)  # what the kernel sends a terminal's foreground group
            os.write(master, b"stty size\r")  # at once: the resize must still go first
            expect(b"50 132")
            os.write(master, b"exit 7\r")
        except BaseException as e:
            failed.append(e)
            os.kill(os.getpid(), signal.SIGHUP)  # ends run_shell (129), not a hang until the test's timeout
            raise

    failed: list[BaseException] = []
    # A SIGHUP after run_shell returned (it restores what it found) must not end pytest.
    old = signal.signal(signal.SIGHUP, lambda *_: None)
    helper = threading.Thread(target=user)
    helper.start()
    try:
        rc = run_shell(local, ["/bin/sh", "-i"], stdin=slave, stdout=slave)
        helper.join(20)
        assert not failed, failed
        assert rc == 7
    finally:
        helper.join(20)
        signal.signal(signal.SIGHUP, old)
        os.close(master)
        os.close(slave)


def test_run_shell_is_raw_before_the_guest_can_answer(local: AgentClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that fails at once answers before ``start_pty`` returns on a
    loaded host (here it returns late on purpose): written to a terminal still
    cooked, its "\\r\\n" came out as "\\r\\r\\n"."""
    real = AgentClient.start_pty

    def late(self: AgentClient, *args: Any, **kw: Any) -> Any:
        started = real(self, *args, **kw)
        time.sleep(1)  # the guest's answer arrives meanwhile
        return started

    monkeypatch.setattr(AgentClient, "start_pty", late)
    master, slave = os.openpty()
    try:
        assert run_shell(local, ["no-such-command-x"], stdin=slave, stdout=slave) == 127
        seen = bytearray()
        while select.select([master], [], [], 0.5)[0]:
            seen.extend(os.read(master, 4096))
        assert seen.endswith(b"no-such-command-x: not found\r\n") and b"\r\r" not in seen, bytes(seen)
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("text", [b"hello\n", b"no newline"])
def test_run_shell_with_piped_input_ends_when_the_input_does(local: AgentClient, text: bytes) -> None:
    r, w = os.pipe()
    os.write(w, text)
    os.close(w)
    out_r, out_w = os.pipe()
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(run_shell(local, ["cat"], stdin=r, stdout=out_w)), daemon=True)
    t.start()
    t.join(15)
    os.close(out_w)
    seen = os.read(out_r, 65536)
    os.close(r)
    os.close(out_r)
    assert got == [0], ("run_shell did not end after its input did", seen)
    assert text.strip() in seen


def test_piped_input_failures_and_a_missing_command_end_with_a_message(local: AgentClient, tmp_path: Path) -> None:
    """Input that is not a terminal: a missing command says so; input left
    non-blocking still arrives; input that cannot be read ends the command."""
    err_r, err_w = os.pipe()
    out_r, out_w = os.pipe()
    r, w = os.pipe()
    os.close(w)
    try:
        assert run_shell(local, ["no-such-command-x"], stdin=r, stdout=out_w, stderr=err_w) == 127
        assert b"no-such-command-x: not found" in os.read(err_r, 65536)
        slow_r, slow_w = os.pipe()
        os.set_blocking(slow_r, False)  # as a parent process may leave it

        def late() -> None:
            os.write(slow_w, b"late\n")
            os.close(slow_w)

        threading.Timer(0.5, late).start()
        assert run_shell(local, ["cat"], stdin=slow_r, stdout=out_w, stderr=err_w) == 0
        assert os.read(out_r, 65536) == b"late\n"
        os.close(slow_r)
        directory = os.open(tmp_path, os.O_RDONLY)  # readable for select, EISDIR for read
        got: list[int] = []
        t = threading.Thread(
            target=lambda: got.append(run_shell(local, ["cat"], stdin=directory, stdout=out_w, stderr=err_w))
        )
        t.start()
        t.join(20)
        os.close(directory)
        assert got == [1], ("run_shell hung on input it could not read", got)
        assert b"reading the input failed" in os.read(err_r, 65536)
    finally:
        for fd in (r, err_r, err_w, out_r, out_w):
            os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_a_hung_up_shell_ends_its_guest_shell(local: AgentClient, sig: int) -> None:
    """The local terminal closed (SIGHUP) or `bottle shell` told to stop: the
    shell in the guest is killed, not left on its pty."""
    r, w = os.pipe()  # input that never ends
    out_r, out_w = os.pipe()
    pids: list[int] = []

    def hang_up() -> None:
        seen = b""
        while b"\n" not in seen:
            seen += os.read(out_r, 100)
        pids.append(int(seen.split()[0]))
        while signal.getsignal(sig) is before:  # run_shell's handler is in place
            time.sleep(0.01)
        os.kill(os.getpid(), sig)

    before = signal.getsignal(sig)
    threading.Thread(target=hang_up, daemon=True).start()
    try:
        assert run_shell(local, ["sh", "-c", "echo $$; exec sleep 30"], stdin=r, stdout=out_w) == 128 + sig
    finally:
        for fd in (r, w, out_r, out_w):
            os.close(fd)
    assert signal.getsignal(sig) == before  # the handler was put back
    assert _gone(pids[0]), "the guest's shell outlived its terminal"


def test_a_hang_up_while_the_shell_starts_ends_it_without_breaking_the_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM that lands while the CALL is being written is acted on once it
    is out: raised in the middle of the write, it cut the frame and broke the
    channel (a CI failure that took the next tests' agent with it)."""
    from pytest_bottle.agent import channel as channel_mod

    real = channel_mod.send_all  # type: ignore[attr-defined]
    sent: list[int] = []

    def signalled(*args: Any) -> None:
        if not sent:  # the CALL: its handler runs here, inside the send
            os.kill(os.getpid(), signal.SIGTERM)
        sent.append(1)
        real(*args)

    r, w = os.pipe()  # input that never ends
    with in_process_agent("hang-up-agent") as chan:
        monkeypatch.setattr(channel_mod, "send_all", signalled)
        try:
            rc = run_shell(AgentClient(chan), ["sleep", "30"], stdin=r, stdout=w)
        finally:
            monkeypatch.setattr(channel_mod, "send_all", real)
            os.close(r)
            os.close(w)
        assert rc == 128 + signal.SIGTERM
        assert not chan.broken and not chan.closed.is_set(), chan.broken
        assert chan.call("hello", timeout=10)["ok"]


def test_a_fresh_connection_skips_a_former_sessions_half_frame() -> None:
    """What the agent was sending the last `bottle shell` may be cut mid-frame;
    the next connection starts at the agent's HELLO."""
    host, guest = socket.socketpair()
    half = frame(STDOUT, 7, b"x" * 100_000)[:40_000]
    guest.sendall(half + frame(HELLO, 0, SYNC_MAGIC + b"B" * 16))
    channel = AgentChannel(host, "resync")
    try:
        assert channel.synced.wait(5) and channel.instance == b"B" * 16
        rid, call = channel.start("ping")
        guest.sendall(jframe(REPLY, rid, {"ok": True, "pong": 1}))
        assert channel.wait(call, 5, "ping") == {"ok": True, "pong": 1}
    finally:
        channel.close()
        guest.close()
        host.close()  # the channel had its own descriptor


def test_a_connection_without_a_hello_gives_up_with_a_named_error() -> None:
    chunks = iter([b"\0" * 1000] * 5)
    with pytest.raises(resync.NoHello, match="no HELLO from the agent"):
        resync.skip_to_hello(lambda: next(chunks), limit=3000)
    host, guest = socket.socketpair()
    channel = AgentChannel(host, "garbage")
    junk = b"\xff" * (resync.RESYNC_LIMIT + 2 * CHUNK)

    def send() -> None:
        with contextlib.suppress(OSError):
            guest.sendall(junk)

    threading.Thread(target=send, daemon=True).start()
    assert channel.closed.wait(10) and "no HELLO" in channel.death
    channel.close()
    guest.close()
    host.close()


def test_a_kept_bottle_whose_run_directory_vanished_is_a_named_error(tmp_path: Path) -> None:
    gone = tmp_path / "run-gone"
    record = RunRecord("btl-gone", 1, None, str(gone), extra={"kept": True, "agent_socket": str(gone / "agent.sock")})
    with pytest.raises(BottleError, match="kept bottle btl-gone is gone"), _attach(record):
        pass


def test_bottle_shell_of_a_kept_bottle_whose_qemu_is_gone_says_it_is_not_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_spare_starting: None
) -> None:
    """An orphaned record (as `bottle ps` says): its QEMU died and left its
    socket, which nobody listens on any more."""
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    qemu = subprocess.Popen(["sleep", "60"])
    started = start_time(qemu.pid)
    qemu.kill()
    qemu.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(run_dir / "agent.sock"))
    extra = {"kept": True, "agent_socket": str(run_dir / "agent.sock")}
    RunRecord("btl-orphan", qemu.pid, started, str(run_dir), qemu.pid, started, extra=extra).save()
    assert cli.main(["shell", "btl-orphan"]) == 1
    err = capsys.readouterr().err
    assert f"bottle btl-orphan is not running: its QEMU (pid {qemu.pid}) is gone" in err, err
    assert "`bottle sweep` removes what it left" in err and "Connection refused" not in err


@pytest.mark.parametrize("name", ["btl-nosuchbottle", "a/b", "x.lock"])
def test_bottle_shell_of_an_unknown_name_says_so(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Also a name no snapshot can have: it was told the rules of snapshot names."""
    assert cli.main(["shell", name]) == 1
    err = capsys.readouterr().err
    assert f"no kept bottle or saved snapshot named {name!r}" in err and "SnapshotError" not in err, err


# -- the guest side on the Pythons of the images ----------------------------------------------


@pytest.mark.parametrize("version", ["3.11", "3.13"])  # bookworm's and trixie's python3
def test_the_guest_side_runs_on_the_images_pythons(version: str) -> None:
    """The guest files, side by side as in the image, under another interpreter:
    spawn, streamed output and the pty operation."""
    python = _python(version)
    if python is None:
        pytest.skip(f"no python{version} on this host")
    host, peer = socket.socketpair()
    guest = Path(agent.__file__).parent
    code = f"import sys; sys.path.insert(0, {str(guest)!r}); import agent, frames; agent.Agent(frames.Channel({peer.fileno()})).serve()"
    child = subprocess.Popen([python, "-c", code], pass_fds=[peer.fileno()])
    try:
        channel = AgentChannel(host, f"python{version}")
        channel.send_sync()
        assert channel.synced.wait(10)
        client = AgentClient(channel)
        p = GuestProcess.start(client, "echo hi; sleep 30")
        p.wait_for_output("hi", 10)
        assert p.terminate().wait(10).returncode == -15
        texts: list[str] = []
        assert (
            run(client, r"printf 'caf\303'; sleep 0.2; printf '\251'", on_output=lambda s, t: texts.append(t))[0] == 0
        )
        assert "".join(texts) == "café"
        out = bytearray()
        rid, call = client.start_pty(["/bin/sh", "-i"], term="xterm", rows=11, cols=77, sink=lambda k, d: out.extend(d))
        channel.send_data_frame(rid, b"stty size; exit 2\n")
        assert channel.wait(call, 10, "pty") == {"rc": 2, "ok": True} and b"11 77" in out
        channel.close()
    finally:
        child.kill()
        child.wait()
        peer.close()
        host.close()  # the channel had its own descriptor


def _python(version: str) -> str | None:
    """An interpreter of ``version`` that runs (a pyenv shim may not, outside its versions)."""
    found = sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}"))
    for python in [shutil.which(f"python{version}"), *found]:
        if python and subprocess.run([python, "-c", ""], capture_output=True).returncode == 0:
            return python
    return None


def test_a_group_whose_pid_is_handed_out_again_is_forgotten() -> None:
    """A spawned group is remembered for a late kill(); once its id is a new
    command's pid, the old group was empty, and a kill must not reach the new one."""
    a, b = socket.socketpair()
    try:
        guest = agent.Agent(Channel(b.fileno()))  # not served: its bookkeeping only
        old, other = execute.Child(4242, None, -1, -1), execute.Child(4343, None, -1, -1)
        with guest.lock:
            guest.keep_group(1, old)
            guest.keep_group(2, other)
            guest.drop_groups(4242)  # what starting any command with pid 4242 does
        assert guest.groups == {2: other}
    finally:
        a.close()
        b.close()
