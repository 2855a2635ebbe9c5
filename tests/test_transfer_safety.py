"""get() and put() against hostile input.

The hostile-guest tests put a peer on a socketpair that speaks the real frame
format and answers ``stat``/``tar``/``read`` with crafted frames, exactly what
a guest whose agent was replaced could send; the host side is the real
``AgentChannel`` and the real ``transfer.fetch`` that ``Bottle.get`` calls.
The put tests run the real agent's ``untar`` (in-process, on a socketpair) and
a real bottle.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import in_process_agent, recv_exactly

from pytest_bottle import Bottle
from pytest_bottle.agent.channel import AgentChannel
from pytest_bottle.agent.transfer import fetch, send_tree
from pytest_bottle.errors import AgentError, GuestOSError, UnsafeTransfer
from pytest_bottle.guest.frames import (
    CALL,
    CANCEL,
    CHUNK,
    DATA,
    EOF,
    HEADER,
    HELLO,
    INSTANCE_SIZE,
    REPLY,
    SYNC,
    SYNC_MAGIC,
    frame,
    jframe,
)
from pytest_bottle.guest.untar import GET

Answer = Callable[[int, dict[str, object]], bytes]


class HostileGuest:
    """The guest end of a socketpair, answering each operation with canned frames."""

    def __init__(self, **liveness: float) -> None:
        host, self.peer = socket.socketpair()
        self.channel = AgentChannel(host, "hostile", **liveness)  # it never answers a PING
        host.close()  # the channel keeps its own dup
        self.answers: dict[str, Answer] = {"hello": lambda rid, call: reply(rid, version=1)}
        self.cancelled: list[int] = []
        self.instance = os.urandom(INSTANCE_SIZE)
        self.before_sync = False  # it takes calls without the SYNC a real agent waits for
        self.hung = False  # reads and answers nothing (not even a SYNC)
        self.peer.sendall(frame(HELLO, 0, SYNC_MAGIC + self.instance))  # what a starting agent says first
        threading.Thread(target=self._serve, daemon=True).start()

    def restart(self) -> bytes:
        """Be a new agent (a new instance id) that drops every frame until a SYNC,
        as a real one does; its HELLO, for the caller to send."""
        self.instance = os.urandom(INSTANCE_SIZE)
        self.before_sync = True
        return frame(HELLO, 0, SYNC_MAGIC + self.instance)

    def _serve(self) -> None:
        try:
            while True:
                kind, rid, size = HEADER.unpack(recv_exactly(self.peer, HEADER.size))
                payload = recv_exactly(self.peer, size) if size else b""
                if self.hung:
                    continue
                if kind == SYNC:  # as the agent: a HELLO, and calls are taken again
                    self.before_sync = False
                    self.peer.sendall(frame(HELLO, 0, SYNC_MAGIC + self.instance))
                elif self.before_sync:
                    continue
                elif kind == CALL:
                    call = json.loads(payload)
                    self.peer.sendall(self.answers[call["op"]](rid, call))
                elif kind == CANCEL:
                    self.cancelled.append(rid)
        except (EOFError, OSError):
            pass

    def still_answers(self) -> bool:
        return bool(self.channel.call("hello", timeout=10)["version"] == 1)

    def close(self) -> None:
        self.channel.close()
        self.peer.close()


def reply(rid: int, **fields: object) -> bytes:
    return jframe(REPLY, rid, dict(fields, ok=True))


def stream(rid: int, data: bytes) -> bytes:
    """What the agent sends for ``tar`` and ``read``: DATA frames, EOF, the reply."""
    out = [frame(DATA, rid, data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]
    return b"".join(out) + frame(EOF, rid) + reply(rid)


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs: object) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    out = info.tobuf(tarfile.PAX_FORMAT)
    return out + data + bytes(-len(data) % 512) if kind == tarfile.REGTYPE else out


def archive(*members: bytes) -> bytes:
    return member(".", tarfile.DIRTYPE) + b"".join(members) + bytes(1024)


@pytest.fixture
def guest() -> Iterator[HostileGuest]:
    g = HostileGuest()
    yield g
    g.close()


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    """A host file outside every destination that no get() may touch."""
    path = tmp_path / "host.txt"
    path.write_text("host data\n")
    path.chmod(0o640)
    return path


def serve_tree(guest: HostileGuest, tar: bytes) -> None:
    guest.answers["stat"] = lambda rid, call: reply(rid, mode=0o40755, size=4096, is_dir=True)
    guest.answers["tar"] = lambda rid, call: stream(rid, tar)


def serve_file(guest: HostileGuest, data: bytes, mode: int = 0o100644) -> None:
    guest.answers["stat"] = lambda rid, call: reply(rid, mode=mode, size=len(data), is_dir=False)
    guest.answers["read"] = lambda rid, call: stream(rid, data)


def outside(tmp_path: Path, dst: Path) -> set[Path]:
    """Everything under ``tmp_path`` that is not inside ``dst``."""
    return {p for p in tmp_path.rglob("*") if dst not in p.parents and p != dst}


def refused(guest: HostileGuest, tmp_path: Path, host_file: Path, tar: bytes, match: str) -> Path:
    """get() of ``tar`` raises UnsafeTransfer, leaves the host file and everything
    outside the destination as they were, and the channel still answers."""
    dst = tmp_path / "dst"
    before = outside(tmp_path, dst)
    serve_tree(guest, tar)
    with pytest.raises(UnsafeTransfer, match=match) as info:
        fetch(guest.channel, "/srv", dst)
    assert info.value.op == "get" and info.value.reason
    assert host_file.read_text() == "host data\n" and stat.S_IMODE(host_file.stat().st_mode) == 0o640
    assert outside(tmp_path, dst) == before
    assert not [p for p in dst.rglob("*") if ".bottle-" in p.name]  # no temporary file left
    assert guest.still_answers()
    return dst


# -- hostile guest: paths ----------------------------------------------------


def test_dotdot_member_is_refused(guest: HostileGuest, tmp_path: Path, host_file: Path) -> None:
    tar = archive(member("ok.txt", data=b"ok"), member("../host.txt", data=b"pwned"), member("../new.txt"))
    dst = refused(guest, tmp_path, host_file, tar, r"'\.\./host\.txt'.*'\.\.'")
    assert (dst / "ok.txt").read_bytes() == b"ok"  # what came before the refused member stays
    assert not (tmp_path / "new.txt").exists()


def test_absolute_member_is_refused(guest: HostileGuest, tmp_path: Path, host_file: Path) -> None:
    refused(guest, tmp_path, host_file, archive(member(str(host_file), data=b"pwned")), "absolute")
    refused(guest, tmp_path, host_file, archive(member(str(tmp_path / "abs.txt"), data=b"x")), "absolute")
    assert not (tmp_path / "abs.txt").exists()


@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_hardlink_to_a_host_file_then_a_same_named_member(
    guest: HostileGuest, tmp_path: Path, host_file: Path, link: str
) -> None:
    target = str(host_file) if link == "absolute" else "../host.txt"
    tar = archive(member("victim", tarfile.LNKTYPE, linkname=target), member("victim", data=b"pwned\n"))
    refused(guest, tmp_path, host_file, tar, "hard link")


def test_no_tarfile_filter_is_needed(
    guest: HostileGuest, tmp_path: Path, host_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian 12's own python3.11 has no extraction filters: the policy does not depend on them."""
    for name in ("data_filter", "tar_filter", "fully_trusted_filter"):
        monkeypatch.delattr(tarfile, name, raising=False)
    tar = archive(member("victim", tarfile.LNKTYPE, linkname=str(host_file)), member("victim", data=b"pwned\n"))
    refused(guest, tmp_path, host_file, tar, "hard link")
    refused(guest, tmp_path, host_file, archive(member("../x", data=b"x")), "'..'")


