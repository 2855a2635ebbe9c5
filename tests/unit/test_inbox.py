"""The output queue between the channel's reader and an ``on_output`` consumer
(pure logic: frames from a hostile guest, as the reader hands them over)."""

from __future__ import annotations

import queue
import tracemalloc

import pytest

from pytest_bottle.agent.calls import Call
from pytest_bottle.agent.streams import MERGE_ANY, PART, Inbox, Item, OutputFeed
from pytest_bottle.guest.frames import STDERR, STDOUT


def drain(box: Inbox) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    while True:
        try:
            item = box.get(0)
        except queue.Empty:
            return out
        assert item is not None
        out.append((item[0], bytes(item[1])))


def test_alternating_tiny_frames_cost_their_bytes_and_keep_each_streams_order() -> None:
    # A guest alternating 1-byte stdout and stderr frames made one object per
    # byte: ~128 bytes of host memory for each byte of its 4 MiB window.
    box = Inbox()
    sent = {STDOUT: bytearray(), STDERR: bytearray()}
    tracemalloc.start()
    try:
        for i in range(200_000):
            for kind in (STDOUT, STDERR):
                piece = bytes([48 + (i + kind) % 10])
                sent[kind] += piece
                box.put((kind, piece))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(box.items) <= MERGE_ANY + 2 * (400_000 // PART + 1), len(box.items)
    assert peak < 4 * 400_000, peak  # was ~50 MB
    got = drain(box)
    for kind in (STDOUT, STDERR):
        assert b"".join(d for k, d in got if k == kind) == sent[kind]


def test_a_consumer_that_keeps_up_sees_the_streams_interleaved_as_they_came() -> None:
    box = Inbox()
    for kind, data in [(STDOUT, b"a"), (STDERR, b"b"), (STDOUT, b"c"), (STDOUT, b"d"), (STDERR, b"e")]:
        box.put((kind, data))
    assert drain(box) == [(STDOUT, b"a"), (STDERR, b"b"), (STDOUT, b"cd"), (STDERR, b"e")]


def test_a_large_chunk_is_not_overtaken_by_the_small_ones_after_it() -> None:
    box = Inbox()
    for i in range(MERGE_ANY + 1):  # a lagging consumer
        box.put((STDOUT if i % 2 else STDERR, b"x"))
    box.put((STDOUT, b"L" * 5000))
    box.put((STDOUT, b"y"))
    out = b"".join(d for k, d in drain(box) if k == STDOUT)
    assert out.endswith(b"L" * 5000 + b"y"), out[-10:]


class _Channel:
    """What ``OutputFeed.run`` asks of a channel, with a short idle wait."""

    idle = 0.05
    name = "b"

    def check(self, call: object, op: str) -> None:
        pass

    def grant(self, rid: int, n: int) -> None:
        pass

    def forget(self, rid: int) -> None:
        pass


def test_output_queued_with_the_reply_after_a_quiet_wait_still_reaches_on_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reader thread queues the last output and then the reply just as the
    # consumer's wait times out: the consumer saw ``done`` and left them queued.
    seen: list[tuple[str, str]] = []
    feed = OutputFeed(lambda stream, text: seen.append((stream, text)))
    call = Call(1, None, False)
    feed.watch(call)
    real_get = Inbox.get
    raced: list[bool] = []

    def get(box: Inbox, timeout: float) -> Item:
        try:
            return real_get(box, timeout)
        except queue.Empty:
            if not raced:
                raced.append(True)
                feed.sink(STDOUT, b"last line\n")
                call.done.set()
            raise

    monkeypatch.setattr(Inbox, "get", get)
    feed.run(_Channel(), 1, call, None, "cmd", None)  # type: ignore[arg-type]
    assert raced and seen == [("stdout", "last line\n")]
