"""A build that failed is tried once, not again by every test that wants it.

Within one process the error is remembered for the process's life (a pytest
run: every later test gets it at once). Across processes, a worker that
waited on the build lock while another one failed takes that failure too:
the failed build's kept log ends with its reason, and is newer than the wait.
So does any process of the same pytest run (``join_run``: xdist workers that
ask for the image later), since the log names the run it failed in.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ImageBuildError
from .builder import TAIL_LINES

REASON = "pytest-bottle: the build failed: "
RUN = "pytest-bottle: the build was for run "
# A failed build machine's console follows its step output in the log; the
# tail another process shows is that of the step output, as the failing one's.
CONSOLE = "--- console ---"

_failed: dict[str, ImageBuildError] = {}
_run = ""


def join_run(run_id: str) -> None:
    """Make this process one of run ``run_id``: it takes the build failures of
    the run's other processes, and its own are theirs."""
    global _run
    _run = run_id


def run_id() -> str:
    """The pytest run this process belongs to ("" outside one)."""
    return _run


def record(final: Path, error: ImageBuildError) -> None:
    """Remember ``error`` for the entry ``final``, and end its kept log with the reason."""
    _failed[str(final)] = error
    if error.log_path:
        try:
            with open(error.log_path, "a") as log:
                run = f"{RUN}{_run}\n" if _run else ""
                log.write(f"\n{run}{REASON}{' '.join(error.reason.splitlines())}\n")
        except OSError:
            pass


def since(final: Path, cache_dir: Path, waiting_since_ns: int, name: str) -> ImageBuildError | None:
    """The failure of a build of ``final`` (image ``name``) in this process, in
    another one that ended after ``waiting_since_ns`` (``time.time_ns()``, the clock
    of a kept log's name, when we began to wait), or in another one of our run."""
    mine = _failed.get(str(final))
    if mine is not None:
        return ImageBuildError(
            mine.name, f"{mine.reason} (it failed earlier in this process)", mine.log_tail, mine.log_path
        )
    logs: list[tuple[int, Path]] = []
    for path in (cache_dir / "logs").glob(f"{final.name}-failed-*.log"):
        stamp = path.name.rsplit("-", 1)[-1].removesuffix(".log")
        if stamp.isdigit() and (_run or int(stamp) >= waiting_since_ns):
            logs.append((int(stamp), path))
    for made, path in sorted(logs, reverse=True):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        reasons = [line[len(REASON) :] for line in lines if line.startswith(REASON)]
        waited = made >= waiting_since_ns
        if not reasons or not (waited or f"{RUN}{_run}" in lines):  # still being written, or not ours
            continue
        body = [line for line in lines if not line.startswith((REASON, RUN))]
        if CONSOLE in body:
            body = body[: len(body) - 1 - body[::-1].index(CONSOLE)]
        while body and not body[-1].strip():
            body.pop()
        how = "in another process while this one waited" if waited else "earlier in another process of this run"
        return ImageBuildError(
            name,
            f"{reasons[-1]} (it failed {how})",
            "\n".join(body[-TAIL_LINES:]),
            str(path),
        )
    return None
