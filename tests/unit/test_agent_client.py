"""The typed agent client: its replies are checked field by field (a hostile
guest gets AgentError, never KeyError/TypeError), the handshake is what the
guest's ``identity.setup`` reads, and each operation works against the real
agent serving in this process (no VM)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import in_process_agent

from pytest_bottle.agent.calls import guest_error
from pytest_bottle.agent.client import AgentClient
from pytest_bottle.agent.handshake import Handshake, NicSetup
from pytest_bottle.agent.replies import (
    ExecReply,
    HelloReply,
    ReadReply,
    SettleReply,
    SetupReply,
    StatReply,
    UntarReply,
    WriteReply,
)
from pytest_bottle.agent.transfer import fetch
from pytest_bottle.errors import (
    AgentError,
    GuestFileNotFoundError,
    GuestIsADirectoryError,
    GuestOSError,
    SpecError,
    UnsafeTransfer,
)
from pytest_bottle.guest.frames import VERSION


class FakeChannel:
    """Answers every call with a canned reply (what a hostile guest may send)."""

    name = "fake"

    def __init__(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.calls.append((op, args))
        return self.reply

    def start(self, op: str, sink: object, **args: Any) -> tuple[int, object]:
        self.calls.append((op, args))
        return 1, object()

    def wait(self, call: object, timeout: float | None, op: str) -> None:
        return None  # nothing came in time

    def deadline(self, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def forget(self, rid: int) -> None:
        self.calls.append(("forget", {"rid": rid}))


def client(reply: dict[str, Any]) -> AgentClient:
    return AgentClient(FakeChannel(reply))  # type: ignore[arg-type]


# -- replies from a hostile guest ---------------------------------------------


@pytest.mark.parametrize("nics", [None, [], "eth0", {"52:54:00:00:00:01": 1}, {1: "eth0"}])
def test_a_bad_setup_reply_is_an_agent_error(nics: object) -> None:
    reply = {} if nics is None else {"nics": nics}
    with pytest.raises(AgentError, match="reply to setup"):
        client(reply).setup(Handshake.fresh("btl-1", []), timeout=5)


def test_a_setup_reply_without_the_nic_asked_for_is_an_agent_error() -> None:
    done = client({"nics": {"52:54:00:00:00:01": "eth0"}}).setup(Handshake.fresh("btl-1", []), timeout=5)
    assert done.nic_name("52:54:00:00:00:01") == "eth0"
    with pytest.raises(AgentError, match="no NIC with MAC 52:54:00:00:00:02"):
        done.nic_name("52:54:00:00:00:02")


@pytest.mark.parametrize("ports", [None, "22", [22, "80"], [True], {"22": 1}])
def test_a_bad_listening_reply_is_an_agent_error(ports: object) -> None:
    reply = {} if ports is None else {"ports": ports}
    with pytest.raises(AgentError, match="reply to listening"):
        client(reply).listening()


def test_listening_ports() -> None:
    assert client({"ports": [22, 80]}).listening().ports == frozenset({22, 80})


@pytest.mark.parametrize(
    ("reply", "parse"),
    [
        ({"version": "1", "boot_id": "b", "uptime": 1.0}, lambda r: HelloReply.parse(r, "x")),
        ({"version": 1, "boot_id": "b"}, lambda r: HelloReply.parse(r, "x")),
        ({"state": None, "quiet": 1.0}, lambda r: SettleReply.parse(r, "x")),
        ({"state": "running", "quiet": "1", "busy": "", "running": []}, lambda r: SettleReply.parse(r, "x")),
        ({"state": "running", "quiet": 1, "running": []}, lambda r: SettleReply.parse(r, "x")),
        ({"state": "running", "quiet": 1, "busy": "the kernel", "running": []}, lambda r: SettleReply.parse(r, "x")),
        ({"state": "", "quiet": 1, "busy": "systemd"}, lambda r: SettleReply.parse(r, "x")),
        ({"state": "", "quiet": 1, "busy": "systemd", "running": ["a"] * 6}, lambda r: SettleReply.parse(r, "x")),
        ({"state": "", "quiet": 1, "busy": "systemd", "running": ["a\x1b[2J"]}, lambda r: SettleReply.parse(r, "x")),
        ({"state": "", "quiet": 1, "busy": "systemd", "running": [3]}, lambda r: SettleReply.parse(r, "x")),
        ({"size": "3", "path": "/x"}, lambda r: WriteReply.parse(r, "x")),
        ({"size": 3}, lambda r: WriteReply.parse(r, "x")),
        ({"size": True}, lambda r: ReadReply.parse(r, "x")),
        ({}, lambda r: ReadReply.parse(r, "x")),
        # Numbers no float holds, or that are no number at all (JSON's NaN and Infinity parse).
        ({"version": 1, "boot_id": "b", "uptime": 10**400}, lambda r: HelloReply.parse(r, "x")),
        ({"version": 1, "boot_id": "b", "uptime": float("nan")}, lambda r: HelloReply.parse(r, "x")),
        ({"state": "", "quiet": float("inf"), "busy": "", "running": []}, lambda r: SettleReply.parse(r, "x")),
    ],
)
def test_bad_fields_are_agent_errors(reply: dict[str, Any], parse: Any) -> None:
    with pytest.raises(AgentError, match="has a bad"):
        parse(reply)


def test_good_replies_parse() -> None:
    assert HelloReply.parse({"version": 1, "boot_id": "b", "uptime": 3}, "x") == HelloReply(1, "b", 3.0)
    good = {"state": "running", "quiet": 1, "busy": "", "running": []}
    assert SettleReply.parse(good, "x") == SettleReply("running", 1.0, "")
    busy = {"state": "", "quiet": 0, "busy": "systemd", "running": ["hang.service"]}
    assert SettleReply.parse(busy, "x") == SettleReply("", 0.0, "systemd", ("hang.service",))
    assert WriteReply.parse({"size": 3, "path": "/x"}, "x") == WriteReply(3, "/x")
    assert SetupReply.parse({"nics": {}}, "x").nics == {}


@pytest.mark.parametrize("rc", [None, "0", True, 1.0])
def test_an_exec_reply_without_an_exit_code_is_an_agent_error(rc: object) -> None:
    with pytest.raises(AgentError, match="reply to exec has no exit code"):
        ExecReply.parse({"rc": rc}, b"", b"", "x")


def test_an_exec_reply_keeps_a_short_spawn_note() -> None:
    got = ExecReply.parse({"rc": 127, "stderr_text": "x" * 10_000, "timed_out": False}, b"out", b"err", "x")
    assert (got.rc, got.timed_out, got.stdout) == (127, False, b"out")
    assert got.stderr == b"err" + b"x" * 4096


def test_an_exec_unanswered_past_its_timeout_is_an_agent_error() -> None:
    fake = FakeChannel({})
    agent = AgentClient(fake)  # type: ignore[arg-type]
    with pytest.raises(AgentError, match=r"^bottle fake: no answer 10 s past the timeout of 'sleep 9'$"):
        agent.exec(["sleep", "9"], env={}, cwd=None, user=None, timeout=1, stdin=None, cap=1).finish(10, "sleep 9")
    assert fake.calls[-1] == ("forget", {"rid": 1})  # given up on: nothing it sends later is kept


@pytest.mark.parametrize("info", [{"mode": "0755", "is_dir": False}, {"mode": 0o644}, {"is_dir": 1, "mode": 1}])
def test_a_bad_stat_reply_refuses_the_transfer(info: dict[str, Any]) -> None:
    with pytest.raises(UnsafeTransfer, match="malformed stat reply"):
        StatReply.parse(info, "/f")


def test_untar_refusals() -> None:
    assert UntarReply.parse({}).refused is None
    assert UntarReply.parse({"refused": "x"}).refused is None
    assert UntarReply.parse({"refused": {"path": 1, "reason": "r" * 5000}}).refused == ("1", "r" * 4096)


@pytest.mark.parametrize("errno", [[1], {"a": 1}, "2", 2.5])
def test_a_failure_reply_with_a_bad_errno_is_still_a_guest_os_error(errno: object) -> None:
    err = guest_error({"ok": False, "error": "boom", "errno": errno, "path": ["x"]}, "read")
    assert type(err) is GuestOSError and (err.errno, err.filename) == (None, None)


@pytest.mark.parametrize("mode", [-1, 1 << 40])
def test_a_stat_mode_out_of_range_refuses_the_transfer(mode: int) -> None:
    with pytest.raises(UnsafeTransfer, match="malformed stat reply"):
        StatReply.parse({"mode": mode, "is_dir": False}, "/x")


def test_a_guests_error_text_is_cut() -> None:
    assert len(str(guest_error({"error": "x" * (4 << 20)}, "tar"))) < 5000


def test_failure_replies_map_to_host_errors() -> None:
    err = guest_error({"ok": False, "error": "gone", "errno": 2, "type": "OSError", "path": "/x"}, "read")
    assert isinstance(err, GuestFileNotFoundError) and err.filename == "/x"
    assert err.strerror == "No such file or directory"  # as the host's own OSError has it
    err = guest_error({"ok": False, "error": "x", "errno": 21, "type": "OSError", "path": "/opt/d"}, "write")
    assert isinstance(err, GuestOSError) and err.strerror == "Is a directory"
    for far in (1 << 70, -(1 << 70)):  # a hostile guest's errno: no OverflowError out of the error itself
        err = guest_error({"ok": False, "error": "x", "errno": far, "type": "OSError"}, "read")
        assert isinstance(err, GuestOSError) and err.strerror is None
    assert isinstance(guest_error({"error": "ValueError: no user", "type": "ValueError"}, "exec"), SpecError)
    assert str(guest_error({"error": "RuntimeError: x"}, "tar")) == "agent error during tar: RuntimeError: x"


# -- the handshake -------------------------------------------------------------


def test_a_fresh_handshake_is_new_each_time() -> None:
    a, b = Handshake.fresh("btl-1", []), Handshake.fresh("btl-1", [])
    assert a.entropy != b.entropy and a.machine_id != b.machine_id and len(a.entropy) == 64
    assert len(a.machine_id) == 32 and b.time_ns >= a.time_ns
    assert Handshake.fresh("seed", [], machine_id="0" * 32).machine_id == "0" * 32


def test_the_handshake_on_the_wire() -> None:
    user = NicSetup("52:54:00:00:00:01", "52:54:00:b0:77:01", "ens3", ip="10.0.2.15/24", announce=False)
    lan = NicSetup("52:54:00:00:00:02", "52:54:00:b0:77:02", ip="192.168.7.2/24", gateway=None)
    shake = Handshake.fresh(
        "btl-1", [user, lan], ssh_host_key=("priv", "pub"), baked={"resolv_conf": "", "authorized_keys": None}
    )
    call = shake.to_call()
    assert call == {
        "entropy": shake.entropy.hex(),
        "time_ns": shake.time_ns,
        "hostname": "btl-1",
        "machine_id": shake.machine_id,
        "ssh_host_key": {"private": "priv", "public": "pub"},
        "resolv_conf": "",  # an empty one is still written
        "nics": [
            {
                "match": "52:54:00:b0:77:01",
                "mac": "52:54:00:00:00:01",
                "name": "ens3",
                "ip": "10.0.2.15/24",
                "announce": False,
            },
            {"match": "52:54:00:b0:77:02", "mac": "52:54:00:00:00:02", "ip": "192.168.7.2/24"},
        ],
    }
    assert Handshake.fresh("s", [], list_nics=True).to_call()["list_nics"] is True


def test_unknown_baked_values_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown handshake values"):
        Handshake.fresh("btl-1", [], baked={"hostname": "x"})


def test_setup_sends_the_handshake() -> None:
    fake = FakeChannel({"nics": {"m": "eth0"}})
    shake = Handshake.fresh("btl-1", [NicSetup("m", "m")])
    AgentClient(fake).setup(shake, timeout=7)  # type: ignore[arg-type]
    assert fake.calls == [("setup", dict(shake.to_call(), timeout=7))]


# -- against the real agent, in this process ------------------------------------


@pytest.fixture(scope="module")
def local() -> Iterator[AgentClient]:
    with in_process_agent() as channel:
        yield AgentClient(channel)


def test_a_write_onto_a_directory_names_the_path_once(local: AgentClient, tmp_path: Path) -> None:
    """The rename's error named the temporary file twice, shown as the path: "'p' -> 'p'"."""
    (tmp_path / "d").mkdir()
    with pytest.raises(GuestOSError) as info:
        local.write(str(tmp_path / "d"), b"x", timeout=10)
    assert info.value.errno == errno.EISDIR and info.value.filename == str(tmp_path / "d")
    assert str(info.value) == f"in the guest: [Errno 21] Is a directory: {str(tmp_path / 'd')!r}"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary file left