def test_a_hardlink_already_in_dst_is_replaced_not_written_through(
    guest: HostileGuest, tmp_path: Path, host_file: Path
) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    os.link(host_file, dst / "data")  # left by the user, or by an earlier get
    serve_tree(guest, archive(member("data", data=b"from the guest\n")))
    fetch(guest.channel, "/srv", dst)
    assert (dst / "data").read_text() == "from the guest\n"
    assert host_file.read_text() == "host data\n"


def test_hardlink_to_an_earlier_member_is_kept(guest: HostileGuest, tmp_path: Path) -> None:
    tar = archive(member("a", data=b"shared"), member("b", tarfile.LNKTYPE, linkname="./a"))
    serve_tree(guest, tar)
    fetch(guest.channel, "/srv", tmp_path / "dst")
    a, b = (tmp_path / "dst" / "a").stat(), (tmp_path / "dst" / "b").stat()
    assert (a.st_ino, (tmp_path / "dst" / "b").read_bytes()) == (b.st_ino, b"shared")


# -- hostile guest: symlinks -------------------------------------------------


@pytest.mark.parametrize(
    ("links", "match"),
    [
        ([("out", "..")], "outside the destination"),
        ([("out", "/")], "absolute"),
        ([("d/", ""), ("d/up", ".."), ("d/out", "up/..")], "after a name"),
        ([("out", "../dst/../..")], "after a name"),
    ],
)
def test_symlink_leading_out_is_refused(
    guest: HostileGuest, tmp_path: Path, host_file: Path, links: list[tuple[str, str]], match: str
) -> None:
    members = [
        member(n, tarfile.DIRTYPE) if n.endswith("/") else member(n, tarfile.SYMTYPE, linkname=t) for n, t in links
    ]
    dst = refused(guest, tmp_path, host_file, archive(*members, member("out/host.txt", data=b"pwned")), match)
    assert not (dst / "out").is_symlink()
    assert (dst / "out" / "host.txt").read_bytes() == b"pwned"  # skipped, not stopped: the rest lands inside


