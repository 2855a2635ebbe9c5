"""Bottles grouped by owner (a test, a module, the session), without pytest.

The plugin asks the manager for bottles on behalf of a group and closes the
group when its scope ends.  Groups are also what LAN names are scoped to:
``lan="x"`` in two bottles of the same group means the same L2 segment.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from .bottle import Bottle
from .launch import start_bottle
from .net.lan import LanRegistry
from .spec import BottleSpec

log = logging.getLogger(__name__)


@dataclass
class Group:
    key: str
    bottles: list[Bottle] = field(default_factory=list)
    lans: LanRegistry = field(default_factory=LanRegistry)


class BottleManager:
    def __init__(self, *, rebuild_before: float | None = None, keep_failed: bool = False) -> None:
        self.rebuild_before = rebuild_before
        self.keep_failed = keep_failed
        self._groups: dict[str, Group] = {}
        self._lock = threading.Lock()

    def group(self, key: str) -> Group:
        with self._lock:
            return self._groups.setdefault(key, Group(key))

    def start(self, spec: BottleSpec, group_key: str) -> Bottle:
        group = self.group(group_key)
        bottle = start_bottle(spec, rebuild_before=self.rebuild_before, detached=self.keep_failed, lans=group.lans)
        group.bottles.append(bottle)
        return bottle

    def bottles(self, group_key: str) -> list[Bottle]:
        with self._lock:
            g = self._groups.get(group_key)
        return list(g.bottles) if g else []

    def close_group(self, group_key: str, keep: bool = False) -> list[Bottle]:
        """Close every bottle of the group (or keep them running); return those kept."""
        with self._lock:
            group = self._groups.pop(group_key, None)
        if group is None:
            return []
        kept = []
        errors: list[BaseException] = []
        for bottle in reversed(group.bottles):
            try:
                if keep and not bottle.closed:
                    bottle.keep()
                    kept.append(bottle)
                else:
                    bottle.close()
            except Exception as e:  # close the others anyway, then report
                errors.append(e)
        if not kept:
            group.lans.close()
        if errors:
            raise errors[0]
        return kept

    def close_all(self) -> None:
        for key in list(self._groups):
            try:
                self.close_group(key)
            except Exception as e:
                log.warning("closing bottles of %s failed: %s", key, e)
