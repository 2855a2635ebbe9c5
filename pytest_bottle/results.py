"""What a command in the guest returns."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Union

from .errors import ExecError, SpecError

Command = Union[str, Iterable[str]]  # any other iterable is read once (as_command)


def as_command(cmd: Command) -> Command:
    """``cmd`` once for all its uses: an iterator (``map``, a generator) is
    read into a list here, not used up by the first look at it (the command
    would run, then its history or result see an empty one)."""
    if isinstance(cmd, (str, bytes, bytearray, Sequence)) or not isinstance(cmd, Iterable):
        return cmd  # a non-iterable gets to_argv's TypeError
    return list(cmd)


def to_argv(cmd: Command) -> list[str]:
    """A str runs through ``/bin/sh -c``; a sequence is the argv itself."""
    if isinstance(cmd, (bytes, bytearray)):  # as subprocess takes them, not a sequence of ints
        cmd = _text(cmd)
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    if not isinstance(cmd, Iterable):
        raise TypeError(f"a command is a str, bytes or a list of arguments, not {type(cmd).__name__}")
    argv = [_text(a) if isinstance(a, (bytes, bytearray)) else str(a) for a in cmd]
    if not argv:
        raise SpecError("an empty list is no command (give the program, then its arguments)", "cmd")
    if not argv[0]:  # no program to run: said here, not in the guest's posix_spawnp words
        raise SpecError(f"the program (the first argument) is empty: {argv!r}", "cmd")
    return argv


# A first word the shell reads as syntax, not as the program to run.
_SHELL_WORDS = frozenset(
    "! { } [[ ]] case do done elif else esac fi for function if in select then time until while".split()
)


def shell_line(argv: list[str]) -> str:
    """``argv`` as ``/bin/sh -c`` runs it as that argv: quoted, and the program
    quoted even where shlex would not (``A=b`` would be an assignment, ``if`` syntax)."""
    line = shlex.join(argv)
    first = argv[0]
    if ("=" in first or first in _SHELL_WORDS) and shlex.quote(first) == first:
        line = f"'{first}'" + line[len(first) :]
    return line


def _text(raw: bytes | bytearray) -> str:
    try:
        return bytes(raw).decode()
    except UnicodeDecodeError:
        raise TypeError(f"a command given as bytes must be UTF-8: {bytes(raw)!r}") from None


@dataclass(frozen=True)
class ExecResult:
    """Exit code and output of one command.  ``stdout``/``stderr`` are decoded
    as UTF-8 with replacement; the ``*_bytes`` fields keep the exact bytes.

    Made by hand (a fake in a unit test), the output may be given as ``str``,
    positionally or as ``stdout=``/``stderr=``; it is kept UTF-8 encoded."""

    args: Command
    returncode: int
    stdout_bytes: bytes = field(repr=False, default=b"")
    stderr_bytes: bytes = field(repr=False, default=b"")
    duration: float = 0.0

    def __init__(
        self,
        args: Command,
        returncode: int,
        stdout_bytes: bytes | str = b"",
        stderr_bytes: bytes | str = b"",
        duration: float = 0.0,
        *,
        stdout: str | None = None,
        stderr: str | None = None,
    ) -> None:
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "returncode", returncode)
        object.__setattr__(self, "stdout_bytes", _output("stdout", stdout_bytes, stdout))
        object.__setattr__(self, "stderr_bytes", _output("stderr", stderr_bytes, stderr))
        object.__setattr__(self, "duration", duration)

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> ExecResult:
        """Return self, or raise ``ExecError`` if the command failed."""
        if self.returncode != 0:
            raise ExecError(self.args, self.returncode, self.stdout, self.stderr)
        return self

    def __repr__(self) -> str:
        return (
            f"ExecResult(args={self.args!r}, returncode={self.returncode}, "
            f"stdout={_clip(self.stdout)!r}, stderr={_clip(self.stderr)!r}, duration={self.duration:.3f})"
        )


def _output(name: str, raw: object, text: object) -> bytes:
    """One output stream of a hand-made result, as bytes (``TypeError`` for anything else)."""
    if text is not None:
        if raw != b"":
            raise TypeError(f"ExecResult: give {name}= or {name}_bytes, not both")
        raw = text
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw)
    raise TypeError(f"ExecResult: {name} must be str or bytes, not {type(raw).__name__}")


def _clip(s: str, n: int = 200) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


# Bytes of each output stream a command's result keeps (exec, ssh); the rest is read and dropped.
OUTPUT_CAP = 64 * 1024 * 1024


class CappedOutput:
    """One output stream kept up to ``cap`` bytes; the rest is counted and dropped.
    One buffer, not a part per frame: a guest's tiny frames cost their bytes only."""

    __slots__ = ("buf", "cap", "dropped")

    def __init__(self, cap: int) -> None:
        self.buf = bytearray()
        self.dropped = 0
        self.cap = cap

    @property
    def size(self) -> int:
        return len(self.buf)

    def add(self, data: bytes) -> None:
        room = self.cap - len(self.buf)
        if len(data) > room:
            self.dropped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        self.buf += data

    def value(self) -> bytes:
        out = bytes(self.buf)
        if self.dropped:
            note = f"\n[pytest-bottle: output truncated: {self.dropped} bytes past the first {self.cap} dropped]\n"
            out += note.encode()
        return out