def test_no_member_is_written_through_a_symlink(guest: HostileGuest, tmp_path: Path, host_file: Path) -> None:
    """A symlink inside dst is fine, but nothing is ever written through one:
    neither one from the same stream nor one already in dst."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "planted").symlink_to(tmp_path)  # pointing out, as a user may have left it
    tar = archive(member("planted/host.txt", data=b"pwned"))
    refused(guest, tmp_path, host_file, tar, "'planted' on its path is a symlink")
    tar = archive(member("sub", tarfile.DIRTYPE), member("here", tarfile.SYMTYPE, linkname="sub"), member("here/f"))
    refused(guest, tmp_path, host_file, tar, "'here' on its path is a symlink")
    assert not (dst / "sub" / "f").exists()


def test_inside_symlinks_are_kept(guest: HostileGuest, tmp_path: Path) -> None:
    tar = archive(
        member("lib", tarfile.DIRTYPE),
        member("lib/libx.so.1", data=b"elf"),
        member("lib/libx.so", tarfile.SYMTYPE, linkname="libx.so.1"),
        member("bin", tarfile.DIRTYPE),
        member("bin/x", tarfile.SYMTYPE, linkname="../lib/libx.so"),
    )
    serve_tree(guest, tar)
    fetch(guest.channel, "/srv", tmp_path / "dst")
    assert (tmp_path / "dst" / "bin" / "x").read_bytes() == b"elf"
    assert os.readlink(tmp_path / "dst" / "bin" / "x") == "../lib/libx.so"


def test_absolute_symlinks_inside_the_copied_directory_are_kept_relative(guest: HostileGuest, tmp_path: Path) -> None:
    """Debian's /etc/nginx/sites-enabled/default -> /etc/nginx/sites-available/default:
    a link to an absolute path inside what get() copies leads to the same entry
    of the copy; one elsewhere, or with a '..', is still skipped."""
    tar = archive(
        member("sites-available", tarfile.DIRTYPE),
        member("sites-available/default", data=b"server {}\n"),
        member("sites-enabled", tarfile.DIRTYPE),
        member("sites-enabled/default", tarfile.SYMTYPE, linkname="/etc/nginx/sites-available/default"),
        member("top", tarfile.SYMTYPE, linkname="/etc/nginx/"),
        member("dotted", tarfile.SYMTYPE, linkname="/etc/nginx/./sites-available//default"),
        member("slashes", tarfile.SYMTYPE, linkname="//etc/./nginx//sites-available/default"),
        member("sites-enabled/up", tarfile.SYMTYPE, linkname="/etc/nginx/../shadow"),
        member("sites-enabled/around", tarfile.SYMTYPE, linkname="/etc/../etc/nginx/sites-available/default"),
        member("sites-enabled/near", tarfile.SYMTYPE, linkname="/etc/nginxother/x"),
        member("sites-enabled/out", tarfile.SYMTYPE, linkname="/etc/shadow"),
    )
    serve_tree(guest, tar)
    dst = tmp_path / "nginx"
    with pytest.raises(UnsafeTransfer, match=r"4 member\(s\) not copied") as info:
        fetch(guest.channel, "//etc/nginx/.", dst)  # as the user may write it
    assert info.value.skipped == ("sites-enabled/up", "sites-enabled/around", "sites-enabled/near", "sites-enabled/out")
    assert os.readlink(dst / "slashes") == "sites-available/default"
    assert os.readlink(dst / "sites-enabled" / "default") == "../sites-available/default"
    assert (dst / "sites-enabled" / "default").read_text() == "server {}\n"
    assert os.readlink(dst / "top") == "." and os.readlink(dst / "dotted") == "sites-available/default"
    assert guest.still_answers()


def test_a_link_too_long_once_relative_is_skipped_and_the_rest_copied(guest: HostileGuest, tmp_path: Path) -> None:
    """A deep link to a long path inside what is fetched: relative, its '..'s
    would pass what symlink(2) takes, so it is skipped like any absolute one."""
    deep = "/".join(["d"] * 100)
    target = "/srv/" + "/".join(["y" * 200] * 19) + "/" + "z" * 100  # < 4096 bytes as it is
    serve_tree(guest, archive(member(f"{deep}/l", tarfile.SYMTYPE, linkname=target), member("after", data=b"1")))
    with pytest.raises(UnsafeTransfer, match="a symlink to an absolute path") as info:
        fetch(guest.channel, "/srv", tmp_path / "dst")
    assert info.value.skipped == (f"{deep}/l",)
    assert (tmp_path / "dst" / "after").read_bytes() == b"1"


def test_a_get_of_the_root_keeps_every_absolute_symlink_relative(guest: HostileGuest, tmp_path: Path) -> None:
    tar = archive(
        member("etc", tarfile.DIRTYPE),
        member("etc/localtime", tarfile.SYMTYPE, linkname="/usr/share/zoneinfo/UTC"),
        member("usr", tarfile.SYMTYPE, linkname="/"),
    )
    serve_tree(guest, tar)
    fetch(guest.channel, "/", tmp_path / "root")
    assert os.readlink(tmp_path / "root" / "etc" / "localtime") == "../usr/share/zoneinfo/UTC"
    assert os.readlink(tmp_path / "root" / "usr") == "."


# -- hostile guest: modes, owners, special files, sizes ---------------------


def test_modes_lose_set_id_bits_and_owners_are_ours(guest: HostileGuest, tmp_path: Path) -> None:
    tar = archive(
        member("suid", data=b"#!/bin/sh\n", mode=0o6755, uid=1234, gid=1234),
        member("open", data=b"x", mode=0o777),
        member("gw", data=b"x", mode=0o664),
        member("sticky", tarfile.DIRTYPE, mode=0o3777, uid=1234),
        member("ro", tarfile.DIRTYPE, mode=0o555),
        member("ro/inner", data=b"y", mode=0o400),
        member("shut", tarfile.DIRTYPE, mode=0o000),
        member("shut/in", data=b"z", mode=0o000),
    )
    serve_tree(guest, tar)
    dst = tmp_path / "dst"
    fetch(guest.channel, "/srv", dst)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in dst.rglob("*")}
    # A directory keeps its owner's rwx: whatever the guest said, the host user can empty and remove it.
    assert modes == {
        "suid": 0o755, "open": 0o755, "gw": 0o644, "sticky": 0o755, "ro": 0o755, "inner": 0o400, "shut": 0o700,
        "in": 0o000,
    }  # fmt: skip
    assert {p.stat().st_uid for p in dst.rglob("*")} == {os.geteuid()}


@pytest.mark.parametrize(
    ("kind", "what"),
    [(tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block device"), (tarfile.FIFOTYPE, "fifo")],
)
def test_special_files_are_refused(
    guest: HostileGuest, tmp_path: Path, host_file: Path, kind: bytes, what: str
) -> None:
    tar = archive(member("node", kind, devmajor=1, devminor=3, mode=0o666), member("after", data=b"a"))
    dst = refused(guest, tmp_path, host_file, tar, what)
    assert not os.path.lexists(dst / "node")
    assert (dst / "after").read_bytes() == b"a"


def test_huge_sizes_are_refused_before_reading(guest: HostileGuest, tmp_path: Path, host_file: Path) -> None:
    huge = tarfile.TarInfo("huge")
    huge.size = 1 << 50
    refused(guest, tmp_path, host_file, archive(huge.tobuf(tarfile.PAX_FORMAT)), "limit of")
    pax = tarfile.TarInfo("x")
    pax.type, pax.size = tarfile.XHDTYPE, 1 << 40
    refused(guest, tmp_path, host_file, archive(pax.tobuf(tarfile.GNU_FORMAT)), "extended header")


@pytest.mark.parametrize(
    ("name", "match"), [("a/" * 2100 + "f", "overlong"), ("d/" + "n" * 300, "longer than 255"), ("a\0b", "malformed")]
)
def test_name_bounds(guest: HostileGuest, tmp_path: Path, host_file: Path, name: str, match: str) -> None:
    refused(guest, tmp_path, host_file, archive(_with_pax_path(name)), match)


def _with_pax_path(name: str) -> bytes:
    """A pax header naming the next member verbatim, as a hostile guest would."""
    records = f"path={name}\n".encode()
    size = len(records) + 1
    while len(f"{size} ".encode()) + len(records) != size:
        size = len(f"{size} ".encode()) + len(records)
    data = f"{size} ".encode() + records
    head = tarfile.TarInfo("././@PaxHeader")
    head.type, head.size = tarfile.XHDTYPE, len(data)
    return head.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512) + member("x")


def _pax_header(records: bytes) -> bytes:
    head = tarfile.TarInfo("././@PaxHeader")
    head.type, head.size = tarfile.XHDTYPE, len(records)
    return head.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)


def _pax_record(key: str, value: bytes) -> bytes:
    body = key.encode() + b"=" + value + b"\n"
    size = len(body) + 1
    while len(b"%d " % size) + len(body) != size:
        size = len(b"%d " % size) + len(body)
    return b"%d " % size + body


def test_a_run_of_extended_headers_is_bounded_as_one(guest: HostileGuest, tmp_path: Path, host_file: Path) -> None:
    """Each header under 1 MiB, but a run of them before one member is held together: 1 MiB in all."""
    big = _pax_header(b"".join(_pax_record(f"x.k{i}", bytes(1000)) for i in range(400)))  # ~400 KB each
    refused(guest, tmp_path, host_file, archive(big, big, big, member("f")), "extended headers of .* for one member")
    # Keys nobody reads are not kept: a run within the bound still names its member.
    small = _pax_header(_pax_record("comment", b"x" * 100) + _pax_record("path", b"named"))
    serve_tree(guest, archive(small, small, member("f", data=b"1")))
    fetch(guest.channel, "/srv", tmp_path / "ok")
    assert (tmp_path / "ok" / "named").read_bytes() == b"1"


def test_parents_the_archive_does_not_list_count_as_members(guest: HostileGuest, tmp_path: Path) -> None:
    """Each directory made for a member's path costs an inode: 10 members 4 levels deep are 50 entries."""
    tar = archive(*(member(f"a{i}/b/c/d/f") for i in range(10)))
    serve_tree(guest, tar)
    with pytest.raises(UnsafeTransfer, match="more than the limit of 40 members"):
        fetch(guest.channel, "/srv", tmp_path / "a", GET._replace(max_members=40))
    serve_tree(guest, tar)
    fetch(guest.channel, "/srv", tmp_path / "b", GET._replace(max_members=60))
    assert len(list((tmp_path / "b").rglob("f"))) == 10
    assert guest.still_answers()


