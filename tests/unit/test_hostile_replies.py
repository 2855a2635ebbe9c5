"""A guest that answers oddly but stays alive: the host bounds what it takes
from it (exit codes, reply depth) and never waits on it without a deadline."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from harness import fake_agent_channel, recv_exactly

from pytest_bottle.agent import reads
from pytest_bottle.agent.calls import ProtocolError, decode_reply
from pytest_bottle.agent.client import AgentClient
from pytest_bottle.agent.replies import ExecReply, shell_status
from pytest_bottle.errors import AgentError, OutputLimit
from pytest_bottle.guest.frames import CALL, DATA, HEADER, HELLO, PING, REPLY, SYNC, SYNC_MAGIC, frame

INSTANCE = b"B" * 16
Answer = Callable[[socket.socket, int, dict[str, object]], None]


@contextlib.contextmanager
def live_guest(answer: Answer) -> Iterator[AgentClient]:
    """A fake agent that answers every PING and SYNC (so it is never taken for
    dead) and each CALL with ``answer(sock, rid, call)``."""
    channel, guest = fake_agent_channel("odd", INSTANCE)

    def serve() -> None:
        with contextlib.suppress(OSError, EOFError):
            while True:
                kind, rid, size = HEADER.unpack(recv_exactly(guest, HEADER.size))
                payload = recv_exactly(guest, size)
                if kind in (PING, SYNC):
                    guest.sendall(frame(HELLO, 0, SYNC_MAGIC + INSTANCE))
                elif kind == CALL:
                    answer(guest, rid, json.loads(payload))

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield AgentClient(channel)
    finally:
        channel.close()
        guest.close()


def test_a_read_past_its_cap_is_refused_even_when_the_guest_never_answers_the_stat_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hint after a read too large asks the guest for the file's type; a
    guest that keeps answering pings but not that stat hung read_bytes for ever."""
    monkeypatch.setattr(reads, "INSTEAD_TIMEOUT", 1.0)

    def answer(sock: socket.socket, rid: int, call: dict[str, object]) -> None:
        if call["op"] == "read":
            sock.sendall(frame(DATA, rid, b"x" * 64) + frame(REPLY, rid, b'{"ok": true, "size": 64}'))  # cap: 10
        # a stat: never answered

    with live_guest(answer) as client:
        started = time.monotonic()
        with pytest.raises(OutputLimit, match="is larger than 10 bytes: use get()"):
            reads.read_all(client, "/f", cap=10, timeout=5)
        assert time.monotonic() - started < 8


@pytest.mark.parametrize("rc", [256, 512, -65, -128, 1 << 40])
def test_an_exit_code_no_process_can_have_is_an_agent_error(rc: int) -> None:
    """256 or -128 would read as a success to a shell (mod 256): `bottle run`
    exited 0 for them while ExecResult.ok said False."""
    with pytest.raises(AgentError, match=f"an exit code no process can have: {rc}$"):
        ExecReply.parse({"rc": rc}, b"", b"", "odd")
    assert shell_status(rc) == 1


def test_shell_status_is_what_a_shell_shows() -> None:
    assert [shell_status(rc) for rc in (0, 1, 255, -9, -64)] == [0, 1, 255, 137, 192]
    assert [shell_status(rc) for rc in (None, True, "0", 256, -65)] == [1] * 5
    assert ExecReply.parse({"rc": -9}, b"", b"", "odd").rc == -9


def test_a_reply_deeper_than_the_parser_goes_is_a_protocol_error_not_a_dead_channel() -> None:
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ProtocolError, match="nested deeper than"):
        decode_reply(deep)

    def answer(sock: socket.socket, rid: int, call: dict[str, object]) -> None:
        if call["op"] == "stat":
            sock.sendall(frame(REPLY, rid, deep))  # a REPLY the JSON parser cannot descend: this call fails ...
        else:
            sock.sendall(frame(REPLY, rid, b'{"ok": true, "rc": 0}'))

    with live_guest(answer) as client:
        with pytest.raises(AgentError):
            client.stat("/f")
        assert not client.channel.closed.is_set()  # ... and the channel goes on
        assert client.channel.call("x", timeout=5) == {"ok": True, "rc": 0}


def test_a_forked_child_is_refused_its_parents_bottle_at_once() -> None:
    """Its reader thread did not survive the fork: a call would wait for a reply never read."""
    channel, guest = fake_agent_channel("parents")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what the call did, and leave without any exit handler
        started = time.monotonic()
        try:
            channel.call("ping", timeout=20)
            what = "answered"
        except BaseException as e:  # reported to the parent, whatever it is
            what = f"{type(e).__name__} {time.monotonic() - started:.1f} {e}"
        os.write(write, what.encode())
        os._exit(0)
    os.close(write)
    try:
        said = b""
        while chunk := os.read(read, 4096):
            said += chunk
        os.waitpid(pid, 0)
    finally:
        os.close(read)
        channel.close()
        guest.close()
    kind, seconds, message = said.decode().split(" ", 2)
    assert kind == "AgentError" and float(seconds) < 1.0, said
    assert message == (
        f"bottle parents belongs to process {os.getpid()}: a forked child cannot use its parent's bottles "
        "(it may start its own)"
    )
