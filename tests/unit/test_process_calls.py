"""Spawned processes, streamed output and the pty operation (issue 17),
against the real agent serving in this process (no VM: the commands run on
this host, so they are harmless ones), plus a hostile fake guest."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import re
import signal
import socket
import threading
import time
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import fake_agent_channel, in_process_agent, wait_until
from harness import gone as _gone

from pytest_bottle.agent.channel import AgentChannel
from pytest_bottle.agent.client import AgentClient, ExecRun
from pytest_bottle.agent.streams import PART, OutputFeed, OutputTail
from pytest_bottle.errors import AgentError, ExecTimeout, OutputTimeout, ProcessTimeout, SpecError, WaitTimeout
from pytest_bottle.guest.frames import (
    CANCEL,
    CHUNK,
    HEADER,
    HOST_WINDOW,
    REPLY,
    STARTED,
    STDOUT,
    frame,
    jframe,
)
from pytest_bottle.history import HISTORY_LEN, CommandHistory, ProcessEntry, describe_history
from pytest_bottle.process import GuestProcess, _pattern

_open = contextlib.ExitStack()  # closed when the module's tests are done


@pytest.fixture(autouse=True, scope="module")
def _close_at_the_end() -> Iterator[None]:
    with _open:
        yield


def serve() -> AgentClient:
    return AgentClient(_open.enter_context(in_process_agent()))


@pytest.fixture(scope="module")
def local() -> Iterator[AgentClient]:
    yield serve()


def run(local: AgentClient, cmd: str, **kw: object) -> tuple[int, bytes, bytes]:
    r = local.exec(["/bin/sh", "-c", cmd], env={}, cwd=None, user=None, timeout=30, stdin=None, cap=1 << 20, **kw)  # type: ignore[arg-type]
    got = r.finish(5, cmd)
    return got.rc, got.stdout, got.stderr


# -- GuestProcess ------------------------------------------------------------------


def test_spawn_returns_once_it_runs_and_wait_gives_the_result(local: AgentClient, tmp_path: Path) -> None:
    gate = tmp_path / "go"  # the command ends only once the test has looked
    p = GuestProcess.start(local, f"while [ ! -e {gate} ]; do sleep 0.02; done; echo out; echo err >&2; exit 4")
    assert p.poll() is None and p.returncode is None
    assert isinstance(p.pid, int) and p.pid > 0
    gate.touch()
    r = p.wait(timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (4, "out\n", "err\n")
    assert p.poll() == 4 and p.state() == "exited 4" and p.stdout == "out\n"


def test_wait_past_its_timeout_leaves_it_running_then_terminate_ends_the_group(local: AgentClient) -> None:
    p = GuestProcess.start(local, ["sh", "-c", "sleep 30 & echo $!; sleep 30"])
    child = int(p.wait_for_output(re.compile(r"(\d+)\n"), 10).group(1))
    with pytest.raises(ProcessTimeout, match="still runs after 0.2 s") as e:
        p.wait(timeout=0.2)
    assert isinstance(e.value, ExecTimeout) and p.poll() is None
    assert pickle.loads(pickle.dumps(e.value)).message == e.value.message
    assert p.terminate().wait(timeout=10).returncode == -15 and p.state() == "killed by SIGTERM"
    assert _gone(child), "terminate() left a child of the group running"


def test_kill_reaches_the_group_after_its_leader_exited(local: AgentClient) -> None:
    p = GuestProcess.start(local, "sleep 30 & echo $!; exit 0")
    assert p.wait(10).returncode == 0
    child = int(p.stdout)
    assert not _gone(child, 0.3), "the background sleep should still run"
    p.kill()
    assert _gone(child), "kill() after the leader's exit left its group running"


def test_leaving_the_with_block_kills_the_group_of_an_ended_process(local: AgentClient) -> None:
    with GuestProcess.start(local, "sleep 30 & echo $!; exit 0") as p:
        p.wait(10)
        child = int(p.stdout)
    assert _gone(child), "__exit__ left the group of an ended process running"


def test_end_processes_kills_what_the_session_started(local: AgentClient) -> None:
    client = serve()
    p = GuestProcess.start(client, "sleep 30")
    q = GuestProcess.start(client, "sleep 30 & echo $!; exit 0")
    q.wait(10)
    assert client.end_processes() >= 2
    assert p.wait(5).returncode == -9 and _gone(int(q.stdout))
    assert run(client, "echo on")[1] == b"on\n"  # the session goes on


def test_abandon_loses_calls_in_flight_cancels_them_and_refuses_other_threads(tmp_path: Path) -> None:
    """What keep() relies on: once abandoned, a call waited on elsewhere is lost
    (its command cancelled), one another thread starts is refused, and only the
    abandoning thread's own calls (the end call) still go through: none of them
    reads the SIGKILL that follows as its result."""
    client = serve()
    spawned = GuestProcess.start(client, "sleep 30")
    pidfile = tmp_path / "pid"
    outcome: list[object] = []

    def in_other_thread(cmd: str) -> None:
        try:
            outcome.append(run(client, cmd))
        except AgentError as e:
            outcome.append(e)

    waiter = threading.Thread(target=in_other_thread, args=(f"echo $$ > {pidfile}; exec sleep 30",))
    waiter.start()
    pid = int(_wait_for(pidfile))
    client.channel.abandon("why it was abandoned")
    waiter.join(10)
    late = threading.Thread(target=in_other_thread, args=("sleep 30",))
    late.start()
    late.join(10)
    assert len(outcome) == 2 and all(isinstance(o, AgentError) for o in outcome), outcome
    assert all("why it was abandoned" in str(o) for o in outcome), outcome
    assert _gone(pid), "an abandoned exec was not cancelled"
    assert spawned.poll() is not None and spawned.state() == "lost (why it was abandoned)"
    assert spawned.pid is not None and _gone(spawned.pid), "an abandoned spawn was not cancelled"
    client.end_processes()  # the abandoning thread still gets through
    assert run(client, "echo on")[1] == b"on\n"


def _wait_for(path: Path, within: float = 10.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if text := path.read_text().strip():
                return text
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def test_a_new_host_session_detaches_spawned_processes_and_ends_execs_and_shells(tmp_path: Path) -> None:
    """What a fork's new host (or `bottle shell`) finds: the spawned commands
    of the last session run on, their output drained and dropped, their stdin
    closed, no frame of theirs sent; its execs in flight and its shells end."""
    client = serve()
    count, closed = tmp_path / "count", tmp_path / "stdin-closed"
    chatty = f"n=0; while :; do n=$((n+1)); echo $n > {count}.t; mv {count}.t {count}; head -c 65536 /dev/zero; done"
    got: list[tuple[int, bytes]] = []
    client.spawn(
        ["/bin/sh", "-c", f"cat >/dev/null; echo yes > {closed}; sleep 30 & echo $! > {tmp_path}/child; {chatty}"],
        lambda kind, data: got.append((kind, data)), env={}, cwd=None, user=None, stdin=True,
    )  # fmt: skip

    def old_exec() -> None:
        with contextlib.suppress(Exception):  # its caller's session is over: whatever it gets
            run(client, f"echo $$ > {tmp_path}/exec; exec sleep 30")

    threading.Thread(target=old_exec, daemon=True).start()
    client.start_pty(["/bin/sh", "-c", f"echo $$ > {tmp_path}/pty; exec sleep 30"], term="vt100", rows=24, cols=80)
    execed, shell = int(_wait_for(tmp_path / "exec")), int(_wait_for(tmp_path / "pty"))
    deadline = time.monotonic() + 10
    while not any(k == STARTED for k, _ in got) and time.monotonic() < deadline:  # spawn() does not wait for it
        time.sleep(0.02)
    leader = json.loads(next(d for k, d in got if k == STARTED))["pid"]
    assert not closed.exists()  # its stdin is still the host's
    client.channel.synced.clear()
    client.channel.send_sync()  # what a fork's host and `bottle shell` send on connecting
    assert client.channel.synced.wait(10)
    frames_seen = len(got)
    try:
        assert _gone(execed) and _gone(shell)
        _wait_for(closed)
        child = int(_wait_for(tmp_path / "child"))
        # Far more than a pipe and the host's window: its output is read and dropped.
        goal = int(_wait_for(count)) + (HOST_WINDOW + 65536) // 65536 + 4
        deadline = time.monotonic() + 30
        while int(_wait_for(count)) <= goal:
            assert time.monotonic() < deadline, f"it stopped at {_wait_for(count)} (goal {goal})"
            time.sleep(0.05)
        assert not _gone(leader, 0.2) and not _gone(child, 0.2)
        assert len(got) == frames_seen, got[frames_seen:][:3]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, signal.SIGKILL)


def test_send_signal_reaches_the_process_only_and_kill_is_sigkill(local: AgentClient) -> None:
    p = GuestProcess.start(local, ["sh", "-c", "trap 'echo got-usr1' USR1; echo armed; while :; do sleep 0.05; done"])
    p.wait_for_output("armed", 10)  # the trap is set
    p.send_signal(10)
    p.wait_for_output("got-usr1", 10)
    assert p.kill().wait(10).returncode == -9
    p.kill()  # after the end: nothing, no error
    p.send_signal(15)


def test_wait_for_output_on_either_stream_with_a_regex(local: AgentClient) -> None:
    with GuestProcess.start(local, "echo starting; sleep 0.2; echo 'listening on port 8123' >&2; sleep 30") as p:
        m = p.wait_for_output(re.compile(r"port (\d+)"), 10)
        assert m.group(1) == "8123"
        assert p.wait_for_output("starting", 1, stream="stdout").group(0) == "starting"
        with pytest.raises(OutputTimeout) as e:
            p.wait_for_output("port", 0.3, stream="stdout")
        assert isinstance(e.value, WaitTimeout) and isinstance(e.value, TimeoutError)
        assert e.value.stdout == "starting\n" and e.value.returncode is None
        assert "listening on port" in e.value.stderr
        assert pickle.loads(pickle.dumps(e.value)).stderr == e.value.stderr
        with pytest.raises(SpecError, match="stream must be"):
            p.wait_for_output("x", 1, stream="both")
    assert p.poll() == -9  # the with block killed it


def test_wait_for_output_takes_a_str_as_text_unless_it_holds_regex_only_syntax(local: AgentClient) -> None:
    script = (
        "echo 'Progress: [ 10%]'; echo 'not ready yet'; echo 'Serving on 0.0.0.0 port 8123 (http://0.0.0.0:8123/)'; "
        "sleep 0.5; echo '[100%] (ready)'; printf 'root@box:~$ '; sleep 30"
    )
    with GuestProcess.start(local, script) as p:
        assert p.wait_for_output(r"port (\d+) \(http://", 10).group(1) == "8123"  # \d: a regex
        assert p.wait_for_output(r"Serving on .* port", 1).group(0) == "Serving on 0.0.0.0 port"  # .*: a regex
        assert p.wait_for_output("^not ready yet$", 1).group(0) == "not ready yet"  # ^...$: a regex, per line
        # Text: as a regex each would have matched at once ("1", "ready"), before the line came.
        assert p.wait_for_output("[100%]", 10).group(0) == "[100%]"
        assert p.wait_for_output("(ready)", 1).group(0) == "(ready)"
        assert p.wait_for_output("port 8123 (", 1).group(0) == "port 8123 ("  # no regex at all: text
        # A trailing $ makes a regex (a line's end), which also matches where it shows as written.
        assert p.wait_for_output("root@box:~$", 10).group(0) == "root@box:~$"
        assert p.wait_for_output("[(]ready[)]$", 1).group(0) == "(ready)"
        with pytest.raises(OutputTimeout) as e:
            p.wait_for_output(r"port \d{5}", 0.3)
        assert e.value.pattern == r"port \d{5}" and e.value.read_as == "regex"
        assert "read as a regular expression: re.escape() makes it text" in str(e.value)
        # A bracket class with a quantifier, and words either side of a bar: regexes.
        assert p.wait_for_output("port [0-9]+ [(]", 1).group(0) == "port 8123 ("
        assert p.wait_for_output("nothing|ready", 1).group(0) == "ready"
        # An escape only a regex has (a newline, a metacharacter): a class needs no quantifier then.
        assert p.wait_for_output(r"port (812[34]) \(http", 1).group(1) == "8123"
        assert p.wait_for_output(r"not ready (yet)\n", 1).group(1) == "yet"
        assert p.wait_for_output(r"0\.0\.0\.0:(\d+)", 1).group(1) == "8123"
        assert p.wait_for_output("yet|Serving", 1).group(0) == "yet"
        # What the docs name as text; a bar or class that would match an empty string stays text too.
        for text in ("[2026-12-01]", "a | b", "file(s)", "[100%]", "| col1|col2 |", "[WARN]*"):
            assert _pattern(text) == (re.compile(re.escape(text)), None), text
        with pytest.raises(OutputTimeout, match=r"searched as text, as written: re.compile\(\) makes it a regex") as e:
            p.wait_for_output("port [0-9]{6}(", 0.3)  # no valid regex: text, and the error says so
        assert e.value.read_as == "text" and pickle.loads(pickle.dumps(e.value)).read_as == "text"
        with pytest.raises(OutputTimeout) as e:
            p.wait_for_output("no such line", 0.3)
        assert not e.value.read_as and "searched as text" not in str(e.value)
        for empty in ("", r"\d*", "^"):  # would match before anything was printed
            with pytest.raises(SpecError, match="matches an empty string"):
                p.wait_for_output(empty, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a user's -W error: "possible nested set" is no error here
            assert p.wait_for_output(r"\d+%\] [[(]", 1).group(0) == "100%] ("
        with pytest.raises(TypeError, match="not bytes"):
            p.wait_for_output(b"ready", 1)  # type: ignore[arg-type]


def test_wait_for_output_finds_a_match_that_spans_two_looks(local: AgentClient) -> None:
    with GuestProcess.start(
        local, "printf 'key='; sleep 0.3; printf 'value\\nnext'; sleep 0.3; echo ' line'; sleep 30"
    ) as p:
        m = p.wait_for_output(re.compile(r"key=(\w+)\nnext line"), 10)
        assert m.group(1) == "value"


def test_wait_for_output_on_a_chatty_process_costs_little_cpu(local: AgentClient) -> None:
    """A big tail, then a line every 10 ms: each look searches the new lines,
    not the whole tail again, and looks are limited to ~20 a second."""
    cmd = "head -c 8000000 /dev/zero; while :; do echo tick; sleep 0.01; done"
    with GuestProcess.start(local, cmd) as p:
        p.wait_for_output("tick", 10)
        started = time.thread_time()
        with pytest.raises(OutputTimeout):
            p.wait_for_output("never", 2)
        used = time.thread_time() - started
    assert used < 0.3, used


def test_wait_for_output_gives_up_at_once_when_the_process_ends_without_it(local: AgentClient) -> None:
    p = GuestProcess.start(local, "echo nope; exit 3")
    started = time.monotonic()
    with pytest.raises(
        OutputTimeout, match=r"did not show before the process ended \(3\), within the 30 s allowed"
    ) as e:
        p.wait_for_output("ready now", 30)
    assert e.value.pattern == "ready now" and "'ready now'" in e.value.message  # as given, not re.escape'd
    assert time.monotonic() - started < 5 and e.value.returncode == 3 and e.value.stdout == "nope\n"


def test_input_and_a_missing_program(local: AgentClient) -> None:
    p = GuestProcess.start(local, ["cat"], input=b"fed\n")
    assert p.wait(10).stdout == "fed\n"
    missing = GuestProcess.start(local, ["/no/such/program"])
    assert missing.pid is None and missing.poll() == 127 and "not found" in missing.stderr


def test_many_processes_at_once(local: AgentClient) -> None:
    procs = [GuestProcess.start(local, f"sleep 0.3; echo {i}") for i in range(8)]
    assert [p.wait(10).stdout for p in procs] == [f"{i}\n" for i in range(8)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the agent's end breaks
def test_a_closed_channel_ends_its_processes_and_nothing_hangs() -> None:
    client = serve()
    p = GuestProcess.start(client, "sleep 30")
    q = GuestProcess.start(client, "sleep 30")
    client.channel.close()
    started = time.monotonic()
    assert p.wait(5).returncode == -9 and q.poll() == -9
    assert p.state().startswith("lost (") and p.kill() is p
    with pytest.raises(OutputTimeout):
        q.wait_for_output("x", 5)
    with pytest.raises(AgentError):
        GuestProcess.start(client, "true")
    assert time.monotonic() - started < 5


def test_closing_a_busy_channel_never_leaves_its_reader_on_a_closed_descriptor() -> None:
    # The descriptor used to be closed under the reader's read: while the agent's
    # threads opened files, its number was soon another's, and the reader polled
    # that one on, so close() waited out its 2 s join (about 1 time in 4 here).
    for _ in range(40):
        client = serve()
        procs = [GuestProcess.start(client, "sleep 30") for _ in range(2)]
        client.channel.close()
        # close() gives the reader 2 s: one still polling another's descriptor outlives that
        assert not client.channel._reader.is_alive() and client.channel.closed.is_set()
        assert client.channel.sock.fileno() == -1  # ours, closed once the reader was done
        assert [p.wait(5).returncode for p in procs] == [-9, -9]


def test_a_channel_whose_peer_went_away_closes_its_descriptor_without_close() -> None:
    # A failed boot stops QEMU and never closes the channel: nothing may stay open.
    host, peer = socket.socketpair()
    channel = AgentChannel(host, "gone")
    host.close()  # the caller's end: the channel reads its own descriptor on
    assert not channel.closed.wait(0.2)
    peer.close()
    assert channel.closed.wait(5)
    deadline = time.monotonic() + 5
    while channel.sock.fileno() != -1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert channel.sock.fileno() == -1
    with pytest.raises(AgentError, match="agent channel of gone is closed: the VM closed the agent channel"):
        channel.send_sync()
    channel.close()  # and closing it after all is harmless


def test_output_kept_is_the_tail_with_a_note() -> None:
    tail = OutputTail(10)
    for piece in (b"abcd", b"efgh", b"ijkl", b"mn"):
        tail.add(piece)
    assert (tail.value(), tail.dropped, tail.total) == (b"efghijklmn", 4, 14)
    assert tail.text() == "[pytest-bottle: 4 earlier bytes dropped, the last 10 kept]\nefghijklmn"
    tail.add(b"x" * 25)
    assert tail.value() == b"x" * 10 and tail.size == 10 and tail.dropped == 29


def test_tiny_chunks_cost_their_bytes_not_an_object_each() -> None:
    tracemalloc.start()
    try:
        tail = OutputTail(1 << 30)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(200_000):
            tail.add(b"y\n")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert tail.size == 400_000 and len(tail.parts) <= 400_000 // PART + 1
    assert grown < 2 * 400_000, grown  # one bytes object per chunk: ~25 times the payload
    assert tail.value() == b"y\n" * 200_000
    snap = tail.snapshot()
    tail.add(b"more")
    assert b"".join(snap) == b"y\n" * 200_000  # a snapshot does not change with the tail


def test_a_processs_output_is_bounded(local: AgentClient) -> None:
    p = GuestProcess(local, "head -c 3000000 /dev/zero", cap=1 << 20)
    p._rid, p._call = local.spawn(
        ["head", "-c", "3000000", "/dev/zero"], p._sink, env={}, cwd=None, user=None, stdin=False
    )
    r = p.wait(20)
    assert len(r.stdout_bytes) == 1 << 20 and p._out.dropped == 3000000 - (1 << 20)
    assert p.stdout.startswith("[pytest-bottle: 1951424 earlier bytes dropped")


def test_history_shows_processes_with_their_state(local: AgentClient) -> None:
    p = GuestProcess.start(local, "sleep 30")
    entries = [("true", 0, 0.01), ProcessEntry("sleep 30", p)]
    cmd, rc, seconds = entries[1]  # still a (cmd, rc, duration) tuple
    assert (cmd, rc, seconds) == ("sleep 30", None, 0.0)
    assert describe_history(entries) == f"[0] 0.01s  true\n[spawn] pid {p.pid}, running  sleep 30"
    p.kill().wait(10)
    assert describe_history(entries[1:]) == f"[spawn] pid {p.pid}, killed by SIGKILL  sleep 30"
    pid = p.pid
    del p
    gc.collect()  # the history does not keep an ended process (and its output) alive...
    entry = entries[1]
    assert isinstance(entry, ProcessEntry) and entry.process is None
    # ...yet the report shows how it ended, whenever the test dropped it
    assert describe_history(entries[1:]) == f"[spawn] pid {pid}, killed by SIGKILL  sleep 30"


def test_a_running_process_stays_in_the_history_past_its_length(local: AgentClient) -> None:
    history = CommandHistory()
    server = GuestProcess.start(local, "sleep 30")
    history.append(ProcessEntry("sleep 30", server))
    ended = GuestProcess.start(local, "true")
    ended.wait(10)
    history.append(ProcessEntry("true", ended))
    for i in range(HISTORY_LEN + 5):
        history.append((f"cmd {i}", 0, 0.01))
    shown = describe_history(history).splitlines()
    # the server a test started long ago is still in the report; the ended one made room
    assert shown[0] == f"[spawn] pid {server.pid}, running  sleep 30"
    assert len(shown) == HISTORY_LEN and shown[1] == "[0] 0.01s  cmd 6"
    assert shown[-1] == f"[0] 0.01s  cmd {HISTORY_LEN + 4}"
    assert not any("true" in line for line in shown)
    server.kill().wait(10)
    history.append(("next", 0, 0.01))  # once it ended, it is the oldest and goes
    shown = describe_history(history).splitlines()
    assert len(shown) == HISTORY_LEN and shown[0] == "[0] 0.01s  cmd 6" and shown[-1] == "[0] 0.01s  next"


def test_processes_that_ended_unpolled_make_room_in_the_history(local: AgentClient) -> None:
    history = CommandHistory()
    done = [GuestProcess.start(local, "true") for _ in range(HISTORY_LEN)]
    for i, p in enumerate(done):
        history.append(ProcessEntry(f"true {i}", p))
    deadline = time.monotonic() + 10
    while not all(p._call is not None and p._call.done.is_set() for p in done) and time.monotonic() < deadline:
        time.sleep(0.01)  # their ends have come back; nobody polled them
    assert not any(p.ended_seen() for p in done)
    for i in range(5):
        history.append((f"cmd {i}", 0, 0.01))
    # the five newest commands are all there: ended processes, polled or not, are not servers to keep
    assert [c for c, _, _ in history][-5:] == [f"cmd {i}" for i in range(5)]
    assert [c for c, _, _ in history][:1] == ["true 5"]


def test_the_history_never_grows_past_its_length(local: AgentClient) -> None:
    history = CommandHistory()
    procs = [GuestProcess.start(local, "sleep 30") for _ in range(HISTORY_LEN + 2)]
    try:
        for i, p in enumerate(procs):
            history.append(ProcessEntry(f"sleep {i}", p))
        history.append(("true", 0, 0.01))
        assert history.maxlen == HISTORY_LEN and len(history) == HISTORY_LEN
        # full of running processes: the oldest of them went, the newest stay
        assert [c for c, _, _ in history][-2:] == [f"sleep {HISTORY_LEN + 1}", "true"]
    finally:
        for p in procs:  # all killed first: each wait may last until this host's init reaps a zombie
            p.kill()
        for p in procs:
            p.wait(10)


# -- exec(on_output=...) ------------------------------------------------------------


def test_on_output_gets_text_in_order_without_splitting_a_character(local: AgentClient) -> None:
    got: list[tuple[str, str]] = []
    cmd = r"printf 'a\303'; sleep 0.2; printf '\251b\n'; echo e1 >&2; sleep 0.1; echo e2 >&2; printf '\377'"
    rc, out, err = run(local, cmd, on_output=lambda s, t: got.append((s, t)))
    assert rc == 0 and out == b"a\xc3\xa9b\n\xff" and err == b"e1\ne2\n"
    assert "".join(t for s, t in got if s == "stdout") == "aéb\n\ufffd"
    assert "".join(t for s, t in got if s == "stderr") == "e1\ne2\n"
    assert not any("\ufffd" in t for s, t in got[:2])  # the split character was held back, not replaced


def test_any_directory_exec_cannot_enter_is_exit_2_with_chdirs_reason(local: AgentClient, tmp_path: Path) -> None:
    """A link loop or a name too long was an OSError raised out of the agent,
    not the exit 2 with a reason that a missing directory gets."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for cwd, why in (
        (tmp_path / "loop", "Too many levels of symbolic links"),
        (tmp_path / ("n" * 300), "File name too long"),
    ):
        r = local.exec(["true"], env={}, cwd=str(cwd), user=None, timeout=30, stdin=None, cap=1 << 20).finish(5, "true")
        assert (r.rc, r.stderr.decode()) == (2, f"cannot change directory to {cwd}: {why}\n")


