"""A hostile guest's floods of tiny frames cost the host their bytes, not an
object per frame (the window counts bytes only): exec output, on_output, get().
And a guest that takes a call but never moves it on does not hold the host past its bounds."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_transfer_safety import HostileGuest, archive, member, reply, serve_tree

from pytest_bottle import process
from pytest_bottle.agent.calls import Gone
from pytest_bottle.agent.channel import AgentChannel
from pytest_bottle.agent.client import AgentClient
from pytest_bottle.agent.transfer import _FrameSource, fetch
from pytest_bottle.errors import AgentError, AgentTimeout
from pytest_bottle.guest.frames import (
    CHUNK,
    DATA,
    EOF,
    HEADER,
    HELLO,
    INSTANCE_SIZE,
    REPLY,
    STARTED,
    STDOUT,
    SYNC_MAGIC,
    frame,
    jframe,
)
from pytest_bottle.process import GuestProcess

TINY = 100_000  # one-byte frames: as objects, ~40 bytes each


@pytest.fixture
def guest() -> Iterator[HostileGuest]:
    g = HostileGuest()
    yield g
    g.close()


def _flooder(guest: HostileGuest, empty: int, tiny: int) -> Callable[[int, dict[str, object]], bytes]:
    """An answer sent in pieces, so that the guest's side holds little memory of its own."""

    def answer(rid: int, call: dict[str, object]) -> bytes:
        for n, one in ((empty, frame(STDOUT, rid)), (tiny, frame(STDOUT, rid, b"x"))):
            for i in range(0, n, 10_000):
                guest.peer.sendall(one * min(10_000, n - i))
        return reply(rid, rc=0)

    return answer


def _exec(guest: HostileGuest, **kw: object) -> bytes:
    client = AgentClient(guest.channel)
    run = client.exec(["flood"], env={}, cwd=None, user=None, timeout=60, stdin=None, cap=1 << 20, **kw)  # type: ignore[arg-type]
    return run.finish(10, "flood").stdout


