"""``Snapshot``: the saved state of a live bottle, and its forks.

``Bottle.snapshot()`` makes one (the mechanics are ``store/snapshots``); a
fork (``s.start()``, ``launch(snapshot=s)``, ``bottle_factory(snapshot=s)``)
restores it as a clone restores a seed and gets its own identity through the
clone handshake.  A snapshot lives until ``remove()`` or the end of the
process (the session) that made it; ``--bottle-save-failed`` makes *kept*
ones, which stay in the cache until ``bottle snapshot rm`` or ``prune``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BottleError, SnapshotError, SnapshotGone, SpecError
from .images import BuiltImage, Image
from .images.cache import find_image, images_dir
from .spec import PARSERS, BottleSpec, resolve
from .store import snapshots
from .store.saved import SavedState, StateCorrupt, load, lock_path, verify
from .vmm.forks import ForkSafeLock, at_exit
from .vmm.machine import QemuMachine

if TYPE_CHECKING:
    from .bottle import Bottle
    from .lifecycle.resources import Resources
    from .net.lan import LanRegistry
    from .vmm.backend import Machine

log = logging.getLogger(__name__)

# What a fork may choose; everything else is the snapshot's.
FORK_KEYS = ("forward", "timeout")


def check_fork_args(
    kwargs: dict[str, Any], source: str, snapshot: Snapshot | None = None, takes: Sequence[str] = tuple(PARSERS)
) -> dict[str, Any]:
    """The fork arguments in ``kwargs`` (``forward``, ``timeout``), checked; any
    other argument is a ``SpecError`` naming it (``None`` is "not set", as everywhere),
    unless it is one the caller ``takes`` and says what ``snapshot`` has anyway."""
    for key, value in kwargs.items():
        if key not in PARSERS:  # a misspelt name: not something the snapshot could have given
            raise SpecError(f"unknown argument {key!r}; a fork takes only {', '.join(FORK_KEYS)}", source)
        restated = key in takes and _restates(snapshot, key, value)
        if key not in FORK_KEYS and value is not None and not restated:
            raise SpecError(
                f"{key}= cannot be given to a fork of a snapshot: it comes from the snapshot "
                f"(a fork takes only {', '.join(k + '=' for k in FORK_KEYS)})",
                source,
            )
    given = {k: v for k, v in kwargs.items() if v is not None and k in FORK_KEYS}
    parsed = resolve([(source, given)], restricted=1)  # parses and names bad values
    out: dict[str, Any] = {}
    if "forward" in given:
        out["forward"] = parsed.forward
    if "timeout" in given:
        out["timeout"] = parsed.timeout
    return out


def _restates(snapshot: Snapshot | None, key: str, value: Any) -> bool:
    """Whether ``key=value`` is what the snapshot has (``cache_dir=`` given
    again to every launch, say): no change asked, so nothing to refuse.  For
    ``accel``, what its source asked for (``auto``) or what it ran on."""
    if snapshot is None:
        return False
    attr, parse = PARSERS[key]
    try:
        wanted = parse(value)
    except (ValueError, TypeError):
        return False  # a bad value: refused as any other key is
    if key == "image":  # by what it is, not how it is written: "web", WEB and a BuiltImage are one
        try:
            return Image(wanted).key == snapshot.image.key
        except BottleError:  # an unknown name
            return False
    return bool(wanted == getattr(snapshot.spec, attr) or (key == "accel" and wanted == snapshot.accel))


class Snapshot:
    """A saved state of a running bottle: fork it with ``start()`` (or
    ``bottle_factory(snapshot=...)``, ``launch(snapshot=...)``).  A context
    manager: leaving it removes the snapshot."""

    def __init__(self, state: SavedState, spec: BottleSpec, image: BuiltImage) -> None:
        self.name = state.path.name
        self.path = state.path
        self.spec = spec  # the source's; a fork may change forward and timeout
        self.accel = str(state.manifest.get("key_parts", {}).get("accel", spec.accel))  # what it ran on
        self.image = image
        self.kept = bool(state.manifest.get("kept"))
        self.source = str(state.manifest.get("source", ""))
        self.created = state.created
        self.pause_seconds = float(state.manifest.get("pause_seconds", 0.0))
        self.owner_pid = os.getpid()  # the process that removes it (not a forked child)
        self._removed = False

    def __repr__(self) -> str:
        state = "removed" if self._removed else ("kept" if self.kept else "live")
        return f"<Snapshot {self.name} of {self.source} image={self.image.name} {state}>"

    @property
    def removed(self) -> bool:
        return self._removed or not self.path.is_dir()

    def start(self, **kwargs: Any) -> Bottle:
        """A new fork; only ``forward=`` and ``timeout=`` may be given."""
        from .lifecycle.launch import as_usage_error

        try:
            overrides = check_fork_args(kwargs, "Snapshot.start()", self)
        except SpecError as e:
            raise as_usage_error(e) from None
        return self.fork(overrides)

    def fork(self, overrides: dict[str, Any], *, detached: bool = False, lans: LanRegistry | None = None) -> Bottle:
        """A fork with checked ``overrides`` (see ``check_fork_args``)."""
        from .lifecycle.launch import start_bottle

        state = self._state()
        spec = replace(self.spec, **overrides)
        return start_bottle(spec, detached=detached, lans=lans, fork_of=(self.image, state))

    def _state(self) -> SavedState:
        why = "it was removed (remove(), the end of its session, or bottle snapshot rm)"
        if self._removed:  # its files may still be there a moment: removed, not corrupt
            raise SnapshotGone(self.name, why)
        state = load(self.path)
        if state is None:
            raise _gone(self.name, self.path, why)
        snapshots.seed_of(state)  # SnapshotError if its seed was pruned: the disk would have no base
        try:
            verify(state)
        except StateCorrupt as e:
            current = load(self.path)
            if self._removed or current is None or current.created != state.created:  # removed meanwhile
                raise _gone(self.name, self.path, why) from None
            raise SnapshotError(
                self.name, "it is corrupt: " + e.reason.removeprefix(f"snapshot {self.name}: ")
            ) from None
        return state

    def remove(self) -> None:
        """Remove it now (waiting for forks that are opening its files).  Idempotent.
        Running forks are not affected."""
        with _live_lock:
            for scope in _scopes:
                scope.pop(self.name, None)
        self._removed = True
        snapshots.remove(self.path)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# -- taking them ---------------------------------------------------------------

# The snapshots made while each session runs (innermost last: a pytester
# session inside a test is a scope of its own; the first one is the process's,
# for snapshots made outside any session).  Each snapshot is removed at the end
# of its scope by the process that made it (``owner_pid``).
_scopes: list[dict[str, Snapshot]] = [{}]
_live_lock = ForkSafeLock()


def open_snapshot_scope() -> dict[str, Snapshot]:
    """Snapshots made from now on belong to a new scope (a session's), until it is closed."""
    scope: dict[str, Snapshot] = {}
    with _live_lock:
        _scopes.append(scope)
    return scope


def close_snapshot_scope(scope: dict[str, Snapshot]) -> None:
    """Remove the scope's snapshots that this process made; later ones go to the enclosing scope."""
    with _live_lock:
        for i in range(len(_scopes) - 1, 0, -1):  # by identity: two empty scopes are equal
            if _scopes[i] is scope:
                del _scopes[i]
                break
        live = list(scope.values())
        scope.clear()
    _remove_own(live)


def take_snapshot(bottle: Bottle, machine: Machine, res: Resources, *, saved_for: str | None = None) -> Snapshot:
    """Snapshot a running bottle (``Bottle.snapshot``).  ``saved_for``: the node
    id of a failed test; the snapshot is then kept (no owner, it outlives the
    session) under a name made of it (``free_saved_name``)."""
    plan = res.plan
    why = _refusal(bottle, machine, res)
    if why or plan is None or res.restored is None or not isinstance(machine, QemuMachine):
        why = why or "it was not started by this process"
        raise SnapshotError(bottle.name, f"bottle {bottle.name} cannot be snapshotted: {why}")
    spec = plan.spec
    kept = saved_for is not None
    if saved_for is not None:
        name = free_saved_name(spec.cache_dir, saved_for, bottle.name)
    else:
        name = f"{bottle.name}-{secrets.token_hex(3)}"
    snapshots.check_name(name)
    src = snapshots.Source(
        name=bottle.name,
        machine=machine,
        run_dir=res.run_dir,
        restored=res.restored,
        macs=res.macs,
        extra={"spec": _spec_fields(spec), "image_name": plan.image.name, "image_key": plan.image.key},
        resumed=lambda: _catch_up_clock(bottle),
    )
    # Its forks wake with the agent's compiled core serving them, as clones of
    # a seed do, unless it runs commands now (then the Python agent serves).
    why_not = bottle._agent.park(timeout=60)  # a clone parks from cold code: seconds on a loaded host
    if why_not is not None:
        log.debug("%s: the agent is not parked for snapshot %s: %s", bottle.name, name, why_not)
    try:
        state = snapshots.take(src, snapshots.snapshots_dir(spec.cache_dir) / name, kept=kept)
    except SnapshotError as e:
        if bottle.closed:  # another thread closed (or kept) it meanwhile: the reason, not QEMU's lost connection
            what = "kept" if bottle.kept else "closed"
            raise SnapshotError(name, f"bottle {bottle.name} was {what} while it was being snapshotted") from e
        raise
    snap = Snapshot(state, spec, plan.image)
    if not kept:
        with _live_lock:
            _scopes[-1][snap.name] = snap
    log.debug("%s: snapshot %s taken (paused %.2fs)", bottle.name, snap.name, snap.pause_seconds)
    return snap


def _catch_up_clock(bottle: Bottle) -> None:
    """The source's clock stood still while it was paused: step it to the host's."""
    try:
        bottle._agent.set_clock(time.time_ns(), timeout=30)
    except BottleError as e:  # the snapshot is whole; the bottle's next call reports a dead agent
        log.warning("bottle %s: could not set its clock after the snapshot's pause: %s", bottle.name, e)


def _refusal(bottle: Bottle, machine: Machine, res: Resources) -> str:
    if bottle.kept:  # it runs on, but no longer through this handle
        return f"it was kept: reach it with `bottle shell {bottle.name}`"
    if not bottle.alive():
        return "it was closed" if bottle.closed else "it is not running (its QEMU or its agent is gone)"
    if res.plan is not None and res.plan.spec.lan:
        return (
            f"it is on lan={res.plan.spec.lan!r}, and a fork would have to join that LAN with "
            "the same addresses (snapshot a bottle without lan=; its forks have no LAN either)"
        )
    if res.restored is None:
        return "it was booted cold (boot='cold'); snapshots are of bottles restored from a seed (the default)"
    if not isinstance(machine, QemuMachine):
        return f"its backend ({type(machine).__name__}) cannot take snapshots"
    return ""


def _spec_fields(spec: BottleSpec) -> dict[str, Any]:
    return {
        "image": spec.image if isinstance(spec.image, str) else None,
        "memory_mb": spec.memory_mb,
        "cpus": spec.cpus,
        "network": spec.network,
        "forward": list(spec.forward),
        "timeout": spec.timeout,
    }


def remove_session_snapshots() -> None:
    """Remove every snapshot this process made that is still there (its exit)."""
    with _live_lock:
        live = [snap for scope in _scopes for snap in scope.values()]
        for scope in _scopes:
            scope.clear()
    _remove_own(live)


def _remove_own(live: list[Snapshot]) -> None:
    for snap in live:
        if snap.owner_pid != os.getpid():
            continue  # a forked child's copy of its parent's list: the parent removes them
        try:
            snap.remove()
        except Exception as e:  # the others still go; the sweep takes what is left
            log.warning("removing snapshot %s failed: %s", snap.name, e)


at_exit(remove_session_snapshots, priority=10)


# -- kept snapshots (--bottle-save-failed, the CLI) ----------------------------


def saved_name(nodeid: str, bottle_name: str) -> str:
    """A kept snapshot's name: the test's name, a short hash of its whole node
    id (two tests of one name in other files or classes differ) and the bottle's."""
    test = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.rsplit("::", 1)[-1]).strip("_.-")[:60] or "test"
    return f"{test}-{hashlib.sha256(nodeid.encode()).hexdigest()[:6]}-{bottle_name}"


