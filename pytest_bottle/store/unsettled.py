"""Seeds whose boot did not settle are tried once, not by every bottle.

A boot that never finishes (a ``Type=oneshot`` unit that hangs: systemd
gives it no start timeout) costs the boot and the whole settle budget per
try, minutes under TCG.  As with failed image builds (``images.failures``),
the failure is remembered for this process, and a marker beside the seed's
lock passes it to the other processes of the same pytest run and to any
process that waited on the lock while it happened.  A seed made later
removes the marker, and any of another build of its image; ``bottle image
prune`` removes those of builds no longer cached.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

from ..agent.client import NOT_SETTLED
from ..errors import BootTimeout
from ..host.paths import write_private
from ..images import failures
from ..images.cache import BuiltImage

SUFFIX = ".unsettled"

# reason, console tail, name: no traceback kept alive with its frames
_mine: dict[str, tuple[str, str, str]] = {}


def marker(final: Path) -> Path:
    return final.parent / f"{final.name}{SUFFIX}"


def _read(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def earlier(final: Path, waiting_since_ns: int) -> BootTimeout | None:
    """The seed ``final``'s settle failure in this process, in another process
    of this run, or in one that gave up after we began to wait; else None."""
    mine = _mine.get(str(final))
    if mine is not None:
        return BootTimeout(f"{mine[0]} (earlier in this process: not tried again)", mine[1], mine[2])
    data = _read(marker(final))
    if data is None:
        return None
    run = failures.run_id()
    ours = bool(run) and data.get("run") == run
    # The writer's clock, not the file's mtime: that comes from a coarser
    # clock, behind time.time_ns() by up to a tick on many kernels.
    at = data.get("at")
    if not ours and not (isinstance(at, int) and at >= waiting_since_ns):  # an older run's: may fare better
        return None
    how = "in another process of this run" if ours else "in another process while this one waited"
    reason, tail, name = (str(data.get(k, "")) for k in ("reason", "tail", "name"))
    return BootTimeout(f"{reason[:2000]} ({how}: not tried again)", tail[-8000:], name[:200])


def record(final: Path, error: BootTimeout, name: str, image: BuiltImage) -> BootTimeout:
    """``error`` named for the seed; remembered if the seed's boot did not settle."""
    named = BootTimeout(error.reason, error.console_tail, name)
    if error.reason.startswith(NOT_SETTLED):
        _mine[str(final)] = (error.reason, error.console_tail, name)
        record = {
            "run": failures.run_id(),
            "at": time.time_ns(),
            "reason": error.reason,
            "tail": error.console_tail,
            "name": name,
            # for pruning: a marker of another build is litter
            "image_key": image.key,
            "image_built": image.manifest.get("created"),
        }
        try:
            write_private(marker(final), json.dumps(record))
        except OSError:  # a read-only cache: this process still remembers
            pass
    return named


def forget(final: Path) -> None:
    """A seed was made: whatever failed before is history."""
    _mine.pop(str(final), None)
    try:
        marker(final).unlink(missing_ok=True)
    except OSError:  # a read-only cache: the seed is there all the same
        pass


class Build(Protocol):
    """A cached image build: ``BuiltImage`` or a derived image's entry."""

    @property
    def key(self) -> str: ...
    @property
    def manifest(self) -> dict[str, Any]: ...


def build(image: Build) -> tuple[str, object]:
    """What identifies one build of an image: a marker of another build is litter."""
    return image.key, image.manifest.get("created")


def prune(seeds: Path, current: Collection[tuple[str, object]], key: str | None = None) -> list[Path]:
    """Remove the markers (of image key ``key``, all if None) whose image
    build is not among ``current`` (``build``): their seeds' keys are gone."""
    gone = []
    for path in seeds.glob(f"*{SUFFIX}"):
        data = _read(path) or {}
        if key is not None and data.get("image_key") != key:
            continue
        try:
            if (data.get("image_key"), data.get("image_built")) in current:
                continue
        except TypeError:  # garbled: a list is no build of ours
            pass
        try:
            path.unlink(missing_ok=True)
        except OSError:
            continue
        gone.append(path)
    return gone
