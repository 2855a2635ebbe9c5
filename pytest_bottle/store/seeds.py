"""Work seeds: an image booted once to "agent ready", saved as disk + memory state
(a ``saved.SavedState`` whose capture is a fresh boot of the image).

Every snapshot bottle is a qcow2 overlay on the seed's disk plus a restore of
its memory state, which is why a fresh VM costs a fraction of a second.  A
seed is keyed by everything the restore depends on (image, QEMU version,
accelerator, CPU model, memory, cpus, device layout) and is verified against
its manifest before use: a corrupt one is discarded and rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..agent.client import SETUP_TIMEOUT, AgentClient
from ..agent.handshake import Handshake, NicSetup
from ..agent.replies import SettleReply, SetupReply
from ..errors import AgentError, AgentTimeout, BootError, BootTimeout
from ..host.locks import reporting_lock
from ..host.progress import task
from ..images.cache import BuiltImage
from ..lifecycle.boot import boot_twice
from ..lifecycle.boot import settle as settle_boot
from ..ssh import new_host_key
from ..vmm.accel import qemu_version
from ..vmm.qemu import MachineConfig, Nic, cpu_model, kernel_args
from . import unsettled
from .gc import prune_seeds
from .saved import SEED_VERSION as SEED_VERSION  # re-exported: the public names of seeds
from .saved import RestsOn, SavedState, StateCorrupt, create, discard, load, lock_path, seeds_dir, verify
from .saved import list_seeds as list_seeds

log = logging.getLogger(__name__)

SEED_BOOT_TIMEOUT = 300.0
# How long a seed's boot may take to settle after its agent answered.
SEED_SETTLE_TIMEOUT = 300.0
# The seed's NICs: clones restore with the same devices and then take their
# own MACs through the handshake, matching these.
SEED_MACS = ("52:54:00:b0:77:01", "52:54:00:b0:77:02")
USER_NET = {"ip": "10.0.2.15/24", "gateway": "10.0.2.2"}
# As long as a clone's name: the seed's identity files then have the sizes a
# clone writes, and the handshake overwrites them in place.
SEED_HOSTNAME = "btl-00000000"
# Commands a test runs first come from here: their files are in every clone's
# page cache (about 50 MB for debian-bookworm; a clone maps only what it reads).
WARM_DIRS = ["/usr/bin", "/usr/sbin"]


# A seed that derived images' builds restore (images/provision.py) instead of
# booting their parent: the parent booted and settled with the build's machine
# (memory, its NIC with egress), nothing of a clone's set up, so the files a
# build puts back (hostname, machine-id, resolv.conf) are still the parent's.
BUILD = "build"
BUILD_MAC = "52:54:00:b0:77:10"
# Its one NIC, egress allowed: the build that restores it has the same device.
BUILD_NIC = Nic("net0", BUILD_MAC, "user", restrict=False)


def seed_nics(count: int) -> tuple[Nic, ...]:
    """The user-mode NIC every bottle has, then LAN NICs on a stateless hub port:
    a clone puts a TAP there, and a second slirp would leave saved state
    (newer QEMUs number slirp instances) that the clone has no device for."""
    return (Nic("net0", SEED_MACS[0]),) + tuple(Nic(f"net{i}", SEED_MACS[i], "hubport") for i in range(1, count))


def key_parts(
    image: BuiltImage,
    accel: str,
    memory_mb: int,
    cpus: int,
    nics: int,
    baked: dict[str, str | None] | None = None,
    purpose: str | None = None,
) -> dict[str, Any]:
    parts: dict[str, Any] = {
        "seed_version": SEED_VERSION,
        "image": image.name,
        "image_key": image.key,
        # A rebuild puts a new rootfs at the same path: seeds on the old one must not match.
        "image_built": image.manifest.get("created"),
        "qemu": qemu_version(),
        "accel": accel,
        "cpu": cpu_model(accel),
        "memory_mb": memory_mb,
        "cpus": cpus,
        "nics": nics,
        "kernel_args": " ".join(kernel_args(accel)),
        # Guest files every clone of this cache shares (authorized key, default resolv.conf).
        "baked": hashlib.sha256(json.dumps(baked or {}, sort_keys=True).encode()).hexdigest()[:16],
    }
    if accel == "kvm":  # "-cpu host" state only restores on the same kind of CPU
        parts["host_cpu"] = _host_cpu()
    if purpose is not None:  # only then: a bottle seed's key stays what it was
        parts["purpose"] = purpose
    return parts


def _host_cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def seed_dir(cache_dir: Path, parts: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    purpose = f"-{parts['purpose']}" if parts.get("purpose") else ""
    return (
        seeds_dir(cache_dir)
        / f"{parts['image']}-{parts['memory_mb']}m{parts['cpus']}c{parts['nics']}n{purpose}-{digest}"
    )


def ensure_seed(
    image: BuiltImage,
    accel: str,
    memory_mb: int,
    cpus: int,
    nics: int,
    cache_dir: Path,
    rebuild_before: float | None = None,
    baked: dict[str, str | None] | None = None,
    purpose: str | None = None,
    on_retry: Callable[[BootError, Path], None] | None = None,
) -> SavedState:
    """The verified seed for these parts, created (once, under a lock) if needed.

    ``baked`` are setup values written into the seed itself, so that clones
    need not write them again on the restore path.  ``purpose=BUILD``: the
    seed derived images build on (see ``BUILD``).  ``on_retry`` sees the
    first boot's failure and its run directory if this process boots twice.
    """
    parts = key_parts(image, accel, memory_mb, cpus, nics, baked, purpose)
    final = seed_dir(cache_dir, parts)
    why = ""
    for _ in range(2):
        seed = load(final)
        if seed is not None and (rebuild_before is None or seed.created >= rebuild_before):
            try:
                verify(seed)
                return seed
            except StateCorrupt as e:
                discard(seed, str(e))
                why = f"the last one was corrupt ({e.reason})"
        final.parent.mkdir(parents=True, exist_ok=True)
        waiting_since = time.time_ns()
        with reporting_lock(lock_path(final), f"the seed {final.name}"):
            seed = load(final)
            if seed is None or (rebuild_before is not None and seed.created < rebuild_before):
                what = f"making the work seed of image {image.name} ({memory_mb}M, {cpus} cpu, {nics} nic)"
                if purpose == BUILD:
                    what = f"making the build seed of image {image.name} ({memory_mb}M)"
                if (failed := unsettled.earlier(final, waiting_since)) is not None:
                    raise failed
                with task(what, why or _why_seed(final, seed, purpose)):
                    try:
                        _create(image, accel, parts, final, baked or {}, on_retry)
                    except BootTimeout as e:
                        raise unsettled.record(final, e, f"seed of {image.name}", image) from None
                unsettled.forget(final)
                unsettled.prune(final.parent, {unsettled.build(image)}, key=image.key)
                prune_seeds(cache_dir, {image.name: image}, only=image.name)
    seed = load(final)
    assert seed is not None
    verify(seed)
    return seed


def _why_seed(final: Path, found: SavedState | None, purpose: str | None = None) -> str:
    """Why the seed ``final`` is being made, for the progress line."""
    if found is not None:
        return "rebuild requested"
    shape = final.name.rsplit("-", 1)[0]  # a build seed's name has one more part: not of this shape
    if any(p != final and p.is_dir() and p.name.rsplit("-", 1)[0] == shape for p in final.parent.glob(shape + "-*")):
        return "outdated: the image, QEMU or the machine changed; booting it once (about a minute)"
    if purpose == BUILD:
        return "none yet; booting the image once so that the images derived from it build without a boot of their own"
    return "none yet; booting the image once so every bottle restores in a fraction of a second (about a minute)"


def _create(
    image: BuiltImage,
    accel: str,
    parts: dict[str, Any],
    final: Path,
    baked: dict[str, str | None],
    on_retry: Callable[[BootError, Path], None] | None = None,
) -> None:
    """Make the seed (``ensure_seed`` holds its lock).  The machine runs in
    the seed's own tmp directory, so its disk names the image relative to
    where it stays."""

    def capture(tmp: Path) -> dict[str, Any]:
        started = time.monotonic()
        retry = None if on_retry is None else functools.partial(_retried, on_retry, tmp)
        if parts.get("purpose") == BUILD:
            ready, settle = _boot_and_save_build(image, accel, parts, tmp, retry)
            names: list[str] = []  # nothing set up: a build finds its NIC by MAC
        else:
            ready, settle, named = _boot_and_save(image, accel, parts, tmp, baked, retry)
            names = [named.nic_name(n.mac.lower()) for n in seed_nics(parts["nics"])]
        return {
            "kind": "seed",
            "image_path": os.path.relpath(image.path, final),  # relative: the cache may move
            "boot_seconds": round(ready - started, 2),
            "guest_state": settle.state,
            "nic_names": names,
        }

    create(final, capture, parts, RestsOn.image_layer(image.disk_chain, final))


def _seed_machine(
    image: BuiltImage, accel: str, parts: dict[str, Any], tmp: Path, nics: tuple[Nic, ...]
) -> MachineConfig:
    return MachineConfig(
        kernel=image.kernel,
        initrd=image.initrd,
        disk=image.disk,
        disk_format=image.disk_format,
        memory_mb=parts["memory_mb"],
        cpus=parts["cpus"],
        accel="kvm" if accel == "kvm" else "tcg",
        nics=nics,
        save_ram=tmp / "memory.ram",
    )


def _retried(on_retry: Callable[[BootError, Path], None], tmp: Path, error: BootError) -> None:
    on_retry(error, tmp)


def _boot_and_save_build(
    image: BuiltImage, accel: str, parts: dict[str, Any], tmp: Path, on_retry: Callable[[BootError], None] | None
) -> tuple[float, SettleReply]:
    """A build seed: boot, an address, settle, save; the build sets up the rest."""
    cfg = _seed_machine(image, accel, parts, tmp, (BUILD_NIC,))
    machine, channel = boot_twice(cfg, tmp, "seed", SEED_BOOT_TIMEOUT, on_retry)
    try:
        ready = time.monotonic()
        agent = AgentClient(channel)
        # Its NIC up before the boot settles, as for a bottle's seed (a unit may wait for a route);
        # no hostname or machine-id (empty: left as they are) nor any other file written.
        net = NicSetup(BUILD_MAC, BUILD_MAC, ip=USER_NET["ip"], gateway=USER_NET["gateway"])
        shake = Handshake(hostname="", machine_id="", entropy=os.urandom(64), time_ns=time.time_ns(), nics=(net,))
        agent.setup(shake, timeout=SETUP_TIMEOUT)
        settle = settle_boot(agent, machine, SEED_SETTLE_TIMEOUT, quiet=0)
        machine.save_state(tmp / "memory.state")
    finally:
        machine.stop()
        channel.close()
    return ready, settle


def _boot_and_save(
    image: BuiltImage,
    accel: str,
    parts: dict[str, Any],
    tmp: Path,
    baked: dict[str, str | None],
    on_retry: Callable[[BootError], None] | None = None,
) -> tuple[float, SettleReply, SetupReply]:
    """Boot the seed machine in ``tmp``, set it up as a clone would be and save
    its state; returns when it was ready (monotonic), the settle result and
    the guest's NIC names by MAC."""
    cfg = _seed_machine(image, accel, parts, tmp, seed_nics(parts["nics"]))
    machine, channel = boot_twice(cfg, tmp, "seed", SEED_BOOT_TIMEOUT, on_retry)
    try:
        ready = time.monotonic()
        agent = AgentClient(channel)
        nics = [NicSetup(SEED_MACS[0], SEED_MACS[0], ip=USER_NET["ip"], gateway=USER_NET["gateway"])]
        key = new_host_key(SEED_HOSTNAME, tmp) if image.has_sshd else None
        # Every step a clone's handshake takes, so that the code it runs is
        # in the seed's page cache.
        shake = Handshake.fresh(SEED_HOSTNAME, nics, machine_id="0" * 32, ssh_host_key=key, baked=baked, list_nics=True)
        named = agent.setup(shake, timeout=SETUP_TIMEOUT)
        settle = settle_boot(agent, machine, SEED_SETTLE_TIMEOUT, quiet=1.0)  # never save a boot half done
        agent.quiesce(warm=WARM_DIRS, timeout=300)
        # Last: a clone's restore path then runs no Python (guest.handoff).
        try:
            why = agent.park(timeout=60)
        except AgentTimeout:  # the core holds the port and does not answer: no seed of that
            raise
        except AgentError as e:  # it died: the Python agent serves on, as after a restart
            why = str(e)
        if why is not None:
            log.warning("seed of %s: the agent's compiled core does not serve its clones: %s", image.name, why)
        machine.save_state(tmp / "memory.state")
    finally:
        machine.stop()
        channel.close()
    return ready, settle, named
