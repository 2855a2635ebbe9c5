"""The agent's file calls: write, read, stat, and directory trees both ways
(mixed into ``agent.Agent``)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

try:  # on the host, as part of the package
    from . import frames
except ImportError:  # in the guest, files side by side
    import frames  # type: ignore[import-not-found,no-redef]

SHOWN_UNSENT = 20  # sockets named in a tree's reply; the rest are counted


class FileOps:
    """Mixed into ``agent.Agent``: uses its ``emit`` and ``chan``."""

    emit: Callable[[int, int, bytes], None]
    chan: frames.Channel

    def op_write(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        """Write a file atomically; a file it replaces keeps its mode and owner
        unless a mode is given; ``into_dir`` names the file if ``path`` is a directory."""
        path = os.path.realpath(call["path"])  # through a symlink, like a shell redirect
        shown = call["path"]  # what an error names: the caller's path, not our temporary
        st = _stat(path)
        if call.get("into_dir") and st is not None and stat.S_ISDIR(st.st_mode):
            path = os.path.join(path, call["into_dir"])
            shown = os.path.join(shown, call["into_dir"])
            st = _stat(path)
        if path.startswith(("/proc/", "/sys/")) or (
            st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode))
        ):
            # Written as a shell redirect writes them: a temporary file beside
            # them cannot be made, or means nothing. A FIFO is not: opening it
            # would wait for a reader, past any cancel.
            try:
                with open(path, "wb", buffering=0) as f:
                    for chunk in inbox.chunks():
                        f.write(chunk)
            except OSError as e:  # EIO from a /proc file's write: name it
                raise _naming(e, shown) from None
            return {"size": os.path.getsize(path), "path": path}
        old = st if st is not None and stat.S_ISREG(st.st_mode) else None
        # Hidden, and a name of 255 bytes still leaves room for ours.
        head, base = os.path.split(path)
        tmp = os.path.join(head, f".{os.fsdecode(os.fsencode(base)[:200])}.bottle-{rid}.tmp")  # bytes count
        size = 0
        try:
            if not os.path.islink(call["path"]):  # a link's target's directories are not ours to make (a redirect's)
                _makedirs(os.path.dirname(path) or "/")
            with open(tmp, "wb") as f:
                for chunk in inbox.chunks():
                    size += f.write(chunk)
                mode = call.get("mode")
                if mode is None and old is not None:
                    mode = stat.S_IMODE(old.st_mode)
                if mode is not None:
                    os.fchmod(f.fileno(), int(mode))
                if old is not None:
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
            os.replace(tmp, path)
        except BaseException as e:  # data still coming stops at the reply
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(e, OSError) and e.filename in (tmp, None):  # the rename's, a full disk's: the path asked for
                raise _naming(e, shown) from None
            raise
        return {"size": size, "path": path}

    def op_read(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        size = 0
        # Opened without blocking: a FIFO's open waits for a writer, forever, in
        # a thread no cancel reaches, and would swallow that writer's data.
        fd = os.open(call["path"], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            mode = st.st_mode
            if stat.S_ISFIFO(mode):
                raise OSError(errno.EINVAL, "Is a FIFO (named pipe): read it with exec, e.g. cat", call["path"])
            if stat.S_ISDIR(mode):  # open(2) takes a directory; reading it is the error
                raise IsADirectoryError(errno.EISDIR, "Is a directory", call["path"])
            os.set_blocking(fd, True)
            f = open(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            limit = call.get("limit")  # a file known to be larger is refused before it is sent
            if isinstance(limit, int) and st.st_size > limit:
                raise OSError(errno.EFBIG, "File too large", call["path"])
            while chunk := f.read(frames.CHUNK):
                size += len(chunk)
                self.emit(rid, frames.DATA, chunk)
        self.chan.send(frames.frame(frames.EOF, rid))
        return {"size": size}

    def op_stat(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        st = os.stat(call["path"])
        return {"mode": st.st_mode, "size": st.st_size, "is_dir": os.path.isdir(call["path"]), "mtime": st.st_mtime}

    def op_untar(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        """Extract the host's tar stream into ``path`` under the PUT policy: modes
        as given (directories that were there keep theirs), owned by root (the
        agent's own), the guest's own links to directories followed like cp and
        tar do (merged /usr), never a link the stream itself made."""
        try:  # only here: every import costs time in an emulated boot
            from . import untar
        except ImportError:
            import untar  # type: ignore[import-not-found,no-redef]

        dst = call["path"]
        made = not os.path.isdir(dst)  # only a directory made here takes the archive root's mode
        _makedirs(dst)
        stream = frames.InboxReader(inbox)
        try:
            untar.extract(stream.read, dst, untar.PUT, own_root=made)
        except untar.Refused as e:  # a reply, not an error: the host raises UnsafeTransfer
            return {"refused": {"path": e.path, "reason": e.reason}}
        finally:
            stream.drain()
        return {}

    def op_tar(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        src = os.path.realpath(call["path"])  # a symlink to a directory copies the directory
        if not os.path.isdir(src):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", src)
        import tarfile

        def emit(data: bytes) -> None:
            if _cancelled(inbox):  # the host refused what it got so far: stop
                raise frames.Aborted("the host stopped reading the archive")
            self.emit(rid, frames.DATA, data)

        out = frames.FrameWriter(emit)
        current = ["."]  # the member being added: tarfile's errors do not name it
        unsent: list[str] = []  # what tar has no member for (a socket): the host names it with the skipped

        class Tar(tarfile.TarFile):
            def gettarinfo(self, *args: Any, **kwargs: Any) -> tarfile.TarInfo:
                info = super().gettarinfo(*args, **kwargs)
                if info is None:  # a socket (typeshed says it cannot be None: it is)
                    unsent.append(kwargs.get("arcname") or (args[1] if len(args) > 1 else "?"))
                return info

        def note(info: tarfile.TarInfo) -> tarfile.TarInfo:
            current[0] = info.name
            return info

        try:
            with Tar.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                tar.add(src, arcname=".", filter=note)
        except OSError as e:
            if e.filename is not None or isinstance(e, frames.Aborted):
                raise
            where = os.path.normpath(os.path.join(src, current[0]))
            if e.errno is not None:  # a real read error (EIO): as it is, with the file it came from
                raise OSError(e.errno, e.strerror, where) from None
            why = f"{e}: fewer bytes than its size (it shrank while read, or is a /sys file)"  # tarfile's own
            raise OSError(errno.EIO, why, where) from None
        out.flush()
        self.chan.send(frames.frame(frames.EOF, rid))
        return {"sockets": unsent[:SHOWN_UNSENT], "nsockets": len(unsent)} if unsent else {}


def _naming(e: OSError, path: str) -> OSError:
    """``e`` naming ``path`` (errno picks the subclass), unless it is a cancel."""
    if isinstance(e, frames.Aborted) or e.errno is None:
        return e
    return OSError(e.errno, e.strerror, path)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _makedirs(path: str) -> None:
    """``mkdir -p`` in a loop: ``os.makedirs`` recurses once per missing
    directory, and a deep path (1,500 levels) was a RecursionError."""
    missing = []
    head = path
    while head and not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head.rstrip("/"))
        if parent in (head, ""):
            break
        head = parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:  # a file where a directory must be: say that, not "exists"
            if not os.path.isdir(d):  # (one made meanwhile is fine)
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path) from None


def _cancelled(inbox: frames.Inbox) -> bool:
    with inbox.cond:
        return any(kind == frames.CANCEL for kind, _ in inbox.items)
