"""Directory trees to and from the guest, as tar streams over the agent channel."""

from __future__ import annotations

import collections
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BottleError
from .guest.channel import AgentChannel
from .guest.frames import DATA, EOF, FrameWriter


def send_tree(channel: AgentChannel, src: Path, dst: str) -> None:
    """Copy the contents of local directory ``src`` into guest directory ``dst``."""
    rid, call = channel.start("untar", None, path=dst)
    writer = FrameWriter(lambda data: channel.send_data_frame(rid, data))

    def stream() -> Iterator[bytes]:
        # A symlink to a directory copies the directory, like cp -r src/. dst
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            tar.add(os.path.realpath(src), arcname=".", filter=_root_owned)
        writer.flush()
        yield b""

    channel.send_data(rid, stream())  # a local failure (an unreadable file) aborts the call
    channel.wait(call, None, "put")


def receive_tree(channel: AgentChannel, src: str, dst: Path) -> None:
    """Copy the contents of guest directory ``src`` into local directory ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    reader = _FrameSource(channel)
    call = reader.start("tar", path=src)
    refused: Exception | None = None
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                # numeric_owner: guest uids, not host users of the same name
                tar.extract(member, dst, numeric_owner=True, **_EXTRACT)
    except tarfile.ReadError:
        pass  # the agent failed before sending anything: its reply says why
    except tarfile.FilterError as e:  # a member pointing outside dst
        refused = e
        reader.drain()
    channel.wait(call, None, "get")
    if refused is not None:
        raise BottleError(f"refused to copy {src}: {refused}") from refused


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _keep_modes(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "tar" filter refuses paths outside ``dest`` but also clears
    setuid/setgid/sticky and group/other write bits; keep its checks, not that."""
    checked = tarfile.tar_filter(member, dest)
    return checked.replace(mode=member.mode, deep=False)


_EXTRACT: dict[str, Any] = {"filter": _keep_modes} if hasattr(tarfile, "tar_filter") else {}


class _FrameSource:
    """A read-only file object over DATA frames arriving from the reader thread.

    Flow control: the reader thread only queues; credit goes back to the agent
    as ``read`` takes bytes out, so at most a window (``frames.HOST_WINDOW``) waits
    here however slow the consumer (tar extraction, a local disk) is.
    """

    def __init__(self, channel: AgentChannel) -> None:
        self.channel = channel
        self.done: threading.Event | None = None
        self.call: Any = None
        self.rid = 0
        self.cond = threading.Condition()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.eof = False
        self.buf = b""

    def start(self, op: str, **args: Any) -> Any:
        """Start the call that feeds this source; the consumer grants the credit."""
        self.rid, self.call = self.channel.start(op, self.feed, auto_credit=False, **args)
        self.done = self.call.done
        return self.call

    def feed(self, kind: int, data: bytes) -> None:
        with self.cond:
            if kind == DATA:
                self.chunks.append(data)
            elif kind == EOF:
                self.eof = True
            self.cond.notify()

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            with self.cond:
                if not self.chunks and not self.eof and not self._finished():
                    self.cond.wait(0.2)
                chunk = self.chunks.popleft() if self.chunks else None
                over = chunk is None and (self.eof or self._finished())
            if chunk is None:
                if over:
                    break
                if self.call is not None:  # a deadline, a dead agent (never while holding cond)
                    self.channel.check(self.call, "get")
                continue
            self.buf += chunk
            if self.call is not None:
                self.channel.grant(self.rid, len(chunk))
        if n < 0:
            n = len(self.buf)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def _finished(self) -> bool:
        # The reply (or the channel's death) comes after the last data frame.
        return self.channel.closed.is_set() or (self.done is not None and self.done.is_set())
