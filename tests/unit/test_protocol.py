"""Frame layout and the agent's resynchronisation, on a real pipe (no VM)."""

from __future__ import annotations

import json
import os
import threading

from pytest_bottle.guest import agent
from pytest_bottle.guest.frames import CALL, DATA, HEADER, REPLY, STDOUT, SYNC, SYNC_FRAME, Channel, frame, jframe


def test_frame_layout() -> None:
    data = frame(DATA, 7, b"\x00\xffbinary")
    kind, rid, size = HEADER.unpack(data[: HEADER.size])
    assert (kind, rid, size) == (DATA, 7, 8)
    assert data[HEADER.size :] == b"\x00\xffbinary"
    call = jframe(CALL, 3, {"op": "exec"})
    assert json.loads(call[HEADER.size :]) == {"op": "exec"}


def test_channel_resyncs_after_garbage() -> None:
    r, w = os.pipe()
    chan = Channel(r)
    os.write(w, b"stale half frame from a host that left" + SYNC_FRAME + frame(DATA, 1, b"x"))
    assert chan.recv()[0] == SYNC
    assert chan.recv() == (DATA, 1, b"x")
    os.close(w)
    os.close(r)


def test_agent_exec_over_a_socketpair(tmp_path: object) -> None:
    """The real agent loop, run in-process against a socketpair, answers an exec."""
    import socket

    host, guest = socket.socketpair()
    a = agent.Agent(Channel(guest.fileno()))
    threading.Thread(target=a.serve, daemon=True).start()
    host.sendall(SYNC_FRAME + jframe(CALL, 1, {"op": "exec", "argv": ["sh", "-c", "printf 'a\\377b'"], "timeout": 10}))
    got: list[tuple[int, int, bytes]] = []
    buf = b""
    while not any(k == REPLY for k, _, _ in got):
        buf += host.recv(65536)
        while len(buf) >= HEADER.size:
            kind, rid, size = HEADER.unpack(buf[: HEADER.size])
            if len(buf) < HEADER.size + size:
                break
            got.append((kind, rid, buf[HEADER.size : HEADER.size + size]))
            buf = buf[HEADER.size + size :]
    assert got[0][0] == SYNC
    assert b"".join(p for k, _, p in got if k == STDOUT) == b"a\xffb"
    reply = json.loads(next(p for k, _, p in got if k == REPLY))
    assert reply["ok"] and reply["rc"] == 0
    _alive.extend([host, guest])  # the agent thread keeps serving; do not pull its fd away


_alive: list[object] = []