def test_member_and_byte_limits(guest: HostileGuest, tmp_path: Path) -> None:
    serve_tree(guest, archive(*(member(f"f{i}", data=b"x") for i in range(20))))
    with pytest.raises(UnsafeTransfer, match="more than the limit of 10 members"):
        fetch(guest.channel, "/srv", tmp_path / "a", GET._replace(max_members=10))
    serve_tree(guest, archive(member("big", data=bytes(3 << 20))))
    with pytest.raises(UnsafeTransfer, match="more than the limit of 1048576 bytes"):
        fetch(guest.channel, "/srv", tmp_path / "b", GET._replace(max_bytes=1 << 20))
    assert not (tmp_path / "b" / "big").exists()
    assert guest.still_answers()


@pytest.mark.parametrize(
    "junk",
    [b"not a tar at all" * 64, archive(member("ok"))[:700], member("x", data=b"abc")[:512].replace(b"ustar", b"xxxxx")],
    ids=["garbage", "truncated", "bad-magic"],
)
def test_malformed_streams_are_refused(guest: HostileGuest, tmp_path: Path, host_file: Path, junk: bytes) -> None:
    refused(guest, tmp_path, host_file, junk, ".")


# -- hostile guest: single files ---------------------------------------------


def test_single_file_mode_is_masked(guest: HostileGuest, tmp_path: Path) -> None:
    serve_file(guest, b"#!/bin/sh\n", mode=0o106777)
    fetch(guest.channel, "/usr/bin/x", tmp_path / "x")
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o755


@pytest.mark.parametrize(
    ("mtime", "kept"),
    [(1e9, True), (1234567890.5, True), (1000000000, True), ("1e9", False), (-5, False), (1e300, False),
     (float("nan"), False), (True, False), (None, False)],
)  # fmt: skip
def test_single_file_keeps_a_sane_mtime(guest: HostileGuest, tmp_path: Path, mtime: object, kept: bool) -> None:
    guest.answers["stat"] = lambda rid, call: reply(rid, mode=0o100644, size=1, is_dir=False, mtime=mtime)
    guest.answers["read"] = lambda rid, call: stream(rid, b"x")
    before = time.time()
    fetch(guest.channel, "/f", tmp_path / "f")
    got = (tmp_path / "f").stat().st_mtime
    if kept:
        assert got == mtime
    else:  # none a file could hold: the time it arrived
        assert before - 1 <= got <= time.time() + 1


def test_single_file_replaces_a_link_at_dst(guest: HostileGuest, tmp_path: Path, host_file: Path) -> None:
    (tmp_path / "dst").symlink_to(host_file)
    os.link(host_file, tmp_path / "hard")
    serve_file(guest, b"guest\n")
    fetch(guest.channel, "/f", tmp_path / "dst")
    fetch(guest.channel, "/f", tmp_path / "hard")
    assert host_file.read_text() == "host data\n"
    assert (tmp_path / "dst").read_text() == (tmp_path / "hard").read_text() == "guest\n"


@pytest.mark.parametrize("mode", [0o020666, 0o010644, 0o140777])
def test_single_special_file_is_refused(guest: HostileGuest, tmp_path: Path, mode: int) -> None:
    serve_file(guest, b"", mode=mode)
    with pytest.raises(UnsafeTransfer, match="not a regular file"):
        fetch(guest.channel, "/dev/x", tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_single_file_over_the_limit_is_refused(guest: HostileGuest, tmp_path: Path) -> None:
    serve_file(guest, bytes(3 << 20), mode=0o100644)  # stat may say anything: the bytes count
    guest.answers["stat"] = lambda rid, call: reply(rid, mode=0o100644, size=10, is_dir=False)
    with pytest.raises(UnsafeTransfer, match="more than the limit"):
        fetch(guest.channel, "/f", tmp_path / "f", GET._replace(max_bytes=1 << 20))
    assert not list(tmp_path.iterdir())  # no partial file
    assert guest.still_answers()


@pytest.mark.parametrize("info", [{"mode": "0755", "is_dir": False}, {"mode": 0o644}, {"is_dir": 1, "mode": 1}])
def test_malformed_stat_reply_is_refused(guest: HostileGuest, tmp_path: Path, info: dict[str, object]) -> None:
    guest.answers["stat"] = lambda rid, call: reply(rid, **info)
    with pytest.raises(UnsafeTransfer, match="malformed stat reply"):
        fetch(guest.channel, "/f", tmp_path / "f")
    assert not list(tmp_path.iterdir())


def test_refused_errors_pickle() -> None:
    import pickle

    err = UnsafeTransfer("../x", "a member name with '..'", "get")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), vars(back), str(back)) == (UnsafeTransfer, vars(err), str(err))


