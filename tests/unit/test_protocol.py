"""Frame layout, limits, flow-control pieces and the agent's resynchronisation,
on real pipes and socketpairs (no VM)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from harness import serve_in_thread

from pytest_bottle.agent.send import STALL_FLOOR, send_all
from pytest_bottle.guest.frames import (
    CALL,
    CHUNK,
    CREDIT,
    DATA,
    HEADER,
    HELLO,
    HOST_WINDOW,
    MAX_PAYLOAD,
    REPLY,
    STDOUT,
    SYNC,
    SYNC_FRAME,
    SYNC_MAGIC,
    WINDOW,
    Aborted,
    Channel,
    FrameWriter,
    Windows,
    credit_frame,
    frame,
    jframe,
    limit,
)


def test_frame_layout() -> None:
    data = frame(DATA, 7, b"\x00\xffbinary")
    kind, rid, size = HEADER.unpack(data[: HEADER.size])
    assert (kind, rid, size) == (DATA, 7, 8)
    assert data[HEADER.size :] == b"\x00\xffbinary"
    call = jframe(CALL, 3, {"op": "exec"})
    assert json.loads(call[HEADER.size :]) == {"op": "exec"}
    assert HEADER.unpack(credit_frame(5, 1234)[: HEADER.size]) == (CREDIT, 5, 4)


def test_limits() -> None:
    assert limit(DATA) == limit(STDOUT) == CHUNK
    assert limit(CREDIT) == 4 and limit(HELLO) == len(SYNC_MAGIC) + 16
    assert limit(CALL) == limit(REPLY) == MAX_PAYLOAD < 2**32 - 1
    assert HOST_WINDOW >= WINDOW >= CHUNK


def _recv(chan: Channel) -> tuple[int, int, bytes]:
    """chan.recv() with a timeout: a channel waiting for bytes that never come fails the test."""
    got: list[tuple[int, int, bytes]] = []
    t = threading.Thread(target=lambda: got.append(chan.recv()), daemon=True)
    t.start()
    t.join(5)
    assert got, "recv() is still waiting"
    return got[0]


def test_channel_resyncs_after_garbage() -> None:
    r, w = os.pipe()
    chan = Channel(r)
    os.write(w, b"stale half frame from a host that left" + SYNC_FRAME + frame(DATA, 1, b"x"))
    assert _recv(chan)[0] == SYNC
    assert _recv(chan) == (DATA, 1, b"x")
    os.close(w)
    os.close(r)


def test_channel_drops_whole_frames_before_the_first_sync() -> None:
    """A restarted agent must not run a CALL meant for its predecessor."""
    r, w = os.pipe()
    chan = Channel(r)
    os.write(w, jframe(CALL, 1, {"op": "exec", "argv": ["reboot"]}) + SYNC_FRAME + frame(DATA, 2, b"y"))
    assert _recv(chan)[0] == SYNC
    assert _recv(chan) == (DATA, 2, b"y")
    os.close(w)
    os.close(r)


def test_channel_treats_an_oversized_length_as_garbage() -> None:
    r, w = os.pipe()
    chan = Channel(r)
    os.write(w, SYNC_FRAME + HEADER.pack(DATA, 1, CHUNK + 1) + b"z" * 64 + SYNC_FRAME + frame(DATA, 3, b"ok"))
    assert _recv(chan)[0] == SYNC
    assert _recv(chan)[0] == SYNC  # the oversized frame is skipped up to the next SYNC
    assert _recv(chan) == (DATA, 3, b"ok")
    os.close(w)
    os.close(r)


def test_frame_writer_emits_at_most_a_chunk() -> None:
    got: list[bytes] = []
    w = FrameWriter(got.append)
    w.write(b"a" * (CHUNK + 100))
    w.write(b"b" * (2 * CHUNK))
    w.flush()
    assert all(len(g) <= CHUNK for g in got)
    assert b"".join(got) == b"a" * (CHUNK + 100) + b"b" * (2 * CHUNK)


def test_windows_block_until_credit_and_abort_wakes() -> None:
    win = Windows()
    win.open(1)
    win.take(1, HOST_WINDOW)  # the whole initial window
    taken = threading.Event()

    def take() -> None:
        win.take(1, 10)
        taken.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    assert not taken.wait(0.2)
    win.give(1, 10)
    assert taken.wait(5)
    win.open(2)
    win.take(2, HOST_WINDOW)
    errors: list[BaseException] = []

    def take_aborted() -> None:
        try:
            win.take(2, 1)
        except Aborted as e:
            errors.append(e)

    t2 = threading.Thread(target=take_aborted, daemon=True)
    t2.start()
    win.abort()
    t2.join(5)
    assert errors and not t2.is_alive()
    with pytest.raises(Aborted):
        win.take(99, 1)  # a request that is not open


def _frames(sock: socket.socket, until: int) -> list[tuple[int, int, bytes]]:
    got: list[tuple[int, int, bytes]] = []
    buf = b""
    while not any(k == until for k, _, _ in got):
        data = sock.recv(65536)  # the socket has a timeout: a silent agent fails the test
        assert data, "the agent closed the socket"
        buf += data
        while len(buf) >= HEADER.size:
            kind, rid, size = HEADER.unpack(buf[: HEADER.size])
            if len(buf) < HEADER.size + size:
                break
            got.append((kind, rid, buf[HEADER.size : HEADER.size + size]))
            buf = buf[HEADER.size + size :]
    return got


def test_agent_exec_over_a_socketpair() -> None:
    """The real agent loop, run in-process against a socketpair, answers an exec."""
    host, guest = socket.socketpair()
    host.settimeout(20)
    serve_in_thread(guest)
    host.sendall(SYNC_FRAME + jframe(CALL, 1, {"op": "exec", "argv": ["sh", "-c", "printf 'a\\377b'"], "timeout": 10}))
    got = _frames(host, REPLY)
    assert got[0][0] == HELLO and got[0][2].startswith(SYNC_MAGIC)  # unsolicited, at start
    assert len({p for k, _, p in got if k == HELLO}) == 1  # and again for the SYNC: one instance
    assert b"".join(p for k, _, p in got if k == STDOUT) == b"a\xffb"
    reply = json.loads(next(p for k, _, p in got if k == REPLY))
    assert reply["ok"] and reply["rc"] == 0
    host.close()


def test_agent_waits_for_credit_before_sending_more(tmp_path: Path) -> None:
    """A read of 3 windows stops after one window until the host grants credit."""
    host, guest = socket.socketpair()
    host.settimeout(20)
    src = tmp_path / "three-windows"
    src.write_bytes(b"q" * (3 * HOST_WINDOW))  # a file, not a pipe: read refuses FIFOs
    serve_in_thread(guest)
    host.sendall(SYNC_FRAME + jframe(CALL, 1, {"op": "read", "path": str(src)}))
    got: list[tuple[int, int, bytes]] = []
    buf, sent = b"", 0
    while True:  # frames until a whole window has come (a slow agent only makes it later)
        while len(buf) >= HEADER.size and len(buf) >= HEADER.size + HEADER.unpack(buf[: HEADER.size])[2]:
            kind, rid, size = HEADER.unpack(buf[: HEADER.size])
            got.append((kind, rid, buf[HEADER.size : HEADER.size + size]))
            buf = buf[HEADER.size + size :]
            sent += size if kind == DATA else 0
        if sent >= HOST_WINDOW:
            break
        data = host.recv(1 << 20)
        assert data, "the agent closed the channel"
        buf += data
    host.settimeout(0.5)
    with pytest.raises(TimeoutError):  # and then nothing without credit
        buf += host.recv(1 << 20)
    assert sent == HOST_WINDOW and not buf  # no more than the window, and all of it
    host.settimeout(20)
    host.sendall(credit_frame(1, 2 * HOST_WINDOW))
    rest = _frames(host, REPLY)
    assert sent + sum(len(p) for k, _, p in rest if k == DATA) == 3 * HOST_WINDOW
    assert json.loads(next(p for k, _, p in rest if k == REPLY))["ok"]
    host.close()


def test_a_send_to_a_slow_reader_goes_on_past_the_stall_floor() -> None:
    """Each write the guest takes restarts the stall limit: a frame that takes
    longer than ``STALL_FLOOR`` in all, taken a piece at a time well within it,
    goes whole (a limit counted from the start cuts it: a broken channel)."""
    host, guest = socket.socketpair()
    host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)  # holds 32 KiB
    host.settimeout(30)  # its descriptor does not block: send_all polls
    data = os.urandom(192 * 1024)  # 160 KiB past what the socket holds: 10 pieces
    got = bytearray()

    def reader() -> None:
        guest.settimeout(30)
        while len(got) < len(data):
            time.sleep(0.4)  # a piece every 0.4 s: 4 s in all, gaps far within the 2 s floor
            got.extend(guest.recv(16 * 1024))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    started = time.monotonic()
    send_all(host, data, time.monotonic())  # the call's deadline has passed: the floor is the limit
    took = time.monotonic() - started
    t.join(30)
    assert bytes(got) == data and took > STALL_FLOOR, took
    host.close()
    guest.close()
