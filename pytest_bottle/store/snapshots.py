"""Snapshots of a live bottle: saved states (``saved``) taken from a running machine.

A snapshot is a ``saved.create`` entry under ``<cache>/snapshots/<name>``
(two levels down, like seeds and run directories, so a disk's relative
backing names resolve the same from each).  Its capture:

1. starts a *receiver*: a second QEMU of the same machine, paused
   (``-S -incoming defer``), its RAM a shared file in the new entry;
2. pauses the source, puts a fresh qcow2 overlay on top of its disk
   (``blockdev-snapshot``: the old top is frozen, the source writes on the
   new one), writes its whole state (RAM included) to a file in the entry,
   and resumes it: the source pauses for as long as its RAM takes to write
   (0.2-0.5 s for 512M under TCG), and its clock, which stood still as long,
   is stepped to the host's (``Source.resumed``);
3. has the receiver load that file (its RAM lands in ``memory.ram``) and
   save its device state, exactly as a seed's is saved, then ends it;
4. takes the frozen disk as the entry's ``disk.qcow2``: a hard link when it
   is one layer on the seed's disk (the first snapshot of a bottle restored
   from a seed: nothing is copied), else a copy of it safely rebased onto
   the seed (``qemu-img rebase``: what the layers in between hold is copied
   in), so that no snapshot depends on another.  The layers in between are
   read by path; the one of a snapshot that was removed since the source
   forked from it is read through the source QEMU, which keeps it open.

``key_parts`` are the seed's (a fork needs the same machine) and
``RestsOn.on_state(seed, entry)`` names the seed.  A fork is a seed restore
of this entry (``lifecycle/launch``).

Ownership: an entry made for a session carries ``owner.json`` (pid and start
time, as run directories do); its session removes it at its end, and the
sweep removes one whose owner is dead.  A *kept* entry (``--bottle-save-failed``)
has no owner: it stays until ``bottle snapshot rm`` or ``prune``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import BootError, SnapshotError
from ..host.deps import require
from ..host.paths import remove_tree
from ..host.runstate import MARKER, owner_identity, write_marker
from ..vmm import console
from ..vmm.machine import DISK, QemuMachine
from ..vmm.qemu import MachineConfig
from ..vmm.qmp import FAILED as QMP_FAILED
from . import entries
from .saved import RestsOn, SavedState, create, entry_lock, in_use, load, lock_path, remove_entry

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 300.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def snapshots_dir(cache_dir: Path) -> Path:
    d = cache_dir / "snapshots"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


# Endings of the names of entries put aside (``entries.entry_of`` strips them).
_RESERVED_ENDINGS = (".lock", "-rm", "-old", "-prune", "-discard")


def check_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or not _NAME_RE.fullmatch(name)
        or name.startswith(".")
        or name.endswith(_RESERVED_ENDINGS)
    ):
        raise SnapshotError(
            str(name),
            "a snapshot name is letters, digits, '.', '_' or '-' (at most 100), "
            f"starting with a letter or digit, not ending in {', '.join(_RESERVED_ENDINGS)}",
        )
    return name


@dataclass(frozen=True)
class Source:
    """What a snapshot needs of a running bottle (``Bottle.snapshot`` gathers it)."""

    name: str
    machine: QemuMachine
    run_dir: Path
    restored: SavedState  # the state it was restored from: a seed or a snapshot
    macs: tuple[str, ...]  # the guest's MACs now (the handshake set them)
    extra: dict[str, Any]  # manifest fields of the caller's (what a fork must know)
    # Called as soon as the source runs on: its clock lost the pause, which the
    # caller puts right (a failure is the caller's to report, not the snapshot's).
    resumed: Callable[[], None] = lambda: None


def seed_of(state: SavedState) -> SavedState:
    """The seed at the bottom of a state (itself for a seed); ``SnapshotError``
    when that seed can no longer be its disk's base: gone, made again, or its
    image rebuilt under it."""
    if state.kind != "snapshot":
        return state
    base = state.rests_on
    seed = load(Path(os.path.normpath(state.path / base.parent))) if base.parent else None
    if seed is None:
        raise SnapshotError(state.path.name, "the seed it was taken from is gone (pruned or rebuilt)")
    if base.parent_created is not None and seed.created != base.parent_created:
        raise SnapshotError(state.path.name, "the seed it was taken from was made again (--bottle-rebuild)")
    if why := _base_changed(seed):
        raise SnapshotError(state.path.name, f"the seed it was taken from {why}")
    return seed


def _base_changed(seed: SavedState) -> str:
    """Why the image disk under ``seed`` is not the one it was made on (or "")."""
    chain = seed.rests_on.disk_chain
    if not chain:
        return ""
    image_disk = Path(os.path.normpath(seed.path / chain[0]))
    try:
        built = json.loads((image_disk.parent / "manifest.json").read_text()).get("created")
    except (OSError, ValueError, AttributeError):
        return f"rests on the image disk {image_disk.name}, which is gone"
    if built != seed.manifest["key_parts"].get("image_built"):
        return "rests on an image that was rebuilt since (--bottle-rebuild)"
    return ""


def take(src: Source, final: Path, *, kept: bool) -> SavedState:
    """Snapshot ``src`` into the new entry ``final`` (see the module doc)."""
    seed = seed_of(src.restored)
    final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def capture(tmp: Path) -> dict[str, Any]:
        if not kept:  # before anything big is written: a crash from here on is swept
            write_marker(tmp, *owner_identity())
        started = time.monotonic()
        with src.machine.snapshot_lock:
            paused = _capture_machine(src, tmp)
        _take_disk(src.machine, paused.frozen, seed, src.restored, tmp)
        with contextlib.suppress(OSError):
            console.copy_tail(src.machine.console_log, tmp / "console.log")
        return {
            **src.extra,
            "kind": "snapshot",
            "source": src.name,
            "kept": kept,
            "guest_macs": list(src.macs),
            "nic_names": list(src.restored.nic_names),
            "pause_seconds": round(paused.seconds, 3),
            "capture_seconds": round(time.monotonic() - started, 3),
        }

    try:
        # The seed held against pruning: its disk is read (step 4) and becomes the entry's base.
        with in_use(seed), entry_lock(final):
            if final.exists():  # never replaced: its forks and its owner would lose it
                raise SnapshotError(final.name, "a snapshot of that name exists")
            # Only a kept snapshot outlives its session: only it waits for the disk.
            key_parts = src.restored.manifest["key_parts"]
            return create(final, capture, key_parts, RestsOn.on_state(seed, final), durable=kept)
    except (BootError, subprocess.SubprocessError, *QMP_FAILED) as e:
        reason = e.reason if isinstance(e, BootError) else f"{type(e).__name__}: {e}"
        raise SnapshotError(final.name, f"taking it from bottle {src.name} failed: {reason}") from None
    finally:
        if not final.exists():  # failed: nothing will use the name again
            lock_path(final).unlink(missing_ok=True)


@dataclass(frozen=True)
class _Paused:
    frozen: Path  # the source's disk as it was, no longer written
    seconds: float  # how long the source was paused


def _capture_machine(src: Source, tmp: Path) -> _Paused:
    """Steps 1-3 of the module doc: ``memory.state`` and ``memory.ram`` in ``tmp``."""
    machine = src.machine
    # A file, not a pipe to the receiver: the source runs on as soon as its
    # state is written, not once another QEMU has taken it in.
    stream = tmp / "stream"
    helper_dir = tmp / "receiver"
    helper_dir.mkdir(mode=0o700)
    size = machine.disk_size()
    top = machine.top_disk
    overlay = top.with_name(f"disk-{time.time_ns()}.qcow2")
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", top.name, "-u", str(overlay), str(size))
    # The receiver never runs: its disk only has to exist (on the source's top it
    # would conflict with the source's write lock).
    _qemu_img("create", "-q", "-f", "qcow2", str(helper_dir / DISK), str(size))
    receiver = QemuMachine.start(_receiver_config(machine.cfg, tmp), helper_dir, name=f"{src.name}-receiver")
    try:
        started = time.monotonic()
        try:  # also a stop QEMU did not answer in time: it may still happen, and the source must run on
            machine.pause()
            frozen = machine.freeze_disk(overlay)
            machine.stream_state(stream, SNAPSHOT_TIMEOUT)
        finally:
            _resume(machine, src.name)
            seconds = time.monotonic() - started
            src.resumed()  # its clock caught up, also when the capture failed
        loading = time.monotonic()
        receiver.receive_state(stream)
        receiver.wait_received(SNAPSHOT_TIMEOUT)
        receiver.save_state(tmp / "memory.state", SNAPSHOT_TIMEOUT)
        log.debug("%s: paused %.2fs, receiver loaded and saved in %.2fs", src.name, seconds, time.monotonic() - loading)
    finally:
        receiver.stop(grace=0.5)
        stream.unlink(missing_ok=True)
        remove_tree(helper_dir)
    return _Paused(frozen, seconds)


def _resume(machine: QemuMachine, name: str) -> None:
    """Run the source on, whatever happened while it was paused; a source that
    cannot run on is stopped (a bottle left paused would only time out later)."""
    try:
        machine.resume()
    except (BootError, *QMP_FAILED) as e:
        reason = e.reason if isinstance(e, BootError) else f"{type(e).__name__}: {e}"
        machine.stop(grace=0.5)
        raise BootError(f"bottle {name} could not run on after the pause ({reason}); it was stopped") from None


def _receiver_config(cfg: MachineConfig, tmp: Path) -> MachineConfig:
    """The source's machine, paused, waiting for a state, its RAM written through
    to the entry's ``memory.ram`` (as a seed's is); no host ports, no TAP."""
    nics = tuple(replace(n, forwards=()) if n.kind == "user" else replace(n, kind="hubport") for n in cfg.nics)
    return replace(cfg, restore=None, save_ram=tmp / "memory.ram", nics=nics, extra_args=("-S", "-incoming", "defer"))


def _take_disk(machine: QemuMachine, frozen: Path, seed: SavedState, restored: SavedState, tmp: Path) -> None:
    """``tmp/disk.qcow2``: one layer on ``seed``'s disk (see the module doc, step 4)."""
    out = tmp / "disk.qcow2"
    if _same_file(_backing(frozen), seed.disk):
        try:
            os.link(frozen, out)
        except OSError as e:  # another file system, or links not allowed: copy instead
            log.debug("cannot link %s: %s", frozen, e)
        else:
            # Its backing name is relative: it must name the seed from here as from the run directory.
            if _same_file(_backing(out), seed.disk):
                return
            out.unlink()
    # A copy of the top layer, then a safe rebase onto the seed: every cluster
    # that the layers between them hold is copied in.  (``qemu-img convert -B``
    # would copy the top layer only.)
    shutil.copyfile(frozen, out)
    top = {"driver": "qcow2", "file": {"driver": "file", "filename": str(out)}}
    top["backing"] = _chain_below(machine, frozen, seed, restored)
    _qemu_img("rebase", "-U", "-F", "qcow2", "-b", str(seed.disk), "json:" + json.dumps(top))
    _qemu_img("rebase", "-u", "-F", "qcow2", "-b", os.path.relpath(seed.disk, tmp), str(out))