def test_a_trees_sockets_are_named_with_what_get_skipped(local: AgentClient, tmp_path: Path) -> None:
    """tar has no member for a socket: it was left out without a word, while a
    FIFO beside it was named in ``UnsafeTransfer.skipped``."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    os.mkfifo(src / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "sock"))
        with pytest.raises(UnsafeTransfer, match=r"^.*2 member\(s\) not copied, the rest was") as info:
            fetch(local, str(src), tmp_path / "dst")
    assert sorted(os.path.basename(p) for p in info.value.skipped) == ["fifo", "sock"], info.value
    assert "a socket: only files, directories and links are copied" in info.value.reason
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["a"]


def test_get_takes_the_users_umask_too(local: AgentClient, tmp_path: Path, no_spare_starting: None) -> None:
    """Modes were masked with 0o755 alone: under a umask of 077 a guest's 0o755
    file still arrived readable by every user of the host."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "tool").write_text("t")
    (src / "d" / "tool").chmod(0o4777)
    (src / "one").write_text("o")
    (src / "one").chmod(0o664)
    old = os.umask(0o077)
    try:
        fetch(local, str(src), tmp_path / "dst")
        fetch(local, str(src / "one"), tmp_path / "got")
    finally:
        os.umask(old)
    modes = [(tmp_path / p).stat().st_mode & 0o7777 for p in ("dst/d", "dst/d/tool", "dst/one", "got")]
    assert modes == [0o700, 0o700, 0o600, 0o600], [oct(m) for m in modes]