@pytest.mark.parametrize(
    ("argv", "cwd", "rc", "why"),
    [(["no-such-program-xyz"], None, 127, "not found"), (["true"], "/no/such/dir", 2, "cannot change directory")],
)
def test_on_output_gets_why_a_command_could_not_start(
    local: AgentClient, argv: list[str], cwd: str | None, rc: int, why: str
) -> None:
    got: list[tuple[str, str]] = []
    run_ = local.exec(
        argv, env={}, cwd=cwd, user=None, timeout=30, stdin=None, cap=1 << 20, on_output=lambda s, t: got.append((s, t))
    )
    r = run_.finish(5, argv)
    assert r.rc == rc and why in r.stderr.decode()
    assert got == [("stderr", r.stderr.decode())]  # what the result holds, the callback saw


def test_an_exception_in_on_output_kills_the_command_and_propagates(local: AgentClient, tmp_path: object) -> None:
    def boom(stream: str, text: str) -> None:
        raise KeyError("stop")

    started = time.monotonic()
    with pytest.raises(KeyError, match="stop"):
        run(local, "echo go; sleep 20; echo never", on_output=boom)
    assert time.monotonic() - started < 5
    assert run(local, "echo still-usable")[1] == b"still-usable\n"


def test_a_slow_on_output_pauses_its_command_and_nothing_else(local: AgentClient) -> None:
    """Flow control: the callback blocks; the command's output stops at the
    window, other calls to the agent are answered meanwhile."""
    seen = [0]
    held, done = threading.Event(), threading.Event()

    def slow(stream: str, text: str) -> None:
        seen[0] += len(text)
        held.set()
        done.wait(120)  # held until the other calls are through

    t = threading.Thread(target=run, args=(local, "head -c 20000000 /dev/zero"), kwargs={"on_output": slow})
    t.start()
    assert held.wait(30)  # its output came, and its callback now holds it
    # The agent sends at most a window more (the channel refuses output past
    # it, which would fail the calls below); the command waits meanwhile.
    lat = []
    for _ in range(10):
        started = time.monotonic()
        assert run(local, "echo hi")[1] == b"hi\n"  # a call that waited on the callback would wait for good
        lat.append(time.monotonic() - started)
    assert max(lat) < 5.0, lat
    done.set()
    t.join(120)
    assert seen[0] == 20_000_000