# -- hostile guest: cost, partial copies, errors, stalls ----------------------


def test_deep_names_are_refused(guest: HostileGuest, tmp_path: Path, host_file: Path) -> None:
    """Each component costs a directory walk step: 128 at most (4096 bytes allowed 2047)."""
    refused(guest, tmp_path, host_file, archive(_with_pax_path("a/" * 129 + "f")), "deeper than 128 components")
    tar = archive(member("d", tarfile.DIRTYPE), member("h", tarfile.LNKTYPE, linkname="a/" * 200 + "f"))
    refused(guest, tmp_path, host_file, tar, "deeper than 128")


def _with_size_field(header: bytes, field: bytes) -> bytes:
    """A ustar header whose size field reads ``field``, its checksum made right."""
    block = bytearray(header[:512])
    block[124:136] = field.ljust(11, b" ") + b"\0"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block) + header[512:]


@pytest.mark.parametrize("field", [b"-1", b"-7777777777", b"+10", b"0o10", b"1_0"])
def test_a_size_field_of_anything_but_octal_digits_is_refused(
    guest: HostileGuest, tmp_path: Path, host_file: Path, field: bytes
) -> None:
    """int(text, 8) also takes a sign, "0o" and "_": a size of -1 ran the copy
    loop backwards and was refused later for the wrong reason."""
    info = tarfile.TarInfo("f")
    info.mode = 0o644
    tar = archive(_with_size_field(info.tobuf(tarfile.USTAR_FORMAT), field) + b"A" * 5000)
    refused(guest, tmp_path, host_file, tar, "a malformed number in a header")


def test_headers_count_toward_the_byte_limit(guest: HostileGuest, tmp_path: Path) -> None:
    serve_tree(guest, archive(*(member(f"f{i}") for i in range(300))))  # no data, 150 KiB of headers
    with pytest.raises(UnsafeTransfer, match="more than the limit of 100000 bytes"):
        fetch(guest.channel, "/srv", tmp_path / "a", GET._replace(max_bytes=100_000))


def test_repeated_members_are_tracked_once(guest: HostileGuest, tmp_path: Path) -> None:
    """The same directory or file again and again costs no more memory."""
    tar = archive(*(member(n, k) for _ in range(2000) for n, k in (("d", tarfile.DIRTYPE), ("d/f", tarfile.REGTYPE))))
    serve_tree(guest, tar)
    fetch(guest.channel, "/srv", tmp_path / "a", GET._replace(max_tracked=4096))
    assert (tmp_path / "a" / "d" / "f").is_file()
    serve_tree(guest, archive(*(member(f"file-{i}") for i in range(100))))
    with pytest.raises(UnsafeTransfer, match="more than the limit of 4096 bytes to track"):
        fetch(guest.channel, "/srv", tmp_path / "b", GET._replace(max_tracked=4096))


def test_get_never_changes_modes_it_did_not_create(guest: HostileGuest, tmp_path: Path) -> None:
    dst = tmp_path / "home"
    (dst / ".ssh").mkdir(parents=True)
    (dst / ".git" / "hooks").mkdir(parents=True)
    dst.chmod(0o700)
    (dst / ".ssh").chmod(0o700)
    (dst / ".git" / "hooks").chmod(0o750)
    tar = b"".join(
        member(n, tarfile.DIRTYPE, mode=0o777) for n in (".", ".ssh", ".git", ".git/hooks", "new", "new/sub")
    )
    serve_tree(guest, tar + bytes(1024))
    fetch(guest.channel, "/root", dst)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in [dst, *dst.rglob("*")]}
    assert modes == {
        "home": 0o700,
        "home/.ssh": 0o700,
        "home/.git": 0o755,
        "home/.git/hooks": 0o750,
        "home/new": 0o755,
        "home/new/sub": 0o755,
    }


def test_get_skips_links_out_and_devices_and_copies_the_rest(guest: HostileGuest, tmp_path: Path) -> None:
    """A Debian /etc has absolute links (localtime, sites-enabled/*, *.wants/*):
    they are not written, everything else is, and the error names them."""
    links = [member(f"wants/unit{i}", tarfile.SYMTYPE, linkname=f"/lib/systemd/u{i}") for i in range(25)]
    tar = archive(
        member("localtime", tarfile.SYMTYPE, linkname="/usr/share/zoneinfo/UTC"),
        member("null", tarfile.CHRTYPE, devmajor=1, devminor=3),
        member("fifo", tarfile.FIFOTYPE),
        member("wants", tarfile.DIRTYPE),
        *links,
        member("hostname", data=b"box\n"),
        member("rel", tarfile.SYMTYPE, linkname="hostname"),
    )
    serve_tree(guest, tar)
    dst = tmp_path / "etc"
    with pytest.raises(UnsafeTransfer, match=r"28 member\(s\) not copied.*and 8 more") as info:
        fetch(guest.channel, "/etc", dst)
    assert info.value.path == "localtime"
    assert info.value.skipped[:3] == ("localtime", "null", "fifo") and len(info.value.skipped) == 20
    assert "a symlink to an absolute path ('/usr/share/zoneinfo/UTC')" in info.value.reason
    assert (dst / "hostname").read_text() == "box\n" and os.readlink(dst / "rel") == "hostname"
    assert sorted(p.name for p in dst.iterdir()) == ["hostname", "rel", "wants"]
    assert not list((dst / "wants").iterdir())
    import pickle

    assert vars(pickle.loads(pickle.dumps(info.value))) == vars(info.value)
    assert guest.still_answers()


def test_a_replaced_file_is_no_hard_link_target(guest: HostileGuest, tmp_path: Path, host_file: Path) -> None:
    tar = archive(member("f", data=b"x"), member("f", tarfile.DIRTYPE), member("h", tarfile.LNKTYPE, linkname="f"))
    dst = refused(guest, tmp_path, host_file, tar, "'h'.*not a file copied before it")
    assert (dst / "f").is_dir() and not (dst / "h").exists()


