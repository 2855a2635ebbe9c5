"""Command output as it arrives: a bounded tail per stream (spawned processes)
and the feed behind ``exec(on_output=...)``.

The channel's reader thread only stores or queues what comes (it must never
run user code: a slow callback there would stall every call to the bottle).
The feed hands the text to the callback on the caller's own thread and
returns the credit only then, so a callback slower than the command's
output pauses the command (its pipe fills) and nothing else.
"""

from __future__ import annotations

import codecs
import collections
import queue
import threading
import time
from collections.abc import Callable

from ..errors import AgentError, AgentTimeout
from ..guest.frames import STDERR, STDOUT
from .calls import Call
from .channel import AgentChannel

OnOutput = Callable[[str, str], None]
STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}


PART = 64 * 1024  # small chunks are gathered into parts of up to this size
SMALL = 4096  # a chunk under this is copied into a part; a larger one is kept as it came
MERGE_ANY = 64  # Inbox: waiting items past which small chunks join their stream's newest part
# How long an ``exec`` whose ``on_output`` raised waits for the agent to say
# the command is gone (its group killed and reaped; the agent bounds that at 5 s).
STOP_WAIT = 10.0


class OutputTail:
    """The last ``cap`` bytes of one stream; what falls off the front is counted.

    Chunks under ``PART`` bytes are appended to the last part (a bytearray)
    instead of being kept one object each: a stream of tiny writes costs its
    bytes, not ~50 bytes of object per write.  Only the last part is ever
    changed in place; a part is frozen to bytes once another follows it."""

    __slots__ = ("cap", "dropped", "parts", "size")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parts: collections.deque[bytes | bytearray] = collections.deque()
        self.size = 0
        self.dropped = 0

    @property
    def total(self) -> int:
        """Bytes received so far, kept or not."""
        return self.size + self.dropped

    def add(self, data: bytes) -> None:
        parts = self.parts
        last = parts[-1] if parts else None
        if type(last) is bytearray and len(last) + len(data) <= PART:
            last += data
        else:
            if type(last) is bytearray:
                parts[-1] = bytes(last)
            parts.append(bytearray(data) if len(data) < PART else data)
        self.size += len(data)
        while self.size > self.cap:  # whole parts fall off: no copying of the rest
            over = self.size - self.cap
            first = parts[0]
            if len(first) <= over:
                parts.popleft()
                cut = len(first)
            else:
                parts[0] = first[over:]  # a new object: a snapshot holding the old one stays valid
                cut = over
            self.size -= cut
            self.dropped += cut

    def snapshot(self) -> list[bytes]:
        """The parts as they are now (under the owner's lock): only the last may
        change later, so only it is copied (at most ``PART`` bytes)."""
        parts = list(self.parts)
        if parts and type(parts[-1]) is bytearray:
            parts[-1] = bytes(parts[-1])
        return parts  # type: ignore[return-value]

    def value(self) -> bytes:
        return b"".join(self.parts)

    def text(self) -> str:
        """The kept bytes as text, after a note of what was dropped, if anything."""
        return self.note(self.value().decode("utf-8", "replace"))

    def note(self, body: str) -> str:
        if not self.dropped:
            return body
        return f"[pytest-bottle: {self.dropped} earlier bytes dropped, the last {self.cap} kept]\n{body}"


Item = tuple[int, bytes | bytearray] | None


