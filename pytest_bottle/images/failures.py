"""A build that failed is tried once, not again by every test that wants it.

Within one process the error is remembered for the process's life (a pytest
run: every later test gets it at once). Across processes, a worker that
waited on the build lock while another one failed takes that failure too:
the failed build's kept log ends with its reason, and is newer than the wait.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ImageBuildError
from .builder import TAIL_LINES

REASON = "pytest-bottle: the build failed: "

_failed: dict[str, ImageBuildError] = {}


def record(final: Path, error: ImageBuildError) -> None:
    """Remember ``error`` for the entry ``final``, and end its kept log with the reason."""
    _failed[str(final)] = error
    if error.log_path:
        try:
            with open(error.log_path, "a") as log:
                log.write(f"\n{REASON}{' '.join(error.reason.splitlines())}\n")
        except OSError:
            pass


def since(final: Path, cache_dir: Path, waiting_since_ns: int, name: str) -> ImageBuildError | None:
    """The failure of a build of ``final`` (image ``name``) in this process, or in
    another one that ended after ``waiting_since_ns`` (``time.time_ns()``, the clock
    of a kept log's name, when we began to wait)."""
    mine = _failed.get(str(final))
    if mine is not None:
        return ImageBuildError(
            mine.name, f"{mine.reason} (it failed earlier in this process)", mine.log_tail, mine.log_path
        )
    newest: tuple[int, Path] | None = None
    for path in (cache_dir / "logs").glob(f"{final.name}-failed-*.log"):
        stamp = path.name.rsplit("-", 1)[-1].removesuffix(".log")
        if stamp.isdigit() and int(stamp) >= waiting_since_ns and (newest is None or int(stamp) > newest[0]):
            newest = (int(stamp), path)
    if newest is None:
        return None
    try:
        lines = newest[1].read_text(errors="replace").splitlines()
    except OSError:
        return None
    reasons = [line[len(REASON) :] for line in lines if line.startswith(REASON)]
    if not reasons:  # still being written, or not ours
        return None
    body = [line for line in lines if not line.startswith(REASON)]
    while body and not body[-1].strip():
        body.pop()
    return ImageBuildError(
        name,
        f"{reasons[-1]} (it failed in another process of this run while this one waited)",
        "\n".join(body[-TAIL_LINES:]),
        str(newest[1]),
    )