def test_a_flooding_process_does_not_starve_other_calls(local: AgentClient) -> None:
    # Quiet (the flood stopped) and busy calls alternate, so that a load
    # elsewhere on the host (the other xdist worker) falls on both alike.
    quiet: list[float] = []
    busy: list[float] = []
    with GuestProcess.start(local, ["yes"]) as p:
        p.wait_for_output("y", 10)
        for _ in range(10):
            p.send_signal(signal.SIGSTOP)
            quiet.append(_latency(local))
            p.send_signal(signal.SIGCONT)
            # flooding again before the busy call (a loaded host may not run it at once)
            goal = p._out.total + (128 << 10)
            wait_until(lambda: p._out.total >= goal, 30, f"{p} sending 128 KiB more")  # noqa: B023 (called here)
            busy.append(_latency(local))
        assert p._out.total > 1_000_000  # it did flood meanwhile
    quiet.sort()
    busy.sort()
    assert busy[5] < 5 * quiet[5] + 0.1, (quiet, busy)


def _latency(local: AgentClient) -> float:
    started = time.monotonic()
    assert run(local, "echo hi")[1] == b"hi\n"
    return time.monotonic() - started


# -- a hostile guest --------------------------------------------------------------------


class Fake:
    def __init__(self) -> None:
        self.chan, self.sock = fake_agent_channel("hostile")
        self.sock.settimeout(10)
        _open.callback(self.sock.close)
        _open.callback(self.chan.close)

    def client(self) -> AgentClient:
        return AgentClient(self.chan)


