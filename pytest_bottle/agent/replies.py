"""Typed replies of the agent's operations, checked field by field.

The guest is not trusted: a reply missing a field or holding the wrong type
is an ``AgentError`` naming the operation, never a ``KeyError`` or
``TypeError`` from deep inside the host.  Fields only shown to people (an
error text, the stderr of a failed spawn) are taken as text and cut short.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import AgentError, UnsafeTransfer

T = TypeVar("T")
# The most of a guest-sent text kept (a spawn failure's stderr, a refusal).
TEXT_CAP = 4096
# An exit code as waitpid gives it: 0..255, or -N for signal N (Linux has 64).  Past
# these, a shell's `exit $?` (mod 256) could make a failure read as success.
EXIT_MIN, EXIT_MAX = -64, 255


def shell_status(rc: object) -> int:
    """The status a shell's ``$?`` shows for exit code ``rc``: 128 + N for signal
    N, and 1 for what no real agent sends (never 0 for a failure mod 256)."""
    if type(rc) is not int or not EXIT_MIN <= rc <= EXIT_MAX:
        return 1
    return 128 - rc if rc < 0 else rc


def field(reply: Mapping[str, Any], key: str, kind: type[T], op: str, name: str) -> T:
    """``reply[key]`` if it is a ``kind`` (a bool is no int here); else AgentError."""
    value = reply.get(key)
    bad = type(value) is not kind and not (kind is float and type(value) is int)
    if kind is float and not bad and not abs(value) < 1 << 53:  # type: ignore[arg-type]
        bad = True  # nan, inf (JSON's NaN, Infinity), an int of 400 digits: no float a guest means
    if bad:
        shown = "missing" if key not in reply else f"{type(value).__name__} {value!r:.80}"
        raise AgentError(f"bottle {name}: the agent's reply to {op} has a bad {key!r} ({shown})")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class HelloReply:
    version: int
    boot_id: str
    uptime: float

    @classmethod
    def parse(cls, reply: Mapping[str, Any], name: str) -> HelloReply:
        return cls(
            field(reply, "version", int, "hello", name),
            field(reply, "boot_id", str, "hello", name),
            float(field(reply, "uptime", float, "hello", name)),
        )


@dataclass(frozen=True)
class SetupReply:
    """The guest's interface names by MAC: the NICs set up (by the MAC sent),
    and with ``list_nics`` every interface (by lower-case MAC)."""

    nics: dict[str, str]
    bottle: str = ""  # whose reply, for errors

    @classmethod
    def parse(cls, reply: Mapping[str, Any], name: str) -> SetupReply:
        nics = field(reply, "nics", dict, "setup", name)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in nics.items()):
            raise AgentError(f"bottle {name}: the agent's reply to setup names NICs oddly: {nics!r:.200}")
        return cls(dict(nics), name)

    def nic_name(self, mac: str) -> str:
        try:
            return self.nics[mac]
        except KeyError:
            raise AgentError(f"bottle {self.bottle}: the agent's reply to setup names no NIC with MAC {mac}") from None


@dataclass(frozen=True)
class ExecReply:
    """A finished command: its exit code, whether its timeout killed it, and
    its output (stderr ends with the agent's own note when the spawn failed)."""

    rc: int
    timed_out: bool
    stdout: bytes
    stderr: bytes

    @classmethod
    def parse(cls, reply: Mapping[str, Any], stdout: bytes, stderr: bytes, name: str) -> ExecReply:
        rc = reply.get("rc")
        if type(rc) is not int:  # a bool is no exit code either
            raise AgentError(f"bottle {name}: the agent's reply to exec has no exit code: {reply!r:.200}")
        if not EXIT_MIN <= rc <= EXIT_MAX:
            raise AgentError(f"bottle {name}: the agent's reply to exec has an exit code no process can have: {rc}")
        note = str(reply.get("stderr_text", ""))[:TEXT_CAP].encode()
        return cls(rc, bool(reply.get("timed_out")), stdout, stderr + note)


@dataclass(frozen=True)
class WriteReply:
    size: int
    path: str  # where it went: through a link, into a directory

    @classmethod
    def parse(cls, reply: Mapping[str, Any], name: str) -> WriteReply:
        return cls(field(reply, "size", int, "write", name), field(reply, "path", str, "write", name))


@dataclass(frozen=True)
class ReadReply:
    size: int

    @classmethod
    def parse(cls, reply: Mapping[str, Any], name: str) -> ReadReply:
        return cls(field(reply, "size", int, "read", name))


@dataclass(frozen=True)
class StatReply:
    mode: int
    is_dir: bool
    mtime: float | None = None  # None: none given, or none a file could hold

    @classmethod
    def parse(cls, reply: Mapping[str, Any], path: str) -> StatReply:
        """A malformed reply refuses the transfer it was asked for (``UnsafeTransfer``)."""
        mode, is_dir, mtime = reply.get("mode"), reply.get("is_dir"), reply.get("mtime")
        if type(mode) is not int or not 0 <= mode < 1 << 32 or type(is_dir) is not bool:
            raise UnsafeTransfer(path, f"a malformed stat reply from the guest: {str(reply)[:200]}")
        if not (isinstance(mtime, (int, float)) and type(mtime) is not bool and 0 <= mtime < 1 << 40):
            mtime = None  # not a time a file could hold: nan, inf, a bool, a str...
        return cls(mode, is_dir, None if mtime is None else float(mtime))


@dataclass(frozen=True)
class UntarReply:
    """What the guest refused to extract (it stopped there), if anything."""

    refused: tuple[str, str] | None  # (path, reason)

    @classmethod
    def parse(cls, reply: Mapping[str, Any]) -> UntarReply:
        refused = reply.get("refused")
        if not isinstance(refused, dict):
            return cls(None)
        return cls((str(refused.get("path", ""))[:TEXT_CAP], str(refused.get("reason", ""))[:TEXT_CAP]))


@dataclass(frozen=True)
class ListeningReply:
    ports: frozenset[int]

    @classmethod
    def parse(cls, reply: Mapping[str, Any], name: str) -> ListeningReply:
        ports = field(reply, "ports", list, "listening", name)
        if not all(type(p) is int for p in ports):
            raise AgentError(f"bottle {name}: the agent's reply to listening has bad ports: {ports!r:.200}")
        return cls(frozenset(ports))


@dataclass(frozen=True)
class SettleReply:
    state: str  # systemd's, "" without systemd or when it did not finish
    quiet: float  # seconds the machine was idle at the end
    busy: str  # "systemd" or "udev" if still at work when the time was up, else ""
    running: tuple[str, ...] = ()  # units systemd was still starting then (the guest's words)

    @classmethod
    def parse(cls, reply: Mapping[str, Any], name: str) -> SettleReply:
        busy = field(reply, "busy", str, "settle", name)
        if busy not in ("", "systemd", "udev"):
            raise AgentError(f"bottle {name}: the agent's reply to settle has a bad 'busy' ({busy!r:.80})")
        state, quiet = field(reply, "state", str, "settle", name), field(reply, "quiet", float, "settle", name)
        running = field(reply, "running", list, "settle", name)
        if len(running) > 5 or not all(type(u) is str and 0 < len(u) <= 256 and u.isprintable() for u in running):
            raise AgentError(f"bottle {name}: the agent's reply to settle has a bad 'running' ({running!r:.200})")
        return cls(state, float(quiet), busy, tuple(running))
