"""Files and directory trees to and from the guest, over the agent channel.

Everything the guest sends is checked and bounded here: a directory arrives
as a tar stream that ``guest.untar`` extracts under the ``GET`` policy (no
``tarfile`` extraction, whose filters older Pythons lack), a file arrives in
a temporary file capped at the policy's byte limit, and neither is ever held
whole in memory.  A guest that goes silent mid-transfer is the channel's to
notice (its liveness pings and the caller's deadline), as for any call.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import posixpath
import stat
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..arguments import GuestPath, guest_path, matches_any, names_no_file, raw_path
from ..errors import AgentError, BottleError, GuestOSError, UnsafeTransfer
from ..guest import untar
from ..guest.frames import DATA, EOF, FrameWriter
from ..host.paths import current_umask
from .calls import Call
from .channel import AgentChannel
from .client import AgentClient
from .streams import PART, SMALL

log = logging.getLogger(__name__)

# How long a refused transfer waits for the guest's reply before giving up on it
# (the reader thread drops the rest of the stream either way).
REFUSAL_GRACE = 10.0


Agent = AgentClient | AgentChannel  # tools and tests may hold a bare channel


def put(agent: AgentClient, src: Path, dst: GuestPath, timeout: float | None, skip: tuple[str, ...] = ()) -> None:
    """``Bottle.put`` and ``Image.copy``: local file or directory ``src`` to
    guest ``dst`` (absolute; a str ending in ``/``, ``/.`` or ``/..`` means
    inside the directory it names).  Entries of a directory whose names match
    ``skip`` (names or glob patterns) are left out, with their contents."""
    raw, path = raw_path(dst), guest_path(dst)
    try:
        st = src.stat()  # FileNotFoundError for a missing source, before anything is sent
    except FileNotFoundError as e:  # a relative one is the working directory's: say which
        raise FileNotFoundError(e.errno, e.strerror, str(src.absolute())) from None
    if stat.S_ISDIR(st.st_mode):
        with agent.deadline(timeout):  # dst and its parents are made as the tar stream says
            send_tree(agent, src, path, skip)
        return
    if not stat.S_ISREG(st.st_mode):  # opening a fifo would wait for a writer forever
        raise UnsafeTransfer(str(src), _refusal(st.st_mode), "put")
    into_dir: str | None = src.name  # like cp: onto an existing directory, the file goes inside it
    if isinstance(raw, str) and names_no_file(raw):
        path, into_dir = posixpath.join(path, src.name), None  # inside already: a directory there is in the way
    with open(src, "rb") as f:
        agent.write(path, f, mode=stat.S_IMODE(st.st_mode), into_dir=into_dir, timeout=timeout)


def send_tree(agent: Agent, src: Path, dst: str, skip: tuple[str, ...] = ()) -> None:
    """Copy the contents of local directory ``src`` into guest directory ``dst``
    (but for entries named in ``skip``)."""
    top = os.path.realpath(src)  # a symlink to a directory copies the directory, like cp -r src/. dst
    special = _special_member(top, ".", skip)
    if special is not None:  # refused before the call: nothing is created in the guest
        raise UnsafeTransfer(*special, "put")
    client = AgentClient.of(agent)
    channel = client.channel
    rid, call = client.start_untar(dst)
    writer = FrameWriter(lambda data: channel.send_data_frame(rid, data))

    def member(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if info.name != "." and matches_any(posixpath.basename(info.name), skip) else _root_owned(info)

    def stream() -> Iterator[bytes]:
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            tar.add(top, arcname=".", filter=member)
        writer.flush()
        yield b""

    channel.send_data(rid, stream())  # a local failure (an unreadable file) aborts the call
    refused = client.untar_reply(call, "put").refused
    if refused is not None:
        raise UnsafeTransfer(*refused, "put")


# What put() refuses, named as the guest names it (``guest.tarstream.REFUSED_KINDS``);
# tarfile would leave a socket out silently.
SPECIAL_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a fifo",
    stat.S_IFSOCK: "a socket",
}


def _special_member(path: str, name: str, skip: tuple[str, ...]) -> tuple[str, str] | None:
    """The first device, fifo or socket under ``path`` as ``tar.add`` would meet
    it (sorted, links not followed, ``skip`` left out): its archive name and the
    guest's reason.  One scandir a directory; its entry types cost no stat."""
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return None  # unreadable: tar meets it too, and says so
    for entry in entries:
        if matches_any(entry.name, skip):
            continue
        member = f"{name}/{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            found = _special_member(entry.path, member, skip)
            if found is not None:
                return found
        elif not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:  # gone meanwhile: tar finds it gone too
                continue
            shown = os.fsencode(member).decode("utf-8", "backslashreplace")  # as the guest shows a name
            return shown, _refusal(mode)
    return None