@pytest.mark.parametrize("payload", [b"nonsense", b'{"pid": "1"}', b'{"pid": -1}', b"[1]", b'{"pid": true}'])
def test_a_malformed_started_frame_is_an_agent_error(payload: bytes) -> None:
    fake = Fake()
    threading.Timer(0.2, lambda: fake.sock.sendall(frame(STARTED, 1, payload))).start()
    with pytest.raises(AgentError, match="malformed STARTED"):
        GuestProcess.start(fake.client(), "x")


def test_an_oversized_started_frame_breaks_the_channel_not_the_host() -> None:
    fake = Fake()
    threading.Timer(0.2, lambda: fake.sock.sendall(frame(STARTED, 1, b" " * 300))).start()
    with pytest.raises(AgentError, match="STARTED frame of 300 bytes"):
        GuestProcess.start(fake.client(), "x")


def test_a_silent_guest_fails_spawn_and_wait_instead_of_hanging() -> None:
    fake = Fake()
    started = time.monotonic()
    with pytest.raises(AgentError, match="has not answered"):
        GuestProcess.start(fake.client(), "x")
    assert time.monotonic() - started < 10
    assert (CANCEL, 1) in _frames_from_host(fake), "the spawn given up on was not cancelled"


def _frames_from_host(fake: Fake) -> list[tuple[int, int]]:
    """(kind, rid) of what the host sent the fake guest so far."""
    fake.sock.settimeout(0.5)
    data = b""
    with contextlib.suppress(TimeoutError):
        while chunk := fake.sock.recv(65536):
            data += chunk
    got = []
    while len(data) >= HEADER.size:
        kind, rid, size = HEADER.unpack_from(data)
        got.append((kind, rid))
        data = data[HEADER.size + size :]
    return got