def test_empty_and_one_byte_stdout_frames_cost_their_bytes(guest: HostileGuest, no_spare_starting: None) -> None:
    guest.answers["exec"] = _flooder(guest, 200_000, TINY)
    tracemalloc.start()
    try:
        out = _exec(guest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == b"x" * TINY
    # Kept as a part per frame, this was ~4 MB of objects for 100 KB of output (and 1.6 MB of list for the empty ones).
    assert peak < 1 << 20, f"peak {peak} bytes for {TINY} bytes of output"
    assert guest.still_answers()


def test_on_output_gets_a_flood_of_tiny_frames_merged_while_it_is_behind(guest: HostileGuest) -> None:
    calls: list[str] = []
    first = threading.Event()

    def slow_then_fast(stream: str, text: str) -> None:
        calls.append(text)
        if not first.is_set():
            first.set()
            # Behind until the reader has read it all: the reply, the last frame, ends the call.
            deadline = time.monotonic() + 30
            while guest.channel._calls and time.monotonic() < deadline:
                time.sleep(0.05)

    guest.answers["exec"] = _flooder(guest, 1000, TINY)
    _exec(guest, on_output=slow_then_fast)
    assert "".join(calls) == "x" * TINY
    # Not one call (and one queued object) per frame: merged into parts of up to 64 KiB while waiting.
    assert len(calls) < 100, len(calls)


def _one_byte_frames(guest: HostileGuest, data: bytes) -> Callable[[int, dict[str, object]], bytes]:
    def answer(rid: int, call: dict[str, object]) -> bytes:
        for i in range(0, len(data), 10_000):  # sent in pieces: the guest's side holds little
            guest.peer.sendall(
                b"".join(frame(DATA, rid, data[j : j + 1]) for j in range(i, min(i + 10_000, len(data))))
            )
        return frame(EOF, rid) + reply(rid)

    return answer


def test_get_of_a_tree_sent_in_one_byte_frames(guest: HostileGuest, tmp_path: Path) -> None:
    data = b"hello " * 2000
    tar = archive(member("d", b"5"), member("d/f", data=data))
    serve_tree(guest, tar)
    guest.answers["tar"] = _one_byte_frames(guest, tar)
    fetch(guest.channel, "/srv", tmp_path / "out")
    assert (tmp_path / "out" / "d" / "f").read_bytes() == data
    assert guest.still_answers()


def test_a_get_stream_waiting_for_its_reader_holds_parts_not_frames(guest: HostileGuest) -> None:
    """While the extraction lags (a slow disk), what waits is gathered: 100,000
    one-byte frames were 100,000 objects (~20 MB); now a couple of parts."""
    data = bytes(range(256)) * 400
    guest.answers["tar"] = _one_byte_frames(guest, data)
    source = _FrameSource(AgentClient(guest.channel))
    _, call = source.start("/srv")
    assert call.done.wait(60)  # everything arrived, nothing read yet
    assert source.buffered == len(data) and len(source.chunks) <= 4, len(source.chunks)
    assert b"".join(iter(lambda: source.read(1 << 20), b"")) == data
    assert guest.still_answers()


def test_a_get_whose_data_keeps_coming_ends_at_its_deadline(guest: HostileGuest) -> None:
    """The deadline is checked on every read, not only when the reader has to
    wait: a guest that streams as fast as the host writes is no way past it."""
    data = bytes(range(256)) * 400
    guest.answers["tar"] = _one_byte_frames(guest, data)
    source = _FrameSource(AgentClient(guest.channel))
    _, call = source.start("/srv")
    assert call.done.wait(60)  # all of it is here: no read has to wait
    with guest.channel.deadline(1.0):
        assert source.read(100) == data[:100]
        time.sleep(1.1)
        with pytest.raises(AgentTimeout, match="get did not finish in time"):
            source.read(100)
    assert guest.still_answers()


def test_stdin_to_an_agent_that_never_takes_it_ends_at_the_timeout(guest: HostileGuest) -> None:
    """Past the window (4 MiB) stdin waits for credit; a guest that gives none
    must not hold exec past its timeout and grace (it answers pings, so only a deadline ends it)."""
    guest.answers["exec"] = lambda rid, call: b""  # takes the call, never credits, never replies
    client = AgentClient(guest.channel)
    run = client.exec(["cat"], env={}, cwd=None, user=None, timeout=1, stdin=bytes(8 << 20), cap=1 << 20)
    started = time.monotonic()
    with pytest.raises(AgentTimeout):
        run.finish(1, "cat")
    assert time.monotonic() - started < 10
    assert not guest.channel._calls  # given up on: nothing it sends later is kept


def test_a_spawn_the_agent_never_confirms_is_an_agent_timeout(
    guest: HostileGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "START_TIMEOUT", 1.0)
    guest.answers["exec"] = lambda rid, call: b""  # no STARTED, no reply; pings are answered by the channel
    started = time.monotonic()
    with pytest.raises(AgentTimeout, match="did not start within 1 s"):
        GuestProcess.start(AgentClient(guest.channel), ["server"], env={}, cwd=None, user=None, input=None)
    assert time.monotonic() - started < 10
    assert guest.still_answers()


@pytest.mark.parametrize(
    ("missing", "said"),
    [(990, "stopped in the middle of a frame|hung or gone"), (9, "sent a frame no agent sends")],
    ids=["more than a HELLO", "a HELLO's header"],
)
def test_an_agent_killed_in_the_middle_of_a_frame_is_found_again(tmp_path: Path, missing: int, said: str) -> None:
    """Killed while it wrote a get()'s data, the agent's successor's HELLO was read
    as the rest of that frame, and the host waited for the rest for good: every
    call after it failed as "hung or gone", while a working agent ran.  Or, with
    less of the frame missing than a HELLO is long, the rest of the HELLO was
    read as a frame header: a protocol error, and the channel closed."""
    guest = HostileGuest(idle=0.2, dead_after=1.0)
    try:
        serve_tree(guest, b"")
        guest.answers["tar"] = lambda rid, call: HEADER.pack(DATA, rid, 10 + missing) + b"x" * 10 + guest.restart()
        started = time.monotonic()
        with pytest.raises(AgentError, match=said):
            fetch(guest.channel, "/srv", tmp_path / "out")
        assert time.monotonic() - started < 10
        assert guest.still_answers() and guest.channel.restarts == 1
    finally:
        guest.close()


def test_a_get_of_a_directory_past_its_timeout_is_an_agent_timeout(guest: HostileGuest, tmp_path: Path) -> None:
    """A timeout in the middle of a file (a guest that streams slowly) is an
    ``AgentTimeout``, at once; the extraction took it for the host's own write error
    (an ``OSError``): ``UnsafeTransfer`` "could not be written", 10 s late."""
    big = member("./f", data=bytes(1 << 20))
    serve_tree(guest, b"")
    tar = archive(big)[: 256 * 1024]  # whole frames of it, then nothing more
    guest.answers["tar"] = lambda rid, call: b"".join(
        frame(DATA, rid, tar[i : i + CHUNK]) for i in range(0, len(tar), CHUNK)
    )
    started = time.monotonic()
    with guest.channel.deadline(1.0), pytest.raises(AgentTimeout):
        fetch(guest.channel, "/srv", tmp_path / "out")
    assert time.monotonic() - started < 5
    assert not [p for p in tmp_path.rglob("*") if ".bottle-" in p.name]  # its temporary file removed
    assert guest.still_answers()


def test_wait_for_output_from_an_agent_that_stopped_answering_is_an_agent_error() -> None:
    """``wait()`` gave up on an agent that answers no ping; ``wait_for_output()``
    waited out its whole timeout and raised ``OutputTimeout``, as if the process
    had only been quiet."""
    guest = HostileGuest(idle=0.2, dead_after=1.0)
    try:
        guest.answers["exec"] = lambda rid, call: jframe(STARTED, rid, {"pid": 42})  # then nothing, pings unanswered
        p = GuestProcess.start(AgentClient(guest.channel), ["server"], env={}, cwd=None, user=None, input=None)
        started = time.monotonic()
        with pytest.raises(AgentError, match="has not answered .* hung or gone"):
            p.wait_for_output("ready", timeout=30)
        assert time.monotonic() - started < 10
    finally:
        guest.close()


def test_an_agent_killed_in_the_middle_of_a_reply_is_found_again() -> None:
    """The successor's HELLO completed a REPLY the agent was writing: its JSON
    did not decode, and the channel closed for good."""
    guest = HostileGuest()
    try:
        text = b'{"ok": true, "mode": 16877}'
        guest.answers["stat"] = lambda rid, call: HEADER.pack(REPLY, rid, len(text)) + text[:-20] + guest.restart()
        with pytest.raises(AgentError, match=r"sent a frame no agent sends \(protocol error: \w+DecodeError"):
            guest.channel.call("stat", path="/", timeout=10)
        assert guest.still_answers() and guest.channel.restarts == 1
    finally:
        guest.close()


def test_garbage_after_each_resync_closes_the_channel() -> None:
    """A guest that answers every SYNC with a HELLO and then a header no agent
    sends kept the host resyncing (tens of thousands a second): the second such
    header before any frame closes the channel, as garbage did before."""
    guest = HostileGuest()
    try:
        guest.answers["stat"] = lambda rid, call: HEADER.pack(0xEE, 0, 0)  # garbage where its reply goes
        with pytest.raises(AgentError, match="no agent sends"):
            guest.channel.call("stat", path="/", timeout=10)
        garbage = guest.restart() + HEADER.pack(0xEE, 0, 0)
        guest.before_sync = False
        guest.peer.sendall(garbage)  # and again, as it would answer each SYNC
        assert guest.channel.closed.wait(10)
        assert "protocol error" in guest.channel.death, guest.channel.death
    finally:
        guest.close()


def test_calls_after_a_resync_no_agent_answers_fail_at_once() -> None:
    """A guest that hangs in the middle of a frame: the first call fails when the
    frame stalls, the host asks for a HELLO, and none comes.  Each later call
    waited ``dead_after`` for that HELLO, was sent, and waited as long again for
    an answer: a minute per call with the defaults."""
    guest = HostileGuest(idle=0.2, dead_after=1.0)
    try:

        def hang(rid: int, call: dict[str, object]) -> bytes:
            guest.hung = True
            return HEADER.pack(REPLY, rid, 100) + b"x" * 10

        guest.answers["stat"] = hang
        with pytest.raises(AgentError, match="stopped in the middle of a frame"):
            guest.channel.call("stat", path="/")
        with pytest.raises(AgentError, match="has not answered for 1 s since the host asked it to start over"):
            guest.channel.call("stat", path="/")
        started = time.monotonic()
        with pytest.raises(AgentError, match="has not answered for 1 s since the host asked it to start over"):
            guest.channel.call("stat", path="/")
        assert time.monotonic() - started < 0.5  # it waited dead_after, and then as long again
    finally:
        guest.close()


@contextlib.contextmanager
def _blocked_send() -> Iterator[tuple[AgentChannel, socket.socket, list[BaseException], threading.Thread]]:
    """A channel whose guest reads nothing, and a thread blocked sending it more
    than the socket buffers hold: what the send raises lands in the list."""
    host, guest = socket.socketpair()
    try:
        guest.sendall(frame(HELLO, 0, SYNC_MAGIC + os.urandom(INSTANCE_SIZE)))
        channel = AgentChannel(host, "full")
        assert channel.synced.wait(10)
        failed: list[BaseException] = []

        def send() -> None:
            try:
                channel._send(frame(DATA, 1, b"x" * 60_000) * 100)
            except BaseException as e:
                failed.append(e)

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.5)
        assert sender.is_alive() and not failed
        yield channel, guest, failed, sender
        channel.close()
    finally:
        host.close()
        guest.close()


def test_a_send_cut_by_the_vm_stopping_says_why() -> None:
    """A guest that fills the host's disk while the host sends it a large input:
    QEMU stops the VM, the channel ends, and the send under way (blocked on a
    guest that reads nothing) failed as a broken write, without the reason."""
    with _blocked_send() as (channel, _, failed, sender):
        channel.end("QEMU stopped the VM: its disk D could not be written (full)")
        sender.join(10)
        assert failed and "is closed: QEMU stopped the VM: its disk D could not be written" in str(failed[0]), failed
        with pytest.raises(AgentError, match="is closed: QEMU stopped the VM"):
            channel.call("stat", path="/", timeout=5)


def test_a_send_cut_by_a_close_says_the_bottle_was_closed() -> None:
    """A large put() while another thread closes the bottle: the send met QEMU's
    end gone and said "broke: the VM's end of the channel is gone
    (BrokenPipeError)" (``Gone``) instead of why it went."""
    with _blocked_send() as (channel, guest, failed, sender):
        channel.closing = "bottle full was closed"  # what Bottle.close() says first; then QEMU goes
        guest.close()
        sender.join(10)
        assert failed and str(failed[0]) == "bottle full was closed", failed
        assert not isinstance(failed[0], Gone), failed