def _chain_below(machine: QemuMachine, frozen: Path, seed: SavedState, restored: SavedState) -> dict[str, Any]:
    """The layers under ``frozen`` down to the seed's disk, each named (a QEMU
    block node spec).  The snapshot a fork came from may have been removed
    since: its layer is read through the source QEMU, which still has it open."""
    layers: list[str] = []
    path = _backing(frozen)
    while not _same_file(path, seed.disk):
        if path is None or len(layers) > 100:
            raise BootError(f"the disk of bottle {machine.qmp.name} does not rest on the seed {seed.path.name}")
        if not path.exists():
            layers.append(_held_open(machine, path, restored))
            break  # a removed layer is a snapshot's, and a snapshot rests on the seed
        layers.append(str(path))
        path = _backing(path)
    node: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": str(seed.disk)}}
    for layer in reversed(layers):
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": layer}, "backing": node}
    return node


def _held_open(machine: QemuMachine, path: Path, restored: SavedState) -> str:
    """A ``/proc`` path to the removed layer ``path`` that QEMU still has open."""
    entry = path.parent.name
    size = restored.manifest["files"]["disk.qcow2"]["size"] if restored.path.name == entry else None
    fds = Path(f"/proc/{machine.pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                target = Path(os.readlink(fd).removesuffix(" (deleted)"))
                aside = entries.is_tmp(target.parent) and entries.entry_of(target.parent.name) == entry
                named = target.name == path.name and (target.parent.name == entry or aside)
                if named and size in (None, fd.stat().st_size):
                    return str(fd)
    why = f"it was removed, and bottle {machine.qmp.name}, a fork of it, no longer has its disk open"
    raise SnapshotError(entry, why)


def _same_file(a: Path | None, b: Path) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _backing(disk: Path) -> Path | None:
    out = _qemu_img("info", "-U", "--output=json", str(disk))
    name = json.loads(out).get("backing-filename")
    return Path(os.path.normpath(disk.parent / name)) if name else None


def _qemu_img(*args: str) -> str:
    argv = [require("qemu-img", "take snapshots"), *args]
    try:
        r = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=SNAPSHOT_TIMEOUT)
    except subprocess.CalledProcessError as e:
        raise BootError(f"qemu-img {args[0]} failed: {e.stderr.strip()[-500:]}") from None
    return r.stdout


# -- finding and removing ------------------------------------------------------


def list_snapshots(cache_dir: Path) -> list[SavedState]:
    root = cache_dir / "snapshots"
    found = [load(p) for p in entries.list_entries(root)]
    return [s for s in found if s is not None and s.kind == "snapshot"]


def is_kept(state: SavedState) -> bool:
    return bool(state.manifest.get("kept")) and not (state.path / MARKER).exists()


def remove(path: Path) -> bool:
    """Remove a snapshot entry (waiting for forks that are opening its files)."""
    if not path.exists() and not lock_path(path).exists():
        return False  # already gone: taking its lock would leave a lock file
    with entry_lock(path):
        gone = remove_entry(path, "rm")
        # Also when it was gone already: a fork that lost the race, or another
        # remove(), may have made the lock file again.  No snapshot takes this name again.
        lock_path(path).unlink(missing_ok=True)
        return gone
