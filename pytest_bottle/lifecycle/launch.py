"""Starting a bottle: plan → resources → restore (or boot) → handshake → ``Bottle``."""

from __future__ import annotations

import errno
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from ..agent.channel import AgentChannel
from ..agent.client import AgentClient
from ..bottle import Bottle
from ..errors import BootError, BootTimeout, BottleError, ImageNotFound, SnapshotError, SnapshotGone, SpecError
from ..images import BuiltImage, ensure_image
from ..net.lan import LanRegistry
from ..spec import BottleSpec, check_host_memory, resolve
from ..store.saved import SavedState, StateCorrupt, discard, in_use
from ..store.seeds import ensure_seed
from ..store.snapshots import seed_of
from ..vmm.backend import Machine, console_tail
from ..vmm.qemu import MachineConfig
from . import handshake, lan_names
from .boot import seed_fault, settle, start_machine, timer_off
from .handshake import Found
from .plan import Forwards, Plan, make_plan, restore_from
from .probe import accel_for
from .resources import Resources

log = logging.getLogger(__name__)

RETRY_FLOOR = 5.0  # seconds of a cold bottle's timeout below which a second boot is not worth starting

_library_lans = LanRegistry()

Started = tuple[Machine, AgentChannel, tuple[Found, ...]]


def launch(*, detached: bool = False, snapshot: Any = None, **kwargs: Any) -> Bottle:
    """Start a bottle without pytest; use it as a context manager.

    Takes the marker's keyword arguments plus ``accel`` and ``cache_dir``.
    ``detached=True`` starts QEMU so that it can outlive this process, which
    ``Bottle.keep()`` needs; otherwise QEMU dies with the process.
    ``snapshot=s`` starts a fork of the ``Snapshot`` s (then only ``forward``
    and ``timeout`` may be given).
    """
    from ..snapshot import Snapshot, check_fork_args

    try:
        if not isinstance(detached, bool):
            raise SpecError(f"detached must be True or False, not {detached!r}", "launch()")
        if snapshot is not None:
            if not isinstance(snapshot, Snapshot):
                raise SpecError(f"snapshot must be a Snapshot (from Bottle.snapshot()), not {snapshot!r}", "launch()")
            overrides, source = check_fork_args(kwargs, "launch()", snapshot), snapshot
        else:
            spec = resolve([("launch()", kwargs)])
            memory = kwargs.get("memory")
            check_host_memory(spec.memory_mb, "launch()" if memory is not None else "", memory)
    except SpecError as e:
        raise as_usage_error(e) from None
    if snapshot is not None:
        return source.fork(overrides, detached=detached)
    try:
        return start_bottle(spec, detached=detached)
    except ImageNotFound as e:
        if e.name != kwargs.get("image") or type(e) is not ImageNotFound or e.source:
            raise
        if "pytest" not in sys.modules:
            raise ImageNotFound(e.name, e.known, "launch()") from None
        from ..usage import UnknownBottleImage  # a marker's error for it (also a pytest.UsageError)

        raise UnknownBottleImage(e.name, e.known, "launch()") from None


def as_usage_error(e: SpecError) -> SpecError:
    """Under pytest, the error a marker or factory gives for the same value
    (``InvalidBottleArgument``: also a ``pytest.UsageError``), so that a test
    expects one error wherever it wrote the value; without pytest, ``e``."""
    pytest = sys.modules.get("pytest")
    if pytest is None or isinstance(e, pytest.UsageError):
        return e
    from ..usage import InvalidBottleArgument

    return InvalidBottleArgument(e.message, e.source)


def new_name() -> str:
    return f"btl-{secrets.token_hex(4)}"


def start_bottle(
    spec: BottleSpec,
    *,
    rebuild_before: float | None = None,
    detached: bool = False,
    lans: LanRegistry | None = None,
    fork_of: tuple[BuiltImage, SavedState] | None = None,
) -> Bottle:
    """Start a bottle for a resolved spec.  ``lans`` scopes LAN names (default: process-wide).
    ``fork_of``: the image and the snapshot to restore instead of a seed."""
    check_host_memory(spec.memory_mb)
    try:
        return _start(spec, rebuild_before, detached, lans, fork_of)
    except OSError as e:
        # The host's own files (run directory, overlay, console, record, keys) on a full
        # file system: a named error, not a traceback; nothing is left (Resources saw to it).
        if (full := no_room(e, spec.cache_dir)) is None:
            raise
        raise full from e