def free_saved_name(cache_dir: Path, nodeid: str, bottle_name: str) -> str:
    """``saved_name``, with a numbered suffix if a snapshot of that name exists
    (the same test failing again on a session bottle)."""
    base = saved_name(nodeid, bottle_name)
    root = cache_dir / "snapshots"
    name, n = base, 1
    while (root / name).exists() or lock_path(root / name).exists():
        n += 1
        name = f"{base}.{n}"
    return name


def _gone(name: str, path: Path, why: str) -> SnapshotError:
    """``SnapshotGone`` for ``why``, unless its manifest is there but does not
    read as one: then it is corrupt, not gone (``bottle snapshot rm`` removes it)."""
    if (path / "manifest.json").is_file():
        return SnapshotError(name, f"it is corrupt: {path / 'manifest.json'} does not read as a snapshot's manifest")
    return SnapshotGone(name, why)


def resolve_saved_snapshot(cache_dir: Path | str, name: str) -> Snapshot:
    """The snapshot ``name`` in ``cache_dir`` (kept or live), ready to fork, or ``SnapshotGone``."""
    snapshots.check_name(name)
    cache_dir = Path(cache_dir)  # a str too, as launch(cache_dir=) takes it
    state = load(cache_dir / "snapshots" / name)
    if state is None or state.kind != "snapshot":
        raise _gone(name, cache_dir / "snapshots" / name, f"no such snapshot in {cache_dir} (see bottle snapshot list)")
    m = state.manifest
    f = m.get("spec", {})
    image = _image_of(cache_dir, f.get("image"), str(m.get("image_name")), str(m.get("image_key")))
    if image is None:
        raise SnapshotError(name, f"its image {m.get('image_name')} ({m.get('image_key')}) is no longer in the cache")
    spec = BottleSpec(
        image=f["image"] or image.name,  # a derived image: only its name (a fork builds nothing)
        memory_mb=int(f["memory_mb"]),
        cpus=int(f["cpus"]),
        network=f["network"],
        forward=tuple(int(p) for p in f.get("forward", ())),
        timeout=float(f["timeout"]),
        cache_dir=cache_dir,
    )
    return Snapshot(state, spec, image)


def _image_of(cache_dir: Path, recipe: str | None, name: str, key: str) -> BuiltImage | None:
    """A snapshot's image as cached now: a recipe image by name, a derived one
    by its key (``images/derived-<key>``, on its parents as they are built now)."""
    try:
        image = find_image(recipe, cache_dir) if recipe else _derived(cache_dir, key)
    except Exception as e:  # e.g. a recipe this version no longer has
        log.debug("image %s of a snapshot: %s", name, e)
        return None
    return image if image is not None and image.key == key else None


def _derived(cache_dir: Path, key: str, depth: int = 0) -> BuiltImage | None:
    path = images_dir(cache_dir) / f"derived-{key}"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    parent_key = str(manifest.get("parent_key"))
    if (images_dir(cache_dir) / f"derived-{parent_key}").is_dir():
        parent = _derived(cache_dir, parent_key, depth + 1) if depth < 50 else None
    else:
        parent = find_image(str(manifest.get("parent")), cache_dir)
    if parent is None or parent.key != parent_key or manifest.get("parent_created") != parent.created:
        return None  # its parent was rebuilt or removed: this layer rests on what is gone
    if not (path / "disk.qcow2").is_file():
        return None
    return BuiltImage(str(manifest["name"]), key, path, manifest, parent)
