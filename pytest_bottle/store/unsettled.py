"""Seeds whose boot did not settle are tried once, not by every bottle.

A boot that never finishes (a ``Type=oneshot`` unit that hangs: systemd
gives it no start timeout) costs the boot and the whole settle budget per
try, minutes under TCG.  As with failed image builds (``images.failures``),
the failure is remembered for this process, and a marker beside the seed's
lock passes it to the other processes of the same pytest run and to any
process that waited on the lock while it happened.  A seed made later
removes the marker.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..agent.client import NOT_SETTLED
from ..errors import BootTimeout
from ..host.paths import write_private
from ..images import failures

# reason, console tail, name: no traceback kept alive with its frames
_mine: dict[str, tuple[str, str, str]] = {}


def marker(final: Path) -> Path:
    return final.parent / f"{final.name}.unsettled"


def earlier(final: Path, waiting_since_ns: int) -> BootTimeout | None:
    """The seed ``final``'s settle failure in this process, in another process
    of this run, or in one that gave up after we began to wait; else None."""
    mine = _mine.get(str(final))
    if mine is not None:
        return BootTimeout(f"{mine[0]} (earlier in this process: not tried again)", mine[1], mine[2])
    path = marker(final)
    try:
        made = path.stat().st_mtime_ns
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    run = failures.run_id()
    ours = bool(run) and data.get("run") == run
    if not ours and made < waiting_since_ns:  # an older run's: this one may fare better
        return None
    how = "in another process of this run" if ours else "in another process while this one waited"
    reason, tail, name = (str(data.get(k, "")) for k in ("reason", "tail", "name"))
    return BootTimeout(f"{reason[:2000]} ({how}: not tried again)", tail[-8000:], name[:200])


def record(final: Path, error: BootTimeout, name: str) -> BootTimeout:
    """``error`` named for the seed; remembered if the seed's boot did not settle."""
    named = BootTimeout(error.reason, error.console_tail, name)
    if error.reason.startswith(NOT_SETTLED):
        _mine[str(final)] = (error.reason, error.console_tail, name)
        record = {"run": failures.run_id(), "reason": error.reason, "tail": error.console_tail, "name": name}
        try:
            write_private(marker(final), json.dumps(record))
        except OSError:  # a read-only cache: this process still remembers
            pass
    return named


def forget(final: Path) -> None:
    """A seed was made: whatever failed before is history."""
    _mine.pop(str(final), None)
    marker(final).unlink(missing_ok=True)
