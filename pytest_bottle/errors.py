"""Every error pytest-bottle raises.  All are picklable: they cross xdist workers."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

from .terminal_text import printable


class BottleError(Exception):
    """Base class of all pytest-bottle errors."""

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))  # pytest prints a UsageError's args
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the constructor's own arguments (see ``_args``), then
        # restore what was set since: notes (``add_note``) and other attributes.
        return (_rebuild, (type(self), self._args()), dict(vars(self)))

    def _args(self) -> dict[str, Any]:
        return {"message": self.message}

    def __str__(self) -> str:  # it carries guest text (output, console lines, the guest's own errors)
        return printable(self.message)

    def __repr__(self) -> str:  # the whole message, also where a subclass added to it after __init__
        return f"{type(self).__name__}({str(self)!r})"


def _rebuild(cls: type[BottleError], kwargs: dict[str, Any]) -> BottleError:
    return cls(**kwargs)


class HostDependencyError(BottleError):
    """A program, device or permission the host lacks; names what provides it."""

    def __init__(self, missing: str, package: str | None = None, hint: str = "") -> None:
        self.missing = missing
        self.package = package
        self.hint = hint
        msg = f"missing on this host: {missing}"
        if package:
            msg += f" (install the Debian package {package!r}: apt-get install {package})"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)

    def _args(self) -> dict[str, Any]:
        return {"missing": self.missing, "package": self.package, "hint": self.hint}


class ImageNotFound(BottleError, LookupError):
    """No recipe by that name; ``known`` lists the names there are; ``source``
    says where the name came from (e.g. ``launch()``), when known."""

    def __init__(self, name: str, known: Sequence[str] = (), source: str = "") -> None:
        self.name, self.known, self.source = name, list(known), source
        msg = f"unknown image {name!r}; known images: {', '.join(self.known) or '(none)'}"
        super().__init__(f"{source}: {msg}" if source else msg)

    def _args(self) -> dict[str, Any]:
        return {"name": self.name, "known": self.known, "source": self.source}


class ImageBuildError(BottleError):
    """An image build failed; ``log_tail`` holds the end of its log."""

    def __init__(self, name: str, reason: str = "", log_tail: str = "", log_path: str | None = None) -> None:
        self.name = name
        self.reason = reason
        self.log_tail = log_tail
        self.log_path = log_path
        msg = f"building image {name!r} failed" + (f": {reason}" if reason else "")
        if log_path:
            msg += f" (full log: {log_path})"
        if log_tail:
            msg += "\n--- build log tail ---\n" + log_tail
        super().__init__(msg)

    def _args(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason, "log_tail": self.log_tail, "log_path": self.log_path}


class BootError(BottleError):
    """The VM did not come up: QEMU exited, the kernel panicked, the agent broke."""

    def __init__(self, reason: str, console_tail: str = "", name: str = "") -> None:
        self.reason = reason
        self.console_tail = console_tail
        self.name = name
        msg = f"bottle {name} failed to boot: {reason}" if name else f"bottle failed to boot: {reason}"
        if console_tail:
            msg += "\n--- console tail ---\n" + console_tail
        super().__init__(msg)

    def _args(self) -> dict[str, Any]:
        return {"reason": self.reason, "console_tail": self.console_tail, "name": self.name}


class BootTimeout(BootError, TimeoutError):
    """The VM was not ready within its boot timeout."""


class ExecError(BottleError):
    """A command in the guest exited non-zero (from ``check=True`` / ``check_output``)."""

    def __init__(self, args: Any, returncode: int = 1, stdout: str = "", stderr: str = "") -> None:
        self.cmd = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"command {shown_command(args)} {_ended(returncode)}" + _output_tail(stdout, stderr))

    @property
    def rc(self) -> int:
        """``returncode`` (DESIGN's name)."""
        return self.returncode

    def _args(self) -> dict[str, Any]:
        return {"args": self.cmd, "returncode": self.returncode, "stdout": self.stdout, "stderr": self.stderr}


COMMAND_SHOWN = 500  # characters of a command's repr in a message: a `python3 -c SCRIPT` can be long


def shown_command(args: Any) -> str:
    """A command's repr for a message, cut to ``COMMAND_SHOWN`` characters."""
    text = repr(args)
    if len(text) <= COMMAND_SHOWN:
        return text
    return f"{text[:COMMAND_SHOWN]}... ({len(text) - COMMAND_SHOWN} more characters)"


def _output_tail(stdout: str, stderr: str) -> str:
    """What a report shows of a command's output: each stream's last 2000 characters, stderr last."""
    shown = [
        f"\n--- {name} ---\n{text[-2000:]}" for name, text in (("stdout", stdout), ("stderr", stderr)) if text.strip()
    ]
    return "".join(shown)


def _ended(returncode: int) -> str:
    """How a command ended, as a shell user reads it: a negative code is a signal."""
    if returncode >= 0:
        return f"exited with {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name} ({returncode})"
    except ValueError:  # a real-time signal has no name
        return f"was killed by signal {-returncode} ({returncode})"


class ExecTimeout(BottleError, TimeoutError):
    """A command outlived its timeout; its process group was killed."""

    def __init__(self, args: Any, timeout: float | None = None, stdout: str = "", stderr: str = "") -> None:
        self.cmd = args
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        tail = _output_tail(stdout, stderr)  # what it printed before it was killed
        after = f" after {timeout:g} s" if timeout is not None else ""
        super().__init__(f"command {shown_command(args)} timed out{after} and was killed" + tail)

    def _args(self) -> dict[str, Any]:
        return {"args": self.cmd, "timeout": self.timeout, "stdout": self.stdout, "stderr": self.stderr}


class AgentError(BottleError):
    """The VM died or its agent channel broke."""


class GuestOSError(BottleError, OSError):
    """A file operation in the guest failed (missing path, permissions...)."""

    def __init__(self, message: str, errno: int | None = None, path: str | None = None) -> None:
        BottleError.__init__(self, message)
        self.errno = errno
        self.strerror = _strerror(errno)  # as an OSError of the host's has it
        self.filename = path

    def _args(self) -> dict[str, Any]:
        return {"message": self.message, "errno": self.errno, "path": self.filename}


class GuestFileNotFoundError(GuestOSError, FileNotFoundError):
    """A guest path that does not exist."""


class GuestPermissionError(GuestOSError, PermissionError):
    """A guest path the agent may not read or write."""


class GuestIsADirectoryError(GuestOSError, IsADirectoryError):
    """A guest path that is a directory where a file was expected."""


def _strerror(errno: int | None) -> str | None:
    try:
        return os.strerror(errno) if errno else None
    except (OverflowError, ValueError):  # a guest's number far out of range
        return None


def guest_os_error(message: str, errno: int | None, path: str | None = None) -> GuestOSError:
    """The most specific GuestOSError for ``errno``."""
    import errno as E

    cls = {
        E.ENOENT: GuestFileNotFoundError,
        E.EACCES: GuestPermissionError,
        E.EPERM: GuestPermissionError,
        E.EISDIR: GuestIsADirectoryError,
    }.get(errno or 0, GuestOSError)
    return cls(message, errno, path)


class UnsafeTransfer(BottleError):
    """``get()`` or ``put()`` refused what the other side sent: a path outside the
    destination, a device, a link leading out, more than the limits allow."""

    def __init__(self, path: str, reason: str, op: str = "get", skipped: tuple[str, ...] = ()) -> None:
        self.path = path
        self.reason = reason
        self.op = op
        self.skipped = skipped  # get(): members not copied while the rest was (at most 20 named)
        super().__init__(f"{op}() refused {path!r}: {reason}" if path else f"{op}() refused the transfer: {reason}")

    def _args(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "op": self.op, "skipped": self.skipped}


class WaitTimeout(BottleError, TimeoutError):
    """A polling helper (``wait_until_succeeds``, ``wait_for_port``) gave up."""

    def __init__(self, what: str, timeout: float, last: str = "") -> None:
        self.what = what
        self.timeout = timeout
        self.last = last
        msg = f"{what} did not happen within {timeout:g} s"
        if last:
            msg += f"; last attempt: {last}"
        super().__init__(msg)

    def _args(self) -> dict[str, Any]:
        return {"what": self.what, "timeout": self.timeout, "last": self.last}


class PoolExhausted(BottleError):
    """Every address, TAP name or MAC of a pool is leased to a live owner."""

    def __init__(self, pool: str, size: int | None = None) -> None:
        self.pool = pool
        self.size = size
        every = f"all {size} entries are" if size is not None else "every entry is"
        super().__init__(f"pool {pool!r} is exhausted: {every} leased to live owners")

    def _args(self) -> dict[str, Any]:
        return {"pool": self.pool, "size": self.size}


class SpecError(BottleError, ValueError):
    """An invalid bottle argument; ``source`` says where it came from."""

    def __init__(self, message: str, source: str = "") -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)
        self.message = message

    def __str__(self) -> str:
        return printable(f"{self.source}: {self.message}" if self.source else self.message)

    def _args(self) -> dict[str, Any]:
        return {"message": self.message, "source": self.source}