def no_room(e: OSError, cache_dir: Path) -> BootError | None:
    """The ``BootError`` for a write of a start that found its file system full, else None."""
    if isinstance(e, BottleError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None  # a guest's own (GuestOSError), or a namespace limit (HostDependencyError)
    where = e.filename2 or e.filename or f"under {cache_dir}"  # a copy names its source first; a write none
    return BootError(f"the host's file system is full ({where}): {e.strerror}; nothing was started")


def _start(
    spec: BottleSpec,
    rebuild_before: float | None,
    detached: bool,
    lans: LanRegistry | None,
    fork_of: tuple[BuiltImage, SavedState] | None,
) -> Bottle:
    if fork_of is None:
        image = ensure_image(
            spec.image, spec.cache_dir, rebuild_before=rebuild_before, pull=spec.image_pull, accel=spec.accel
        )
        accel = accel_for(spec.accel, image, spec.cache_dir).accel
    else:
        image, accel = fork_of[0], fork_of[1].manifest["key_parts"]["accel"]
    plan = make_plan(spec, image, accel, new_name())
    keys = handshake.Keys.start(plan)
    try:
        baked = keys.baked()
        res = Resources.take(plan, _library_lans if lans is None else lans)
    except BaseException:
        keys.discard()
        raise
    try:
        boot = _Boot(plan, res, rebuild_before, detached, baked, fork_of[1] if fork_of else None)
        machine, channel, found = res.with_host_ports(plan.ports, boot.start)
        res.adopt(machine, channel)
        agent = AgentClient(channel)
        try:
            done = handshake.clone_setup(agent, plan, res, found, keys, baked, boot.ends)
        except TimeoutError as e:  # the agent's AgentTimeout, or the host key not made in time
            reason = f"the clone handshake did not finish within the bottle's timeout ({spec.timeout:g} s): {e}"
            raise BootTimeout(reason, console_tail(machine.console_log), plan.name) from None
        if spec.boot == "cold":  # as settled as a snapshot clone: its boot finished
            left = boot.ends - time.monotonic()  # a cold boot's settling is part of its boot
            if left <= 0:
                reason = f"no time was left within the bottle's timeout ({spec.timeout:g} s) for its boot to settle"
                raise BootTimeout(reason, console_tail(machine.console_log), plan.name)
            settle(agent, machine, left, quiet=0)
        if res.lan is not None and res.lan_ip:
            try:
                lan_names.join(res.lan, plan.name, res.lan_ip.split("/")[0], agent, boot.ends)
            except BottleError as e:
                if time.monotonic() < boot.ends:
                    raise
                reason = f"its LAN peers' names were not written within the bottle's timeout ({spec.timeout:g} s): {e}"
                raise BootTimeout(reason, console_tail(machine.console_log), plan.name) from None
        return Bottle(
            name=plan.name,
            image=image.name,
            accel=plan.accel,
            machine=machine,
            channel=channel,
            resources=res,
            ssh=handshake.ssh_access(plan, res, keys, done.host_key),
            announce=done.announce,
        )
    except BaseException:
        res.close()
        keys.discard()
        raise


class _Boot:
    """Starting one bottle's machine: a seed restore (rebuilding a bad or
    vanished seed once) or a cold boot, with the host ports of this attempt."""

    def __init__(
        self,
        plan: Plan,
        res: Resources,
        rebuild_before: float | None,
        detached: bool,
        baked: dict[str, str | None],
        snapshot: SavedState | None,
    ) -> None:
        self.plan, self.res = plan, res
        self.rebuild_before, self.detached, self.baked = rebuild_before, detached, baked
        self.snapshot = snapshot
        # The end of the start's timeout, from the machine's start on: a seed
        # built or waited for before it is not counted, nor a bad seed's restore.
        self.ends = time.monotonic() + plan.spec.timeout

    def start(self, forwards: Forwards) -> Started:
        """Returns the machine, its channel and how the guest's NICs are found now."""
        cfg = self.plan.machine(self.res.macs, forwards)
        if not self.plan.restores:
            try:
                machine, channel = self._run(cfg)
            except BootError as e:
                if not timer_off(e) or self.ends - time.monotonic() < RETRY_FLOOR:
                    raise
                # Seconds into the boot, and no fault of the image: booted again within the same timeout.
                log.warning("%s: booting it once more: %s", self.plan.name, e.reason)
                self.res.reset_run_dir()
                machine, channel = self._run(cfg, self.ends - time.monotonic())
            return machine, channel, handshake.found_cold(self.res.macs)
        if self.snapshot is not None:
            return self._fork(cfg, self.snapshot)
        for attempt in (1, 2):
            state = self._seed()
            try:
                with in_use(state):  # no pruner removes it before QEMU has its files open
                    machine, channel = self._run(restore_from(cfg, state))
                self.res.restored = state
                return machine, channel, handshake.found_restored(state, len(cfg.nics))
            except BootError as e:
                fault = seed_fault(state, e)
                if attempt == 2 or fault is None:
                    raise
                discard(state, fault)
                self.res.reset_run_dir()
        raise AssertionError("unreachable")

    def _fork(self, cfg: MachineConfig, state: SavedState) -> Started:
        """Restore a snapshot: as a seed, but a bad one is not made again, it is an error."""
        try:
            # Its disk rests on the seed's: no pruner may take either before QEMU has them open.
            with in_use(seed_of(state)), in_use(state):
                machine, channel = self._run(restore_from(cfg, state))
        except StateCorrupt as e:
            if " lost " in e.reason:  # removed while this fork waited for its lock
                raise SnapshotGone(state.path.name, f"it was removed while a fork started ({e.reason})") from None
            raise SnapshotError(state.path.name, e.reason) from None
        except BootError as e:
            fault = seed_fault(state, e)
            if fault is None:
                raise
            raise SnapshotError(state.path.name, fault) from None
        self.res.restored = state
        return machine, channel, handshake.found_restored(state, len(cfg.nics))

    def _seed(self) -> SavedState:
        plan = self.plan
        spec = plan.spec
        nics = plan.nic_count
        return ensure_seed(
            plan.image, plan.accel, spec.memory_mb, spec.cpus, nics, spec.cache_dir, self.rebuild_before, self.baked
        )

    def _run(self, cfg: MachineConfig, timeout: float | None = None) -> tuple[Machine, AgentChannel]:
        spec, res = self.plan.spec, self.res
        timeout = spec.timeout if timeout is None else max(timeout, 0.0)
        self.ends = time.monotonic() + timeout  # the handshake's deadline too
        return start_machine(
            cfg, res.run_dir, self.plan.name, timeout, detached=self.detached, on_spawn=res.spawned, tap_fds=res.tap_fds
        )