class Inbox:
    """What the reader thread hands a consumer: a queue in which small chunks
    of one kind that follow each other are merged while they wait, so a flood
    of tiny frames costs their bytes, not an object each (the window counts
    bytes only).  With more than ``MERGE_ANY`` items waiting (the consumer
    lags), a small chunk joins the last waiting one of its kind even past the
    other kind's: a guest alternating 1-byte stdout and stderr frames pinned
    ~128 bytes of objects per byte of its window.  Order within a stream is
    kept; between streams it is then the order of the parts.  ``None`` is a
    wake-up."""

    def __init__(self) -> None:
        self.items: collections.deque[Item] = collections.deque()
        self.cond = threading.Condition()
        self.last: dict[int, bytearray] = {}  # per kind: its newest waiting item, if a part

    def put(self, item: Item) -> None:
        with self.cond:
            if item is not None:
                kind, data = item
                part = self.last.get(kind)
                if len(data) < SMALL:
                    newest = self.items[-1] if self.items else None
                    mergeable = len(self.items) > MERGE_ANY or (newest is not None and newest[1] is part)
                    if part is not None and mergeable and len(part) + len(data) <= PART:
                        part.extend(data)
                        return  # the consumer is already awake for it
                    item = (kind, bytearray(data))
                    self.last[kind] = item[1]
                else:
                    self.last.pop(kind, None)  # what follows it must not join one before it
            self.items.append(item)
            self.cond.notify()

    def get(self, timeout: float) -> Item:
        """The next item; ``queue.Empty`` after ``timeout`` seconds without one."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.items, timeout):
                raise queue.Empty
            item = self.items.popleft()
            if item is not None and self.last.get(item[0]) is item[1]:
                del self.last[item[0]]
            return item


class _Wake(threading.Event):
    """A call's ``done`` that also wakes the feed's queue."""

    def __init__(self, wake: Inbox) -> None:
        super().__init__()
        self.wake = wake

    def set(self) -> None:
        super().set()
        self.wake.put(None)


class OutputFeed:
    """Calls ``fn(stream, text)`` for a call's output, in order per stream,
    decoded without splitting a multi-byte character (an incremental UTF-8
    decoder per stream, invalid bytes replaced)."""

    def __init__(self, fn: OnOutput) -> None:
        self.fn = fn
        self.items = Inbox()
        self.decoders = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in STREAM_NAMES}
        self.before = threading.Event()  # the call's own ``done``, replaced by ``watch``

    def sink(self, kind: int, data: bytes) -> None:
        """On the reader thread: queue only."""
        if kind in STREAM_NAMES:
            self.items.put((kind, data))

    def watch(self, call: Call) -> None:
        """Wake the feed when ``call`` ends (right after ``channel.start``)."""
        self.before, call.done = call.done, _Wake(self.items)
        if self.before.is_set():  # it ended before the swap
            call.done.set()

    def run(
        self, channel: AgentChannel, rid: int, call: Call, deadline: float | None, label: object, ends: float | None
    ) -> None:
        """On the caller's thread, until the call ends.  An exception from ``fn``
        cancels the call (the agent kills the command's process group) and propagates.
        ``deadline`` holds even while output keeps coming (a guest ignoring the timeout).
        ``ends``: the command's own timeout.  Past it ``fn`` is not called any more:
        what is queued or still comes is credited unread, so the agent, whose reply
        follows the output, answers at once (the result has all of the output)."""
        late = draining = False
        while True:
            wait = channel.idle
            if deadline is not None and not draining:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    channel.forget(rid)
                    raise AgentTimeout(f"bottle {channel.name}: no answer past the timeout of {label!r}")
            late = late or (ends is not None and time.monotonic() >= ends)
            try:
                if draining:  # what is there now, no wait
                    wait = 0.0
                elif ends is not None and not late:
                    wait = min(wait, ends - time.monotonic())
                item = self.items.get(timeout=wait)
            except queue.Empty:
                if draining:
                    break
                # The reader may have set the old event just as ``watch`` swapped it.
                # What it queued before the reply may have come in since the wait ended.
                if call.done.is_set() or self.before.is_set():
                    draining = True
                    continue
                if not late:
                    channel.check(call, "exec")
                continue
            if item is None:
                break
            kind, data = item
            if late:
                channel.grant(rid, len(data))
                continue
            try:
                self.deliver(kind, self.decoders[kind].decode(data))
            except (KeyboardInterrupt, SystemExit):  # no wait
                channel.forget(rid)
                raise
            except BaseException:  # pytest.fail() and pytest.skip() too
                self._stop(channel, rid, call, deadline)
                raise
            channel.grant(rid, len(data))
        if not late:
            for kind, decoder in self.decoders.items():
                self.deliver(kind, decoder.decode(b"", final=True))

    def _stop(self, channel: AgentChannel, rid: int, call: Call, deadline: float | None) -> None:
        """Cancel the call and wait (``STOP_WAIT`` s at most) for its reply: the
        agent replies once the command's whole group is gone, so the caller's
        next command sees none of it.  What still comes is credited, unread."""
        try:
            channel.cancel(rid)
        except AgentError:  # the channel broke: nothing to wait for
            channel.forget(rid)
            return
        end = time.monotonic() + STOP_WAIT
        if deadline is not None:
            end = min(end, deadline)
        while not (call.done.is_set() or self.before.is_set()):
            wait = min(channel.idle, end - time.monotonic())
            if wait <= 0:
                break
            try:
                item = self.items.get(timeout=wait)
            except queue.Empty:
                continue
            if item is not None:
                channel.grant(rid, len(item[1]))
        if not (call.done.is_set() or self.before.is_set()):
            channel.forget(rid)

    def deliver(self, kind: int, text: str) -> None:
        """``text`` to ``fn``, if any: the output's, and after it the agent's
        own note when the command could not start (``ExecRun``)."""
        if text:
            self.fn(STREAM_NAMES[kind], text)