def test_write_stat_and_read(local: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "d" / "f"
    done = local.write(str(target), b"x" * 300_000, mode=0o640, timeout=30)
    assert done == WriteReply(300_000, str(target))
    info = local.stat(str(target))
    assert (info.mode & 0o777, info.is_dir) == (0o640, False)
    got: list[bytes] = []
    assert local.read(str(target), lambda kind, data: got.append(data), timeout=30).size == 300_000
    assert b"".join(got) == b"x" * 300_000
    with open(target, "rb") as f:
        assert local.write(str(tmp_path), f, into_dir="copy", timeout=30).path == str(tmp_path / "copy")


def test_reading_a_fifo_is_refused_at_once_and_leaves_it_unopened(local: AgentClient, tmp_path: Path) -> None:
    """Its open waited for a writer until the call's timeout, in an agent thread
    no cancel reached (one more per try), and swallowed that writer's data."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(GuestOSError, match="Is a FIFO") as info:
        local.read(str(fifo), lambda kind, data: None, timeout=5)
    assert time.monotonic() - started < 2 and info.value.errno == errno.EINVAL, info.value
    with pytest.raises(OSError) as no_reader:  # nothing holds it open for reading
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert no_reader.value.errno == errno.ENXIO
    got: list[bytes] = []  # /proc still reads as before
    local.read("/proc/self/status", lambda kind, data: got.append(data), timeout=5)
    assert b"Name:" in b"".join(got)


def test_reading_a_directory_names_it_and_leaks_no_descriptor(
    local: AgentClient, tmp_path: Path, no_spare_starting: None
) -> None:
    """Opened without blocking, a directory was handed to open() by its fd: the
    error named the fd number, and the descriptor stayed open in the agent."""
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(GuestIsADirectoryError) as info:
            local.read(str(tmp_path), lambda kind, data: None, timeout=5)
        assert info.value.filename == str(tmp_path), info.value
    assert len(os.listdir("/proc/self/fd")) == before


def test_exec_collects_output(local: AgentClient) -> None:
    argv = ["/bin/sh", "-c", "cat; echo err >&2; exit 3"]
    common: dict[str, Any] = dict(env={}, cwd="/", user=None, cap=4)
    got = local.exec(argv, timeout=30, stdin=b"input", **common).finish(5, "cat")
    assert (got.rc, got.timed_out, got.stdout) == (3, False, b"inpu" + got.stdout[4:])
    assert got.stdout.startswith(b"inpu\n[pytest-bottle: output truncated: 1 bytes")
    assert got.stderr == b"err\n"
    slow = local.exec(["sleep", "10"], timeout=0.5, stdin=None, **common).finish(5, "sleep")
    assert slow.timed_out


def test_a_missing_file_is_the_guests_error(local: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(GuestFileNotFoundError):
        local.stat(str(tmp_path / "nothing"))
    assert local.hello(timeout=10).version == VERSION