def test_write_errors_are_refusals(
    guest: HostileGuest, tmp_path: Path, host_file: Path, no_spare_starting: None
) -> None:
    """A local failure while writing a member (here EFBIG) is an UnsafeTransfer
    naming the member, not a raw OSError."""
    import resource
    import signal

    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old[1]))
    try:
        refused(guest, tmp_path, host_file, archive(member("big", data=bytes(2 << 20))), "'big'.*File too large")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)


def _stall(guest: HostileGuest, op: str, data: bytes, rids: list[int]) -> None:
    """Answer ``op`` with ``data`` and then nothing: no EOF, no reply."""

    def answer(rid: int, call: dict[str, object]) -> bytes:
        rids.append(rid)
        return frame(DATA, rid, data)

    guest.answers[op] = answer


@pytest.fixture
def quick_guest() -> Iterator[HostileGuest]:
    """A guest the channel gives up on after about 2 s of silence (a loaded
    machine may hold the serving thread up for a few tenths of a second)."""
    g = HostileGuest(idle=0.5, dead_after=1.5)
    yield g
    g.close()


def test_a_guest_that_never_replies_is_an_agent_error(quick_guest: HostileGuest, tmp_path: Path) -> None:
    guest = quick_guest
    serve_tree(guest, b"")
    guest.answers["tar"] = lambda rid, call: stream(rid, archive(member("f")))[: -len(reply(rid))]
    with pytest.raises(AgentError, match="has not answered"):
        fetch(guest.channel, "/x", tmp_path / "x")
    guest.answers["stat"] = lambda rid, call: b""
    with pytest.raises(AgentError, match=r"has not answered .*\(during stat\)"):
        fetch(guest.channel, "/x", tmp_path / "x")


@pytest.mark.parametrize("is_dir", [True, False], ids=["tree", "file"])
def test_a_silent_guest_is_an_agent_error(quick_guest: HostileGuest, tmp_path: Path, is_dir: bool) -> None:
    guest = quick_guest
    guest.answers["stat"] = lambda rid, call: reply(rid, mode=0o40755 if is_dir else 0o100644, size=1, is_dir=is_dir)
    rids: list[int] = []
    _stall(guest, "tar" if is_dir else "read", member("f", data=b"abc") if is_dir else b"abc", rids)
    with pytest.raises(AgentError, match="has not answered"):
        fetch(guest.channel, "/x", tmp_path / "x")
    assert guest.still_answers()  # in order: the guest read what came before
    assert guest.cancelled == rids
    assert not [p for p in tmp_path.rglob("*") if "bottle" in p.name]


