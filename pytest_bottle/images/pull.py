"""Images from elsewhere: ``bottle image import URL`` and pulling a missing
image from a published URL before building it.

A source is a local path, a ``file://`` URL or an ``http(s)://`` URL.  A
URL is streamed into a private directory inside the cache (a size bound,
progress while it runs) and then imported like a local file: checked whole
before anything lands (``transfer.import_file``).

A pull template (``--bottle-image-pull``, ini ``bottle_image_pull``, or a
recipe's or ``Image``'s ``pull_url``) names where a team publishes its
exports, with ``{name}`` and ``{key}`` placeholders.  A pulled file is used
only if it holds the wanted key and its images do not conflict with builds
already in the cache; otherwise the image is built as usual, and the reason
is logged and shown with the build's progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import BottleError, ImageImportError, SpecError
from ..host.locks import reporting_lock
from ..host.paths import cache_root, remove_tree
from ..host.progress import task
from ..store import entries
from .cache import images_dir, lock_path
from .transfer import Imported, import_file

log = logging.getLogger(__name__)

MAX_DOWNLOAD = 32 << 30  # an export of a few images is well under 1 GB
TIMEOUT = 60.0  # seconds without a byte before a download is given up
SHOW_EVERY = 2.0


def is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in ("http", "https", "file")


def expand(template: str, name: str, key: str) -> str:
    """The URL of image ``name`` with ``key``: its placeholders filled (``name`` quoted)."""
    return template.replace("{name}", urllib.parse.quote(name, safe="+-._")).replace("{key}", key)


@contextlib.contextmanager
def _scratch(cache_dir: Path, what: str) -> Iterator[Path]:
    """A private directory in the cache for one download (swept if we die)."""
    token = secrets.token_hex(4)
    root = images_dir(cache_dir)
    work = root / f"{entries.TMP_PREFIX}{what}-{token}-{os.getpid()}"
    lock = lock_path(cache_dir, f"{what}-{token}")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with reporting_lock(lock, f"a {what}"):
        try:
            work.mkdir(parents=True, mode=0o700)
            yield work
        finally:
            remove_tree(work)
            lock.unlink(missing_ok=True)


def download(url: str, dest: Path, *, max_bytes: int = MAX_DOWNLOAD) -> None:
    """Stream ``url`` into the new file ``dest``: at most ``max_bytes``, progress while it runs."""
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        raise ImageImportError(url, f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ImageImportError(url, f"cannot fetch it: {getattr(e, 'reason', e)}") from None
    with response, task(f"downloading {url}") as t:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and total > max_bytes:
            raise ImageImportError(url, f"it is {total} bytes, more than the limit of {max_bytes}")
        got, shown, started = 0, 0.0, time.monotonic()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except OSError as e:
                    raise ImageImportError(url, f"the download broke off after {got} bytes: {e}") from None
                if not chunk:
                    break
                got += len(chunk)
                if got > max_bytes:
                    raise ImageImportError(url, f"it is more than the limit of {max_bytes} bytes")
                out.write(chunk)
                now = time.monotonic()
                if now - shown >= SHOW_EVERY:
                    shown = now
                    of = f" of {total / 1e6:.0f}" if total else ""
                    t.stage(f"{got / 1e6:.0f}{of} MB ({got / 1e6 / max(now - started, 1e-3):.1f} MB/s)")
        if total is not None and got != total:
            raise ImageImportError(url, f"the download ended after {got} of {total} bytes")


def _local(source: str) -> Path:
    if source.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path))
    return Path(source)


def import_source(
    source: str,
    cache_dir: Path,
    *,
    want_key: str | None = None,
    replace: bool = True,
    sha256: str | None = None,
    max_bytes: int = MAX_DOWNLOAD,
) -> list[Imported]:
    """Import an export from a path or URL (see ``transfer.import_file``);
    ``sha256``: the whole file must have this checksum (checked on the bytes
    unpacked, from the same open file: a local file swapped meanwhile fails)."""
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):  # else known only after the read
        raise SpecError(f"--sha256 must be 64 hex digits (as export printed it), not {sha256!r}", "import")
    if want_key is not None and not re.fullmatch(r"[0-9a-f]{16}", want_key):
        why = f"--key must be an image key, 16 hex digits (as image list shows it), not {want_key!r}"
        raise SpecError(why, "import")
    cache_dir = cache_root(cache_dir)
    scheme = urllib.parse.urlsplit(source).scheme
    if scheme not in ("http", "https"):
        path = _local(source)
        if not path.is_file():
            raise ImageImportError(source, _not_a_file(path))
        return import_file(path, cache_dir, source=source, want_key=want_key, replace=replace, sha256=sha256)
    with _scratch(cache_dir, "download") as work:
        path = work / "export.tar.gz"
        download(source, path, max_bytes=max_bytes)
        return import_file(path, cache_dir, source=source, want_key=want_key, replace=replace, sha256=sha256)


def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return "it is a directory, not an export file"
    if path.exists():
        return "it is not a regular file (a FIFO, a device): give the export file itself"
    return "no such file"


def pull_missing(template: str, name: str, key: str, cache_dir: Path, present: Callable[[], bool]) -> str:
    """Pull image ``name`` with ``key`` from the template's URL, once across
    processes; ``""`` when it is now in the cache, else why not (logged)."""
    url = expand(template, name, key)
    lock = lock_path(cache_dir, f"pull-{key}")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with reporting_lock(lock, f"the pull of image {name}"):
        if present():
            return ""  # another process pulled it while we waited
        try:
            import_source(url, cache_dir, want_key=key, replace=False)
        except BottleError as e:
            reason = e.reason if isinstance(e, ImageImportError) else str(e)
            log.warning("pytest-bottle: not using the published image %s from %s: %s; building it", name, url, reason)
            return f"pull from {url} not used: {reason}"
    return "" if present() else f"pull from {url} did not yield {name} {key}"