def _refusal(mode: int) -> str:
    """Why put() refuses a file of ``mode``, in the guest's words."""
    return f"{SPECIAL_KINDS.get(stat.S_IFMT(mode), 'not a file')}: only files, directories and links are copied"


def fetch(agent: Agent, src: str, dst: Path, policy: untar.Policy = untar.GET, *, into: bool = False) -> None:
    """``Bottle.get``: copy guest file or directory ``src`` to local ``dst``
    (a file goes inside ``dst`` when ``into`` or when ``dst`` is a directory)."""
    client = AgentClient.of(agent)
    policy = policy._replace(mode_mask=policy.mode_mask & ~current_umask())  # as any file the user makes
    info = client.stat(src)
    if info.is_dir:
        receive_tree(client, src, dst, policy)
    elif stat.S_ISREG(info.mode):
        target = dst / posixpath.basename(src) if into or dst.is_dir() else dst
        receive_file(client, src, target, info.mode, policy, info.mtime)
    else:
        raise UnsafeTransfer(src, "not a regular file or a directory: only those are copied")


def receive_tree(agent: Agent, src: str, dst: Path, policy: untar.Policy = untar.GET) -> None:
    """Copy the contents of guest directory ``src`` into local directory ``dst``.

    Links leading out, devices and fifos are skipped, not written: the rest is
    copied, then ``UnsafeTransfer`` names what was skipped."""
    client = AgentClient.of(agent)
    channel = client.channel
    _local_dirs(dst)
    source = _FrameSource(client)
    rid, call = source.start(src)
    try:
        try:
            count, skipped = untar.extract(source.read, os.fspath(dst), policy, source=os.fsencode(src))
        finally:
            source.discard()  # whatever else comes is dropped: the channel goes on
    except untar.Refused as e:
        _give_up(channel, rid, call.done)
        ended = call.done.is_set() and (call.reply is None or call.error is not None or not call.reply.get("ok"))
        if e.reason == untar.TRUNCATED and ended:
            # The guest failed mid-way, the VM died or the agent restarted: that, not our "ends early".
            channel.wait(call, 0, "get")
        raise UnsafeTransfer(e.path, e.reason) from None
    except BaseException as e:
        _give_up(channel, rid, call.done, _grace(e))
        raise
    reply = channel.wait(call, None, "get") or {}
    sockets, more = _sockets(reply, untar.SHOWN_SKIPS - len(skipped))
    if count or more:
        raise _partial(count + more, skipped + sockets)


def _sockets(reply: dict[str, Any], room: int) -> tuple[list[untar.Refused], int]:
    """The sockets the guest's tar has no member for (a reply of the guest's:
    what is not a list of names counts them only), as skipped members."""
    names, n = reply.get("sockets"), reply.get("nsockets")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n < 1 << 40:
        return [], 0
    shown = [x for x in names if isinstance(x, str) and len(x) < 4096] if isinstance(names, list) else []
    if not shown:  # none named: nothing to say which
        return [], 0
    why = "a socket: only files, directories and links are copied"
    return [untar.Refused(name, why) for name in shown[: max(0, room)]], n