def test_an_interrupted_file_get_never_writes_to_a_reused_fd(
    guest: HostileGuest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted (a signal, a test timeout) while the guest still sends: the
    channel keeps calling the call's sink, which must not write to the closed
    fd, whose number the next open() reuses."""
    import signal

    class Interrupted(BaseException):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    guest.answers["stat"] = lambda rid, call: reply(rid, mode=0o100644, size=1, is_dir=False)
    rids: list[int] = []
    _stall(guest, "read", b"first", rids)
    fds: list[int] = []

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)
        fds.append(fd)
        return fd, name

    real_mkstemp = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)  # only to learn the fd's number
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Interrupted):
            fetch(guest.channel, "/f", tmp_path / "f")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    with open(tmp_path / "later", "wb") as later:
        assert later.fileno() == fds[0]  # the number is reused at once
        guest.peer.sendall(frame(DATA, rids[0], b"late guest data"))
        assert guest.still_answers()  # frames are handled in order: the DATA frame was
        later.write(b"mine")
    assert (tmp_path / "later").read_bytes() == b"mine"
    assert not (tmp_path / "f").exists()


# -- put: the real agent's untar, in-process ---------------------------------


@pytest.fixture(scope="module")
def local_agent() -> Iterator[AgentChannel]:
    """The real guest agent serving on a socketpair in this process."""
    with in_process_agent() as channel:
        yield channel


def untar_call(channel: AgentChannel, dst: Path, tar: bytes) -> dict[str, object]:
    return channel.call("untar", path=str(dst), data=[tar], timeout=30)


def test_the_agent_gives_a_files_mtime_and_get_keeps_it(local_agent: AgentChannel, tmp_path: Path) -> None:
    src = tmp_path / "guest-file"
    src.write_text("data\n")
    os.utime(src, (1e9, 1e9 + 0.25))
    fetch(local_agent, str(src), tmp_path / "got")
    assert (tmp_path / "got").read_text() == "data\n" and (tmp_path / "got").stat().st_mtime == 1e9 + 0.25


def test_a_file_get_lands_inside_a_directory_once_and_never_replaces_one(
    local_agent: AgentChannel, tmp_path: Path
) -> None:
    src = tmp_path / "guest" / "hosts"
    src.parent.mkdir()
    src.write_text("127.0.0.1 localhost\n")
    out = tmp_path / "out"
    out.mkdir()
    fetch(local_agent, str(src), out)  # an existing directory: inside it
    fetch(local_agent, str(src), tmp_path / "new", into=True)  # "new/": made, and inside it
    assert (out / "hosts").read_text() == (tmp_path / "new" / "hosts").read_text() == src.read_text()
    for dst, into in ((out, False), (tmp_path / "new", True)):  # now its path there is a directory
        (dst / "hosts").unlink()
        (dst / "hosts").mkdir()
        with pytest.raises(IsADirectoryError):
            fetch(local_agent, str(src), dst, into=into)
        assert not list((dst / "hosts").iterdir())  # not nested inside it
        assert [p.name for p in dst.iterdir()] == ["hosts"]  # no temporary file left
    assert local_agent.call("hello", timeout=10)["version"]


def test_a_get_whose_local_directory_is_a_file_is_not_a_directory_error(
    local_agent: AgentChannel, tmp_path: Path
) -> None:
    """A file's get said FileExistsError (a directory's NotADirectoryError)."""
    src = tmp_path / "guest"
    src.mkdir()
    (src / "f").write_text("x")
    (tmp_path / "target").write_text("a file")
    for what, dst in ((src / "f", tmp_path / "target" / "x"), (src, tmp_path / "target" / "d")):
        with pytest.raises(NotADirectoryError) as info:
            fetch(local_agent, str(what), dst)
        assert str(info.value.filename).startswith(str(tmp_path / "target")), info.value
    assert (tmp_path / "target").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest", "target"]


def test_a_member_that_reads_short_is_named(local_agent: AgentChannel, tmp_path: Path) -> None:
    """A file that gives less than its size says (one that shrank while read, or
    sysfs's 4096-byte files) failed the get as "unexpected end of data", naming none."""
    src = Path("/sys/kernel/mm/transparent_hugepage")
    if not (src / "enabled").is_file():
        pytest.skip("no sysfs THP directory on this host")
    with pytest.raises(GuestOSError) as info:
        fetch(local_agent, str(src), tmp_path / "got")
    assert "unexpected end of data" in str(info.value) and str(info.value.filename).startswith(f"{src}/"), info.value


def test_agent_untar_never_writes_through_a_symlink(local_agent: AgentChannel, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    dst = tmp_path / "dst"
    tar = archive(member("link", tarfile.SYMTYPE, linkname=str(victim)), member("link/passwd", data=b"pwned"))
    got = untar_call(local_agent, dst, tar)
    assert got["refused"] == {
        "path": "link/passwd",
        "reason": "'link' on its path is a symlink or not a directory",
    }
    assert not list(victim.iterdir())
    assert os.readlink(dst / "link") == str(victim)  # put keeps links as they are
    for name in ("../up", "/abs"):
        assert untar_call(local_agent, dst, archive(member(name, data=b"x")))["refused"]
    assert not (tmp_path / "up").exists() and not Path("/abs").exists()


def test_put_follows_the_guests_own_directory_links(local_agent: AgentChannel, tmp_path: Path) -> None:
    """Like cp and tar, put() follows a link to a directory already in the guest
    (merged /usr: lib -> usr/lib), whether or not the archive lists the directory;
    it keeps the modes of what was there, and of its destination."""
    dst = tmp_path / "root"
    (dst / "usr" / "lib").mkdir(parents=True)
    (dst / "lib").symlink_to("usr/lib")
    dst.chmod(0o755)
    src = tmp_path / "overlay"
    (src / "lib" / "systemd").mkdir(parents=True)
    (src / "lib" / "systemd" / "unit").write_text("u\n")
    (src / "lib").chmod(0o700)
    src.chmod(0o700)
    send_tree(local_agent, src, str(dst))
    assert (dst / "usr" / "lib" / "systemd" / "unit").read_text() == "u\n"
    assert os.readlink(dst / "lib") == "usr/lib"
    modes = [stat.S_IMODE(p.stat().st_mode) for p in (dst, dst / "usr" / "lib", dst / "usr" / "lib" / "systemd")]
    assert modes == [0o755, 0o755, 0o755]  # systemd was made here: the archive's mode
    # Without the directory member too.
    tar = archive(member("lib/other", data=b"o"))
    assert untar_call(local_agent, dst, tar) == {"ok": True}
    assert (dst / "usr" / "lib" / "other").read_bytes() == b"o"


def test_put_into_a_directory_it_makes_gives_it_the_archive_mode(local_agent: AgentChannel, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    src.chmod(0o750)
    send_tree(local_agent, src, str(tmp_path / "new"))
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o750


def test_put_of_a_fifo_is_refused_by_name(local_agent: AgentChannel, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe")
    with pytest.raises(UnsafeTransfer, match=r"put\(\) refused '\./pipe': a fifo"):
        send_tree(local_agent, src, str(tmp_path / "dst"))
    assert local_agent.call("hello", timeout=10)["version"]


def test_put_refuses_a_fifo_as_tar_meets_it_before_sending_anything(local_agent: AgentChannel, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "file").write_text("x")
    os.mkfifo(src / "a" / "x-fifo")  # in tar's order, before ./b-fifo
    os.mkfifo(src / "b-fifo")
    with pytest.raises(UnsafeTransfer, match=r"put\(\) refused '\./a/x-fifo': a fifo"):
        send_tree(local_agent, src, str(tmp_path / "dst"))
    with pytest.raises(UnsafeTransfer, match=r"put\(\) refused '\./b-fifo': a fifo"):
        send_tree(local_agent, src, str(tmp_path / "dst"), skip=("a",))  # skipped as tar skips it
    assert not (tmp_path / "dst").exists()  # nor ./a/file


def test_put_of_a_fifo_itself_is_refused_without_waiting_for_a_writer(
    local_agent: AgentChannel, tmp_path: Path
) -> None:
    from pytest_bottle.agent.client import AgentClient
    from pytest_bottle.agent.transfer import put

    os.mkfifo(tmp_path / "pipe")
    done: list[BaseException] = []
    t = threading.Thread(
        target=lambda: _catch(
            done, lambda: put(AgentClient.of(local_agent), tmp_path / "pipe", str(tmp_path / "dst"), 10)
        )
    )
    t.start()
    t.join(10)
    if t.is_alive():  # it hangs in open(): give it its writer, then fail
        with open(tmp_path / "pipe", "wb"):
            pass
        t.join(10)
        pytest.fail("put() of a fifo waited for a writer")
    assert isinstance(done[0], UnsafeTransfer) and "a fifo" in str(done[0]) and done[0].op == "put", done
    assert not (tmp_path / "dst").exists()


def _catch(into: list[BaseException], fn: Callable[[], object]) -> None:
    try:
        fn()
    except BaseException as e:  # handed to the test thread
        into.append(e)


# -- real bottle -----------------------------------------------------------------


def test_get_from_a_real_guest(module_bottle: Bottle, tmp_path: Path) -> None:
    module_bottle.check_output(
        "set -e; rm -rf /srv/t; mkdir -p /srv/t/sg; cd /srv/t; printf '#!/bin/sh\\n' > suid; chown 1234:1234 suid;"
        "chmod 4755 suid; printf x > open; chmod 0777 open; chmod 2775 sg; ln -s suid rel"
    )
    module_bottle.get("/srv/t", tmp_path / "t")
    got = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in (tmp_path / "t").iterdir() if not p.is_symlink()}
    assert got == {"suid": 0o755, "open": 0o755, "sg": 0o755}
    assert (tmp_path / "t" / "suid").stat().st_uid == os.geteuid()
    assert os.readlink(tmp_path / "t" / "rel") == "suid"
    module_bottle.get("/srv/t/suid", tmp_path / "one")
    assert stat.S_IMODE((tmp_path / "one").stat().st_mode) == 0o755


def test_get_refuses_devices_and_links_out_from_a_real_guest(module_bottle: Bottle, tmp_path: Path) -> None:
    module_bottle.check_output("rm -rf /srv/dev /srv/abs; mkdir -p /srv/dev /srv/abs; mknod /srv/dev/null c 1 3")
    module_bottle.check_output("ln -s /etc/passwd /srv/abs/passwd; echo kept > /srv/abs/kept")
    with pytest.raises(UnsafeTransfer, match="character device"):
        module_bottle.get("/srv/dev", tmp_path / "dev")
    assert not os.path.lexists(tmp_path / "dev" / "null")
    with pytest.raises(UnsafeTransfer, match="absolute") as info:
        module_bottle.get("/srv/abs", tmp_path / "abs")
    assert info.value.skipped == ("./passwd",)  # names as in the archive
    assert (tmp_path / "abs" / "kept").read_text() == "kept\n"  # the rest was copied
    assert not os.path.lexists(tmp_path / "abs" / "passwd")
    with pytest.raises(UnsafeTransfer, match="not a regular file"):
        module_bottle.get("/dev/zero", tmp_path / "zero")
    assert not (tmp_path / "zero").exists()
    # A regular file whose size is past the limit (128 TiB) is refused before a byte
    # comes: it used to stream gigabytes to disk until the timeout.
    started = time.monotonic()
    with pytest.raises(UnsafeTransfer, match=f"larger than the limit of {GET.max_bytes} bytes"):
        module_bottle.get("/proc/kcore", tmp_path / "kcore", timeout=30)
    assert time.monotonic() - started < 10
    assert not [p for p in os.listdir(tmp_path) if "kcore" in p]  # no temporary left
    assert module_bottle.check_output("echo still here") == "still here\n"


def test_put_of_a_tree_with_a_fifo_or_socket_creates_nothing_in_a_real_guest(
    module_bottle: Bottle, tmp_path: Path
) -> None:
    dst = f"/tmp/put-special-{os.urandom(6).hex()}"
    src = tmp_path / "src"
    src.mkdir()
    for name in "abcdefgh":  # sent, and written in the guest, before the fifo's turn came
        (src / name).write_text(name)
    os.mkfifo(src / "zz-fifo")
    with pytest.raises(UnsafeTransfer) as info:
        module_bottle.put(str(src), dst)
    e = info.value
    assert (e.path, e.reason, e.op, e.skipped) == (
        "./zz-fifo", "a fifo: only files, directories and links are copied", "put", ()
    )  # fmt: skip
    assert str(e) == "put() refused './zz-fifo': a fifo: only files, directories and links are copied"
    assert module_bottle.exec(["test", "-e", dst]).returncode == 1  # nothing was created, not a..h
    os.unlink(src / "zz-fifo")
    with socket.socket(socket.AF_UNIX) as sock:  # tarfile left a socket out: the rest was copied
        sock.bind(str(tmp_path / "s"))  # a short path (sun_path), moved into the tree
        (src / "sub").mkdir()
        os.rename(tmp_path / "s", src / "sub" / "sock")
        with pytest.raises(UnsafeTransfer, match=r"refused '\./sub/sock': a socket: only files") as info:
            module_bottle.put(src, dst)
    assert (info.value.path, info.value.op) == ("./sub/sock", "put")
    assert module_bottle.exec(["test", "-e", dst]).returncode == 1  # nothing was created
    os.unlink(src / "sub" / "sock")
    os.mkfifo(tmp_path / "outside-fifo")
    (src / "sub" / "link").symlink_to(tmp_path / "outside-fifo")  # a link is copied as a link, not followed
    module_bottle.put(src, dst)
    assert module_bottle.check_output(["readlink", f"{dst}/sub/link"]) == f"{tmp_path / 'outside-fifo'}\n"
    assert module_bottle.read_text(f"{dst}/h") == "h"
    module_bottle.check_output(["rm", "-r", dst])


def test_put_into_a_real_guest_follows_merged_usr(module_bottle: Bottle, tmp_path: Path) -> None:
    """debian-bookworm has /lib -> usr/lib: an overlay's lib/ lands in /usr/lib,
    and put(..., "/") changes neither the link nor the modes of / and /usr/lib."""
    before = module_bottle.check_output("readlink /lib; stat -c %a / /usr/lib")
    src = tmp_path / "overlay"
    (src / "lib" / "systemd" / "bottle-put-test").mkdir(parents=True)
    (src / "lib" / "systemd" / "bottle-put-test" / "f").write_text("new\n")
    (src / "lib").chmod(0o700)
    src.chmod(0o700)
    module_bottle.put(src, "/")
    assert module_bottle.check_output("readlink /lib; stat -c %a / /usr/lib") == before
    assert before.startswith("usr/lib\n")
    assert module_bottle.read_text("/usr/lib/systemd/bottle-put-test/f") == "new\n"
    module_bottle.check_output("rm -r /usr/lib/systemd/bottle-put-test")


def test_agent_tar_stops_when_the_host_cancels(local_agent: AgentChannel, tmp_path: Path) -> None:
    """A refused get() asks the guest to stop: the real agent's tar honours CANCEL."""
    with open(tmp_path / "big", "wb") as f:
        f.truncate(64 << 20)
    got = 0
    started: list[int] = []
    ready = threading.Event()

    def sink(kind: int, data: bytes) -> None:
        nonlocal got
        if kind == DATA:
            if not got:
                ready.wait(10)  # the first frame may come before start() returns
                local_agent.cancel(started[0])
            got += len(data)

    rid, call = local_agent.start("tar", sink, path=str(tmp_path))
    started.append(rid)
    ready.set()
    with pytest.raises(GuestOSError, match="the host stopped reading"):
        local_agent.wait(call, 60, "get")
    assert 0 < got < 16 << 20
    assert local_agent.call("hello", timeout=10)["version"]
