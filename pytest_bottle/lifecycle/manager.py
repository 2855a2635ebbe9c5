"""Bottles grouped by owner (a test, a module, the session), without pytest.

The plugin asks the manager for bottles on behalf of a group and closes the
group when its scope ends.  Groups are also what LAN names are scoped to:
``lan="x"`` in two bottles of the same group means the same L2 segment.

Pre-start: while a test runs, the manager restores the next bottle of the
same spec in the background (and runs one command in it, so the guest's
exec path is already translated).  The next test that asks for that spec
gets a fresh, never-used VM at once.  A test asking for another spec gets
its own, and the spare for the old spec is thrown away.

``BottleManager.stats`` counts what became of spares ("spare_used",
"spare_failed", "spare_dead", "spare_discarded"): a failing spare falls back to
a foreground start silently, so the suite reads these to prove pre-start
works.  Diagnostics only, not part of the public contract.  ``handed_out``
counts the bottles given to tests (the report of which hosts ran bottles).
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..bottle import Bottle
from ..errors import BottleError
from ..net.lan import LanRegistry
from ..snapshot import Snapshot, close_snapshot_scope, open_snapshot_scope
from ..spec import BottleSpec
from .launch import start_bottle

log = logging.getLogger(__name__)


@dataclass
class Group:
    key: str
    bottles: list[Bottle] = field(default_factory=list)
    lans: LanRegistry = field(default_factory=LanRegistry)


class BottleManager:
    def __init__(self, *, rebuild_before: float | None = None, keep_failed: bool = False, prestart: int = 0) -> None:
        self.rebuild_before = rebuild_before
        self.snapshots = open_snapshot_scope()  # this session's: removed by close_all
        self.keep_failed = keep_failed
        self.prestart = prestart
        self._groups: dict[str, Group] = {}
        self._lock = threading.Lock()
        self._spares: collections.deque[tuple[BottleSpec, Future[Bottle]]] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self.handed_out = 0

    def group(self, key: str) -> Group:
        with self._lock:
            return self._groups.setdefault(key, Group(key))

    def start(self, spec: BottleSpec, group_key: str, spare: bool = True) -> Bottle:
        """A bottle for ``group_key``; ``spare``: keep one of this spec ready for the
        next call (worth it for per-test bottles, not for a module's or the session's)."""
        group = self.group(group_key)
        spare = spare and self._prestartable(spec)
        bottle = self._take_spare(spec) if spare else None
        if bottle is not None:
            self.stats["spare_used"] += 1
            log.debug("%s: a pre-started spare", bottle.name)
        else:
            bottle = start_bottle(spec, rebuild_before=self.rebuild_before, detached=self.keep_failed, lans=group.lans)
        group.bottles.append(bottle)
        self.handed_out += 1
        if spare:
            self._refill(spec)
        return bottle

    def fork(self, snapshot: Snapshot, overrides: dict[str, Any], group_key: str) -> Bottle:
        """A fork of ``snapshot`` for ``group_key`` (``overrides``: checked fork arguments)."""
        group = self.group(group_key)
        bottle = snapshot.fork(overrides, detached=self.keep_failed, lans=group.lans)
        group.bottles.append(bottle)
        self.handed_out += 1
        return bottle

    # -- spares -------------------------------------------------------------

    def _prestartable(self, spec: BottleSpec) -> bool:
        # LAN membership belongs to a test's group; kept VMs must be detached.
        return self.prestart > 0 and spec.lan is None and not self.keep_failed

    def _take_spare(self, spec: BottleSpec) -> Bottle | None:
        with self._lock:
            if self._spares and self._spares[0][0] != spec:
                stale, self._spares = list(self._spares), collections.deque()
            else:
                stale = []
            future = self._spares.popleft()[1] if self._spares else None
        for _, old in stale:
            if not old.cancel():  # one not started yet is not booted just to be closed
                old.add_done_callback(_close_result)
            self.stats["spare_discarded"] += 1
        if future is None:
            return None
        try:
            bottle = future.result()
        except Exception as e:  # start one in the foreground: its error then belongs to the test
            log.debug("pre-started bottle failed, starting one now: %s", e)
            self.stats["spare_failed"] += 1
            return None
        except BaseException:  # a test timeout or Ctrl-C in the wait: the spare is no one's now
            future.add_done_callback(_close_result)
            raise
        if not bottle.alive():  # died while it waited (OOM killer, someone's kill)
            self.stats["spare_dead"] += 1
            bottle.close()
            return None
        return bottle

    def _refill(self, spec: BottleSpec) -> None:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bottle-prestart")
            while len(self._spares) < self.prestart:
                self._spares.append((spec, self._pool.submit(self._prepare, spec)))

    def _prepare(self, spec: BottleSpec) -> Bottle:
        bottle = start_bottle(spec, rebuild_before=self.rebuild_before)
        try:
            bottle.exec(["true"])
        except BaseException:
            bottle.close()
            raise
        bottle.history.clear()
        return bottle

    # -- teardown -----------------------------------------------------------

    def bottles(self, group_key: str) -> list[Bottle]:
        with self._lock:
            g = self._groups.get(group_key)
        return list(g.bottles) if g else []

    def close_group(self, group_key: str, keep: bool = False) -> list[Bottle]:
        """Close every bottle of the group, or keep those still running; return
        those it was asked to keep (``kept`` is false on one that had stopped: closed)."""
        with self._lock:
            group = self._groups.pop(group_key, None)
        if group is None:
            return []
        kept = []
        errors: list[BaseException] = []
        for bottle in reversed(group.bottles):
            try:
                if keep and not bottle.closed:
                    kept.append(bottle)
                if keep and bottle.vm_running():
                    try:
                        bottle.keep()
                    except BottleError:
                        if bottle.kept or not bottle.closed:
                            raise
                        # it stopped meanwhile: closed, and reported as not kept
                else:  # a VM that stopped in the test is not reported as running
                    bottle.close()
            except Exception as e:  # close the others anyway, then report
                errors.append(e)
        if not any(b.kept for b in kept):
            group.lans.close()
        if errors:
            raise errors[0]
        return kept

    def close_all(self) -> None:
        with self._lock:
            spares, self._spares = list(self._spares), collections.deque()
        for _, future in spares:
            if future.cancel():  # queued behind another: never booted
                continue
            try:
                future.result().close()
            except Exception as e:
                log.debug("closing a pre-started bottle: %s", e)
        for key in list(self._groups):
            try:
                self.close_group(key)
            except Exception as e:
                log.warning("closing bottles of %s failed: %s", key, e)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        close_snapshot_scope(self.snapshots)  # after the forks: none is still opening their files


def _close_result(future: Future[Bottle]) -> None:
    if future.exception() is None:
        future.result().close()
