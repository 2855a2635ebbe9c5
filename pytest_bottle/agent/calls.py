"""One call's bookkeeping on the host, and how a guest's failure reply becomes
a host error: the parts of the channel that know nothing of the socket."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Any

from ..errors import AgentError, SpecError, guest_os_error
from ..guest.frames import WINDOW
from .replies import TEXT_CAP

Sink = Callable[[int, bytes], None]


class CallOver(Exception):
    """The call ended (replied, lost) while data for it was still to be sent."""


class ProtocolError(Exception):
    """A frame no agent of ours sends: the channel cannot be trusted any more."""


class Gone(AgentError):
    """A send found QEMU's end of the socket gone: the VM exited."""


class Call:
    """A call in flight: its reply (or why it has none) and its flow-control state."""

    __slots__ = ("auto", "done", "error", "lost", "owed", "reply", "rid", "sink", "unacked", "window")

    def __init__(self, rid: int, sink: Sink | None, auto: bool) -> None:
        self.rid = rid
        self.done = threading.Event()
        self.reply: dict[str, Any] | None = None
        self.sink = sink
        self.error: BaseException | None = None  # the sink's own failure (a full local disk...)
        self.lost = ""  # why the call failed without a reply (the agent restarted...)
        self.auto = auto  # credit goes back as the sink returns, not from the consumer
        self.owed = 0  # consumed stream bytes not yet credited back
        self.unacked = 0  # stream bytes received and not yet credited back
        self.window = WINDOW  # bytes we may still send the agent for this call


def lose(calls: list[Call], reason: str) -> None:
    """End calls that will get no reply; ``reason`` (if any) is what their waiters read."""
    for call in calls:
        if reason:
            call.lost = reason
        call.done.set()


def guest_error(reply: dict[str, Any], op: str) -> Exception:
    """The host error for a reply with ``ok`` false."""
    msg = str(reply.get("error", "unknown error"))[:TEXT_CAP]  # a guest's words end up in reports
    if reply.get("type") == "OSError" or reply.get("errno") is not None:
        errno, path = reply.get("errno"), reply.get("path")  # a hostile guest may send anything
        return guest_os_error(
            f"in the guest: {msg}", errno if type(errno) is int else None, path if isinstance(path, str) else None
        )
    if reply.get("type") == "ValueError":  # a bad argument the guest could not honour (e.g. user=)
        return SpecError(msg.removeprefix("ValueError: "), f"{op}()")
    return AgentError(f"agent error during {op}: {msg}")


# A JSON escape of a UTF-16 surrogate: ``json.loads`` makes a lone one a str
# that cannot be encoded (a pair becomes one character and is fine).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


# The agent's replies nest a few levels (a list of NICs, each a dict).  A guest
# may send ~1,000 that decode fine on the reader's short stack and then make a
# RecursionError wherever a test prints them, 100 frames deep under pytest.
MAX_REPLY_DEPTH = 32


def too_deep(value: Any, limit: int) -> bool:
    """Whether lists and dicts in ``value`` nest deeper than ``limit`` (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        inner = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((v, depth + 1) for v in inner if isinstance(v, (dict, list)))
    return False


def decode_reply(payload: bytes) -> dict[str, Any]:
    """A REPLY frame's JSON object, or ``ProtocolError``."""
    # Strict UTF-8 first: json.loads of bytes would also take UTF-16 and
    # surrogates encoded as UTF-8, which no escape check sees.
    try:
        reply = encodable(payload, json.loads(payload.decode("utf-8")))
    except RecursionError:  # deeper than the parser goes: too_deep's refusal, before it could look
        raise ProtocolError(f"a REPLY nested deeper than {MAX_REPLY_DEPTH} levels: {payload[:80]!r}") from None
    if not isinstance(reply, dict):
        raise ProtocolError(f"a REPLY that is not a JSON object: {payload[:80]!r}")
    if too_deep(reply, MAX_REPLY_DEPTH):
        raise ProtocolError(f"a REPLY nested deeper than {MAX_REPLY_DEPTH} levels: {payload[:80]!r}")
    return reply


def encodable(payload: bytes, value: Any) -> Any:
    """``value`` (``json.loads(payload)``) with every lone surrogate a guest put
    in its strings written as ``\\udXXX``: such a str raises ``UnicodeEncodeError``
    wherever it is printed, pickled to an xdist controller or encoded."""
    if not _SURROGATE_ESCAPE.search(payload):
        return value  # the usual reply: one scan, nothing rebuilt
    return _fix(value)


def _fix(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_fix(v) for v in value]
    if isinstance(value, dict):
        return {_fix(k): _fix(v) for k, v in value.items()}
    return value
