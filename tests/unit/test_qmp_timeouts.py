"""A QEMU that does not answer in time is named with what it did not answer
(a peer speaking QMP on a socketpair stands in for it)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from pytest_bottle.vmm.qmp import QMP

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}


def _peer(sock: socket.socket, answered: set[str]) -> None:
    """Greet, then answer the commands in ``answered`` and keep quiet on the rest."""
    decoder, buf = json.JSONDecoder(), ""
    with sock:
        sock.sendall(json.dumps(GREETING).encode() + b"\n")
        while data := sock.recv(4096):  # QMP is a stream of JSON values, not of lines
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except json.JSONDecodeError:
                    break
                buf = buf.lstrip()[end:]
                if msg["execute"] in answered:
                    sock.sendall(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\n")


def test_a_command_not_answered_is_a_timeout_naming_it_and_the_bottle() -> None:
    ours, theirs = socket.socketpair()
    threading.Thread(target=_peer, args=(theirs, {"qmp_capabilities", "query-status"}), daemon=True).start()
    qmp = QMP(ours, "btl-x", timeout=0.5)
    try:
        assert qmp.cmd("query-status", timeout=10) == {}  # connected and answered, a loaded host or not
        with pytest.raises(TimeoutError, match=r"^QEMU of btl-x did not answer 'stop' within 0.5 s$"):
            qmp.cmd("stop")
        with pytest.raises(TimeoutError, match=r"did not answer 'cont' within 0.2 s$"):
            qmp.cmd("cont", timeout=0.2)
    finally:
        qmp.close(timeout=0.5)


def test_no_greeting_is_a_timeout_saying_so() -> None:
    ours, theirs = socket.socketpair()
    qmp = QMP(ours, "btl-y", timeout=0.3)
    try:
        with pytest.raises(TimeoutError, match=r"^QEMU of btl-y did not answer QMP's greeting within 0.3 s$"):
            qmp.cmd("query-status")
    finally:
        qmp.close(timeout=0.3)
        theirs.close()