def _local_dirs(path: Path) -> None:
    """``mkdir -p``; a file in the way is ENOTDIR, as open(2) says it
    (pathlib's FileExistsError names a path that is there, but no directory)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise NotADirectoryError(errno.ENOTDIR, "a file is where a directory must be", e.filename) from None


def _partial(count: int, skipped: list[untar.Refused]) -> UnsafeTransfer:
    shown = "; ".join(f"{e.path!r}: {e.reason}" for e in skipped)
    more = f"; and {count - len(skipped)} more" if count > len(skipped) else ""
    reason = f"{count} member(s) not copied, the rest was: {shown}{more}"
    return UnsafeTransfer(skipped[0].path, reason, "get", skipped=tuple(e.path for e in skipped))


def receive_file(
    agent: Agent,
    src: str,
    dst: Path,
    mode: int,
    policy: untar.Policy = untar.GET,
    mtime: float | None = None,
) -> None:
    """Copy guest file ``src`` to the file ``dst``, its mode masked by the
    policy and its ``mtime`` kept; never written through a link, never more
    than the policy's byte limit.  A directory at ``dst`` is refused, as
    ``cp`` refuses to overwrite one with a file."""
    client = AgentClient.of(agent)
    channel = client.channel
    if dst.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a directory is there: a file does not replace it", str(dst))
    _local_dirs(dst.parent)
    # mkstemp: O_EXCL | O_NOFOLLOW under a fresh name, so no planted link is followed
    short = os.fsdecode(os.fsencode(dst.name)[:200])  # bytes: a name of 255 bytes may be 85 characters
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{short}.", suffix=".bottle-part", dir=dst.parent)
    except OSError as e:  # named as the file asked for, not our temporary name
        raise OSError(e.errno, e.strerror, str(dst)) from None
    sink = _FileSink(fd, src, policy.max_bytes, str(dst))
    try:
        # Its size refused at once (a 128 TiB /proc/kcore); a file that grows is cut by the sink.
        rid, call = client.start_read(src, sink.write, policy.max_bytes)
        try:
            while not call.done.wait(0.2) and not sink.failed.is_set():
                channel.check(call, "get")  # a deadline, a dead agent
            if sink.failed.is_set():
                raise sink.errors[0]
        except BaseException as e:  # a refusal, an interrupt, a test timeout: the guest may still be sending
            sink.shut()
            _give_up(channel, rid, call.done, _grace(e))
            raise
        try:
            channel.wait(call, 0, "get")
        except GuestOSError as e:
            if e.errno != errno.EFBIG:
                raise
            raise UnsafeTransfer(src, f"it is larger than the limit of {policy.max_bytes} bytes") from None
        os.fchmod(fd, mode & policy.mode_mask)
        if mtime is not None:
            with contextlib.suppress(OSError):  # a file system that cannot hold it: the data matters
                os.utime(fd, (mtime, mtime))
        sink.shut()
        try:
            os.replace(tmp, dst)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(dst)) from None
    finally:
        sink.shut()
        Path(tmp).unlink(missing_ok=True)


class _FileSink:
    """Writes a file's DATA frames to ``fd``.  The channel's reader thread calls
    ``write`` until the guest's reply, even after we gave up: once ``shut``
    it never touches the fd again, whose number a later open() may reuse."""

    def __init__(self, fd: int, src: str, limit: int, dst: str) -> None:
        self.fd, self.src, self.limit, self.dst = fd, src, limit, dst
        self.lock = threading.Lock()
        self.closed = False
        self.received = 0
        self.failed = threading.Event()
        self.errors: list[BaseException] = []

    def write(self, kind: int, data: bytes) -> None:
        if kind != DATA:
            return
        with self.lock:
            if self.closed:
                return
            try:
                self.received += len(data)
                if self.received > self.limit:
                    raise UnsafeTransfer(self.src, f"the guest sent more than the limit of {self.limit} bytes")
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view) :]
            except BaseException as e:
                if isinstance(e, OSError) and e.errno and not e.filename:  # a full disk's: name the file
                    e = OSError(e.errno, e.strerror, self.dst)
                self.errors.append(e)
                self.failed.set()  # a full disk, or too much: no need to hear the rest
                raise

    def shut(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                os.close(self.fd)


def _grace(e: BaseException) -> float:
    """How long to wait for the guest's reply after ``e``: not at all when the
    guest went silent or the caller is interrupted (the sinks drop the rest)."""
    return REFUSAL_GRACE if isinstance(e, Exception) and not isinstance(e, AgentError) else 0


def _give_up(channel: AgentChannel, rid: int, done: threading.Event, grace: float = REFUSAL_GRACE) -> None:
    """Ask the guest to stop, and wait a little for its reply so the call ends
    cleanly; the reader thread drops anything more it sends for ``rid``."""
    if done.is_set():
        return
    try:
        channel.cancel(rid)
    except BottleError:
        return  # the channel is gone: nothing to stop
    if grace and not done.wait(grace):
        log.debug("bottle %s: no reply to a refused transfer within %s s", channel.name, grace)


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


class _FrameSource:
    """A read-only stream over DATA frames arriving from the reader thread.

    Flow control: the reader thread only queues; credit goes back to the agent
    as ``read`` takes bytes out, so at most a window (``frames.HOST_WINDOW``)
    waits here however slow the consumer (the extraction, a local disk) is,
    and the reader never waits for us.
    """

    def __init__(self, client: AgentClient) -> None:
        self.client = client
        self.channel = client.channel
        self.done: threading.Event | None = None
        self.call: Call | None = None
        self.rid = 0
        self.cond = threading.Condition()
        self.chunks: collections.deque[memoryview | bytearray] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.dropping = False

    def start(self, path: str) -> tuple[int, Call]:
        """Start the tar stream that feeds this source; the consumer grants the credit."""
        self.rid, call = self.client.start_tar(path, self.feed)
        self.call, self.done = call, call.done
        return self.rid, call

    def feed(self, kind: int, data: bytes) -> None:
        with self.cond:
            if kind == DATA:
                if not self.dropping:
                    last = self.chunks[-1] if self.chunks else None
                    if len(data) >= SMALL:
                        self.chunks.append(memoryview(data))
                    elif type(last) is bytearray and len(last) + len(data) <= PART:
                        last += data  # a guest's tiny frames cost their bytes, not an object each
                    else:
                        self.chunks.append(bytearray(data))
                    self.buffered += len(data)
            elif kind == EOF:
                self.eof = True
            self.cond.notify_all()

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" once the stream has ended."""
        while True:
            if self.call is not None:  # a deadline, a dead agent (never while holding cond); also
                self.channel.check(self.call, "get")  # while a guest streams on past the deadline
            with self.cond:
                if not self.chunks and not (self.eof or self.dropping or self._finished()):
                    self.cond.wait(0.2)
                if self.chunks:
                    head = self.chunks[0]
                    out = head[:n]
                    if len(head) > n:
                        self.chunks[0] = head[n:]
                    else:
                        self.chunks.popleft()
                    self.buffered -= len(out)
                    break
                if self.eof or self.dropping or self._finished():
                    return b""
        if self.call is not None:
            self.channel.grant(self.rid, len(out))
        return bytes(out)

    def discard(self) -> None:
        with self.cond:
            self.dropping = True
            self.chunks.clear()
            self.buffered = 0
            self.cond.notify_all()

    def _finished(self) -> bool:
        # The reply (or the channel's death) comes after the last data frame.
        return self.channel.closed.is_set() or (self.done is not None and self.done.is_set())
