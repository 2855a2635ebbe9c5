"""Checks of what users pass to a bottle's methods, made before anything is
sent: a bad argument is a ``SpecError`` saying which, never a guest error."""

from __future__ import annotations

import errno
import fnmatch
import math
import os
import posixpath
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeGuard, Union

from .errors import SpecError

# A guest path: a str, or a path object whose fspath is one (PurePosixPath).
GuestPath = Union[str, "os.PathLike[str]"]


def check_timeout(timeout: float | None, *, optional: bool = True, zero: bool = False) -> None:
    """A timeout in seconds; None (no deadline) only where ``optional``: the
    waiting helpers need one (``GuestProcess.wait`` excepted).  0 only where
    ``zero``: a wait on what is already there (``GuestProcess.wait(0)``)."""
    if timeout is None:
        if optional:
            return
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 <= timeout < 1e9:
        if timeout > 0 or zero:
            return  # (the comparisons also reject inf and nan)
    least = "0 or a positive" if zero else "a positive"
    raise SpecError(f"timeout must be {least}, finite number of seconds (below 1e9), not {timeout!r}")


def check_days(days: float, where: str) -> None:
    """An age option (``--older-than DAYS``): nan would match nothing, a negative one everything."""
    if not (math.isfinite(days) and days >= 0):
        raise SpecError(f"--older-than must be a finite number of days >= 0, not {days!r}", where)


def raw_path(path: object) -> object:
    """``path`` as its str when it is a path object; anything else as it is."""
    return os.fspath(path) if isinstance(path, os.PathLike) else path


def local_path(path: str | os.PathLike[str]) -> Path:
    """A host path given to ``put``/``get``; an empty str names no file, as for
    ``open("")`` (``Path("")`` would be the current directory: its copy)."""
    if raw_path(path) == "":
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "")
    return Path(path)


def guest_path(path: GuestPath, what: str = "guest path") -> str:
    """An absolute guest path, normalized by its text (``//``, ``.``, and ``..``
    without following links: ``/var/run/..`` is ``/var``, where the guest's
    ``chdir`` would reach ``/`` through the ``/var/run -> /run`` link)."""
    raw = raw_path(path)
    if isinstance(raw, (bytes, bytearray)):  # "must be absolute" would puzzle: b"/x" is
        raise SpecError(f"{what} must be a str or a path object, not bytes: {path!r}")
    if not isinstance(raw, str) or not raw.startswith("/") or "\0" in raw:
        raise SpecError(f"{what} must be absolute (a str or a path object, no NUL), not {path!r}")
    return posixpath.normpath(raw)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether the entry name ``name`` is one of ``patterns`` (names or glob patterns)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def names_no_file(raw: str) -> bool:
    """A path ``open(2)`` takes for a directory, never a file: ``/``, ``f/``, ``f/.``, ``f/..``."""
    return posixpath.basename(raw) in ("", ".", "..")


def names_a_dir(raw: object) -> TypeGuard[str]:
    """A source given as a str ending with ``/`` or ``/.``: only a directory, as
    ``open(2)`` and ``cp`` take it (a path object has lost the ``/``)."""
    return isinstance(raw, str) and raw.endswith(("/", "/."))


def check_user(user: object, source: str) -> str | int | None:
    """``user=``: None, a user name or a uid (an int >= 0); the guest says
    whether it exists."""
    if user is None or (isinstance(user, int) and not isinstance(user, bool) and user >= 0):
        return user
    if isinstance(user, str) and user and "\0" not in user:
        return user
    raise SpecError(f"user must be a user name or a uid (an int >= 0), not {user!r}", source)


def check_mode(mode: object) -> int | None:
    """A file's permission bits: None (keep or default) or an int from 0 to 0o7777."""
    if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777):
        raise SpecError(f"mode must be an int from 0 to 0o7777 (like 0o644), not {mode!r}")
    return mode


def check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """Variables to add: str names (not empty, no ``=``) and str values, no NUL."""
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise SpecError(f"env must be a mapping of str to str, not {type(env).__name__}")
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise SpecError(f"env: {key!r} is not a variable name (a non-empty str without '=' or NUL)")
        if not isinstance(value, str) or "\0" in value:
            raise SpecError(f"env: the value of {key} must be a str without NUL, not {value!r}")
    return dict(env)


def check_input(data: object) -> bytes | None:
    """A command's stdin: a str (UTF-8), bytes or any bytes-like object, or None."""
    if data is None:
        return None
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise SpecError(f"input must be a str or bytes, not {type(data).__name__}")


def check_signal(sig: object) -> int:
    """A signal number (an int or ``signal.Signals``) the guest's kernel knows: 1 to 64."""
    if isinstance(sig, bool) or not isinstance(sig, int) or not 1 <= sig <= 64:
        raise SpecError(f"a signal is a number from 1 to 64 or a signal.Signals (signal.SIGTERM), not {sig!r}")
    return int(sig)


def check_port(port: object, what: str = "port") -> int:
    """A TCP port number, 1-65535."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise SpecError(f"{what} must be a TCP port number from 1 to 65535, not {port!r}")
    return port
