"""``Bottle.read_bytes``: a guest file read whole into host memory, bounded."""

from __future__ import annotations

import contextlib
import errno
import io
import stat

from ..errors import BottleError, GuestOSError, OutputLimit
from ..guest.frames import DATA
from ..guest.untar import GET
from .client import AgentClient
from .transfer import Agent

# The stat behind the hint of a read too large: a guest that never answers costs this, not a hang.
INSTEAD_TIMEOUT = 10.0
USE_GET = f"use get(), which copies a regular file of up to {GET.max_bytes} bytes to disk"


def read_all(agent: Agent, path: str, cap: int, timeout: float | None) -> bytes:
    """``Bottle.read_bytes``: the whole of guest file ``path``, at most ``cap`` bytes."""
    client = AgentClient.of(agent)
    # Not a part per frame (a guest's tiny frames cost their bytes only), and
    # handed out without a copy: a file near the cap is held once, not twice.
    buf = io.BytesIO()

    def sink(kind: int, data: bytes) -> None:
        if kind == DATA:
            if buf.tell() + len(data) > cap:
                raise OutputLimit(f"{path} in {client.name} is larger than {cap} bytes")
            buf.write(data)

    try:
        client.read(path, sink, timeout=timeout, limit=cap)
    except GuestOSError as e:
        if e.errno == errno.EFBIG:  # its size said so before a byte was sent
            raise OutputLimit(f"{path} in {client.name} is larger than {cap} bytes: {USE_GET}") from None
        raise
    except OutputLimit as e:
        raise OutputLimit(f"{e}: {_instead(client, path)}") from None
    return buf.getvalue()


def _instead(client: AgentClient, path: str) -> str:
    """What to do about a file too large for memory: get() copies a regular one to disk,
    but refuses a device or a pipe, which may never end."""
    with contextlib.suppress(BottleError), client.deadline(INSTEAD_TIMEOUT):  # a hint: never a hang
        if not stat.S_ISREG(client.stat(path).mode):
            return f"it is not a regular file (get() refuses it); read a part: exec(['head', '-c', 'N', {path!r}])"
    return USE_GET