class UnsafeDirectory(BottleError):
    """A state or cache directory another user could control (wrong owner, a symlink, open to others),
    or one that cannot be made or is not a directory."""

    def __init__(self, path: str, reason: str, hint: str = "") -> None:
        self.path = path
        self.reason = reason
        self.hint = hint
        msg = f"refusing to use {path}: {reason}"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)

    def _args(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "hint": self.hint}


class LockTimeout(BottleError, TimeoutError):
    """A lock on shared run state was not free within its bound; ``holder`` says who has it."""

    def __init__(self, lock: str, timeout: float, holder: str = "") -> None:
        self.lock = lock
        self.timeout = timeout
        self.holder = holder
        super().__init__(f"lock {lock} not acquired within {timeout:g} s; held by {holder or 'an unknown process'}")

    def _args(self) -> dict[str, Any]:
        return {"lock": self.lock, "timeout": self.timeout, "holder": self.holder}


class AgentTimeout(AgentError, TimeoutError):
    """A call to the agent (a file transfer, a query) did not finish within its timeout."""


class OutputLimit(BottleError):
    """The guest sent more than a call may hold in memory (see docs: limits)."""


class ProcessTimeout(ExecTimeout):
    """``GuestProcess.wait(timeout)`` gave up; unlike ``exec``, the process keeps running."""

    def __init__(self, args: Any, timeout: float, stdout: str = "", stderr: str = "") -> None:
        super().__init__(args, timeout, stdout, stderr)
        self.message = f"process {shown_command(args)} still runs after {timeout:g} s" + _output_tail(stdout, stderr)
        self.args = (printable(self.message),)


