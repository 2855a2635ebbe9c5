"""The file calls of a ``Bottle``: read and write guest files, copy trees in and out.

All of them go through the agent channel (the mechanics are ``agent.transfer``),
check their arguments before anything is sent, and are bounded by a timeout.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from .agent.client import AgentClient
from .agent.reads import read_all
from .agent.transfer import fetch, put
from .arguments import (
    GuestPath,
    check_mode,
    check_timeout,
    guest_path,
    local_path,
    names_a_dir,
    names_no_file,
    raw_path,
)
from .errors import guest_os_error

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

PathLike = str | os.PathLike[str]
# Default timeout of each file call (read/write/put/get), seconds; None waits as
# long as the agent answers (a dead agent still fails the call, see channel.py).
FILE_TIMEOUT = 300.0
# The most read_bytes/read_text hold in memory (use get() for more).
READ_CAP = 1024 * 1024 * 1024


class BottleFiles:
    """The file methods of ``Bottle`` (a mixin): they need only its agent client."""

    _agent: AgentClient

    def write_bytes(
        self, path: GuestPath, data: ReadableBuffer, mode: int | None = None, *, timeout: float | None = FILE_TIMEOUT
    ) -> None:
        """Write ``data`` to guest ``path`` (parents created, replaced atomically).

        ``timeout`` (seconds, default ``FILE_TIMEOUT``; None: no deadline) bounds
        the whole call; past it ``AgentTimeout`` is raised and nothing is written
        (unless all of ``data`` had reached the guest: see docs/reference.md)."""
        if isinstance(data, str):  # the mirror of write_text's check (memoryview said less)
            raise TypeError("write_bytes takes bytes, not str (write_text takes a str)")
        raw = raw_path(path)
        path = guest_path(path)
        check_timeout(timeout)
        check_mode(mode)
        if isinstance(raw, str) and names_no_file(raw):  # as open(2) refuses it: never a file named f
            raise guest_os_error(f"{raw}: a file path cannot end with '/', '.' or '..'", errno.EISDIR, raw)
        # memoryview: a non-buffer is refused here, before a call is sent; any buffer is taken
        self._agent.write(path, memoryview(data), mode=mode, timeout=timeout)

    def write_text(
        self,
        path: GuestPath,
        text: str,
        mode: int | None = None,
        encoding: str | None = "utf-8",
        *,
        errors: str | None = None,
        newline: str | None = None,
        timeout: float | None = FILE_TIMEOUT,
    ) -> None:
        """``text`` as ``pathlib.Path.write_text`` writes it on Linux: ``errors``
        and ``newline`` as ``open()`` takes them (``"\r\n"``: each ``\n``
        written as CRLF), ``None`` for UTF-8 and strict errors."""
        if not isinstance(text, str):
            raise TypeError(f"write_text takes a str, not {type(text).__name__} (write_bytes takes bytes)")
        if newline not in (None, "", "\n", "\r", "\r\n"):
            raise ValueError(f"illegal newline value: {newline!r}")  # open()'s words
        if newline in ("\r", "\r\n"):
            text = text.replace("\n", newline)
        self.write_bytes(path, text.encode(encoding or "utf-8", errors or "strict"), mode, timeout=timeout)

    def read_bytes(self, path: GuestPath, *, timeout: float | None = FILE_TIMEOUT) -> bytes:
        """The contents of guest ``path``; at most ``READ_CAP`` bytes (``OutputLimit``
        past it: use ``get`` for more); ``AgentTimeout`` after ``timeout`` s."""
        raw, path = raw_path(path), guest_path(path)
        check_timeout(timeout)
        if names_a_dir(raw) and path != "/":
            path += "/"  # as open(2) takes "f/": ENOTDIR for a file, not the file
        return read_all(self._agent, path, READ_CAP, timeout)

    def read_text(
        self,
        path: GuestPath,
        encoding: str | None = "utf-8",
        errors: str | None = None,
        *,
        timeout: float | None = FILE_TIMEOUT,
    ) -> str:
        """The file as text, exactly (no newline translation); ``encoding`` and
        ``errors`` as ``pathlib.Path.read_text`` takes them, ``None`` for UTF-8
        and strict errors."""
        return self.read_bytes(path, timeout=timeout).decode(encoding or "utf-8", errors or "strict")

    def put(self, src: PathLike, dst: GuestPath, *, timeout: float | None = FILE_TIMEOUT) -> None:
        """Copy a local file or directory to guest ``dst``, keeping modes.

        A directory's contents land in ``dst``; a file becomes ``dst`` (or
        goes inside it when ``dst`` ends with ``/``, ``/.`` or ``/..``).  ``AgentTimeout`` after
        ``timeout`` seconds.
        """
        check_timeout(timeout)
        if names_a_dir(raw := raw_path(src)):
            try:
                os.stat(raw)  # as open() takes "f/": NotADirectoryError for a file (Path drops the "/")
            except FileNotFoundError:
                pass  # put() names a missing source by its absolute path
        put(self._agent, local_path(src), dst, timeout)

    def get(self, src: GuestPath, dst: PathLike, *, timeout: float | None = FILE_TIMEOUT) -> None:
        """Copy a guest file or directory to local ``dst``: files, directories and
        symlinks staying inside ``dst`` only, modes masked with 0o755, never
        chowned (see ``transfer``). Links leading out, devices and fifos are
        skipped and the rest copied, then ``UnsafeTransfer`` names them
        (``skipped``); anything else refused stops at once with ``UnsafeTransfer``.
        Streams to disk (a window at a time); ``AgentTimeout`` after ``timeout`` s.
        A file goes inside ``dst`` when it is a directory or ends with ``/``, ``/.`` or ``/..``."""
        check_timeout(timeout)
        into = isinstance(dst, (str, os.PathLike)) and names_no_file(str(os.fspath(dst)))  # "d/", "d/.", "d/.."
        raw, path = raw_path(src), guest_path(src)
        with self._agent.deadline(timeout):
            # "f/" names a directory, as for open(2): a file there is ENOTDIR (a rare form: one more stat)
            if names_a_dir(raw) and not AgentClient.of(self._agent).stat(path).is_dir:
                raise guest_os_error(f"in the guest: [Errno 20] Not a directory: '{path}/'", errno.ENOTDIR, path + "/")
            fetch(self._agent, path, local_path(dst), into=into)