def test_a_bad_exit_reply_is_an_agent_error() -> None:
    fake = Fake()

    def guest() -> None:
        time.sleep(0.2)
        fake.sock.sendall(frame(STARTED, 1, b'{"pid":42}') + frame(STDOUT, 1, b"x"))
        time.sleep(0.2)
        fake.sock.sendall(jframe(REPLY, 1, {"ok": True, "rc": "0"}))

    threading.Thread(target=guest, daemon=True).start()
    p = GuestProcess.start(fake.client(), "x")
    assert p.pid == 42
    with pytest.raises(AgentError, match="no exit code"):
        p.wait(5)
    with pytest.raises(AgentError, match="no exit code"):
        p.poll()  # as often as it is asked
    # ...but what reports and assertion messages show never raises
    assert p.state().startswith("lost (") and "no exit code" in p.state()
    assert repr(p).startswith("<GuestProcess pid=42 lost (")
    entries = [ProcessEntry("x", p)]
    assert "pid 42, lost (" in describe_history(entries)


def test_a_guest_ignoring_the_window_fails_an_on_output_exec() -> None:
    """The callback holds the credit back; a guest that sends on regardless is
    refused (AgentError), and the exec ends instead of growing a queue."""
    fake = Fake()

    def guest() -> None:
        time.sleep(0.2)
        chunk = frame(STDOUT, 1, b"x" * CHUNK)
        for _ in range(HOST_WINDOW // CHUNK + 1):
            fake.sock.sendall(chunk)

    threading.Thread(target=guest, daemon=True).start()
    runs: list[ExecRun] = []

    def hold(stream: str, text: str) -> None:  # no credit back until the call failed
        call = runs[0].call
        assert call is not None
        call.done.wait(10)

    common: dict[str, Any] = dict(env={}, cwd=None, user=None, timeout=None, stdin=None, cap=1 << 20)
    runs.append(fake.client().exec(["x"], on_output=hold, **common))
    with pytest.raises(AgentError, match="beyond its window"):
        runs[0].finish(5, "x")


def test_an_on_output_exec_gives_up_at_its_timeout_while_output_keeps_coming() -> None:
    """A guest that ignores the timeout but keeps talking: the host's deadline
    (timeout + grace) still holds."""
    fake = Fake()
    stop = threading.Event()

    def guest() -> None:
        for _ in range(600):  # 60 s at most
            if stop.wait(0.1):
                return
            fake.sock.sendall(frame(STDOUT, 1, b"tick\n"))

    threading.Thread(target=guest, daemon=True).start()
    got: list[str] = []
    common: dict[str, Any] = dict(env={}, cwd=None, user=None, stdin=None, cap=1 << 20)
    run = fake.client().exec(["x"], timeout=0.5, on_output=lambda s, t: got.append(t), **common)
    started = time.monotonic()
    try:
        with pytest.raises(AgentError, match="past the timeout"):
            run.finish(0.5, "x")
    finally:
        stop.set()
    assert time.monotonic() - started < 6.5 and got  # about 1.5 s; the guest talks for 60


def test_a_guest_silent_after_started_fails_wait_instead_of_hanging() -> None:
    fake = Fake()
    threading.Timer(0.2, lambda: fake.sock.sendall(frame(STARTED, 1, b'{"pid":42}'))).start()
    p = GuestProcess.start(fake.client(), "x")
    assert p.pid == 42 and p.poll() is None
    started = time.monotonic()
    with pytest.raises(AgentError, match="has not answered"):
        p.wait()
    assert time.monotonic() - started < 10


def test_the_feed_ends_when_the_call_ended_just_as_it_was_watched() -> None:
    """The reader may set the call's first ``done`` event right after ``watch``
    swapped it: the feed still ends (at its next idle look), not at a ping timeout."""
    fake = Fake()
    feed = OutputFeed(lambda s, t: None)
    rid, call = fake.chan.start("exec", feed.sink, auto_credit=False)
    feed.watch(call)
    feed.before.set()  # what a reader holding the old event does
    started = time.monotonic()
    feed.run(fake.chan, rid, call, None, "x", None)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("op", ["exec", "pty"])
def test_a_cancel_that_comes_before_the_command_started_still_kills_it(local: AgentClient, op: str) -> None:
    """The CANCEL right behind the CALL: the agent's reader takes it while a
    worker still starts the command. A silent command was left running."""
    for _ in range(5):  # the race is the point: several tries, each must end at once
        args: dict[str, Any] = dict(argv=["sleep", "30"])
        if op == "exec":
            args.update(env={}, cwd=None, user=None, timeout=None, stdin=False)
        rid, call = local.channel.start(op, lambda k, d: None, **args)
        local.channel.cancel(rid)
        reply = local.channel.wait(call, 10, op)
        assert reply is not None and reply["rc"] == -signal.SIGKILL, reply