class OutputTimeout(WaitTimeout):
    """``GuestProcess.wait_for_output`` gave up: the text did not show within its
    timeout, or the process ended without it (``returncode`` set).  ``stdout``
    and ``stderr`` hold what was seen."""

    def __init__(
        self,
        pattern: str,
        timeout: float,
        stdout: str = "",
        stderr: str = "",
        returncode: int | None = None,
        lost: str = "",
        read_as: str = "",
    ) -> None:
        self.pattern = pattern
        self.stdout = stdout
        self.stderr = stderr
        self.returncode = returncode
        self.lost = lost  # why it ended without an exit of its own (its bottle closed)
        self.read_as = read_as  # how a str was read: "text" (with regex-like characters), "regex", or ""
        seen = f"stdout: {stdout[-1000:]!r}; stderr: {stderr[-1000:]!r}"
        super().__init__(f"output matching '{pattern}'", timeout, "")  # as given: repr doubles backslashes
        hint = {
            "text": " (searched as text, as written: re.compile() makes it a regex)",
            "regex": " (read as a regular expression: re.escape() makes it text)",
        }.get(read_as, "")
        if lost:  # not a wait that ran out: it ended at once (its bottle closed, say)
            self.message = f"output matching '{pattern}'{hint} cannot come: the process was lost ({lost}); {seen}"
        elif returncode is not None:  # it may have ended long before the timeout
            ended = f"did not show before the process ended ({returncode}), within the {timeout:g} s allowed"
            self.message = f"output matching '{pattern}'{hint} {ended}; {seen}"
        else:
            self.message += f"{hint}; {seen}"
        self.args = (printable(self.message),)

    def _args(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "timeout": self.timeout,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "returncode": self.returncode,
            "lost": self.lost,
            "read_as": self.read_as,
        }


class SnapshotError(BottleError):
    """A snapshot could not be taken or forked (see ``reason``): a bottle that
    cannot be snapshotted, a failed capture, a corrupt snapshot."""

    def __init__(self, snapshot: str, reason: str) -> None:
        self.snapshot = snapshot
        self.reason = reason
        super().__init__(f"snapshot {snapshot}: {reason}")

    def _args(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "reason": self.reason}


class SnapshotGone(SnapshotError, LookupError):
    """The snapshot was removed (``remove()``, its session ended, ``bottle snapshot rm``) or never existed."""


class ImageImportError(BottleError):
    """An image export file (or URL) that was refused: damaged, tampered with,
    unsafe, or not the image wanted.  Nothing of it is left in the cache."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot import {source}: {reason}")

    def _args(self) -> dict[str, Any]:
        return {"source": self.source, "reason": self.reason}


def error_line(e: BaseException) -> str:
    """How every ``bottle`` subcommand reports an error: ``bottle: ExecTimeout: ...``."""
    return f"bottle: {type(e).__name__}: {e}"
