"""Work seeds: an image booted once to "agent ready", saved as disk + memory state.

Every snapshot bottle is a qcow2 overlay on the seed's disk plus a restore of
its memory state, which is why a fresh VM costs a fraction of a second.  A
seed is keyed by everything the restore depends on (image, QEMU version,
accelerator, CPU model, memory, cpus, device layout) and is verified against
its manifest before use: a corrupt one is discarded and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from ..host.locks import reporting_lock
from ..host.paths import remove_tree
from ..images.cache import Image
from ..lifecycle.boot import start_machine
from ..ssh import new_host_key
from ..vmm.accel import qemu_version
from ..vmm.qemu import MachineConfig, Nic, cpu_model, kernel_args
from .gc import prune_seeds
from .saved import SEED_FILES, TMP_PREFIX, digest, load, lock_path, remove_entry, seeds_dir, signature, write_stamp
from .saved import SEED_VERSION as SEED_VERSION  # re-exported: the public names of seeds
from .saved import Seed as Seed
from .saved import SeedCorrupt as SeedCorrupt
from .saved import discard as discard
from .saved import list_seeds as list_seeds
from .saved import verify as verify

log = logging.getLogger(__name__)

SEED_BOOT_TIMEOUT = 300.0
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


def seed_nics(count: int) -> tuple[Nic, ...]:
    """The user-mode NIC every bottle has, then LAN NICs on a stateless hub port:
    a clone puts a TAP there, and a second slirp would leave saved state
    (newer QEMUs number slirp instances) that the clone has no device for."""
    return (Nic("net0", SEED_MACS[0]),) + tuple(Nic(f"net{i}", SEED_MACS[i], "hubport") for i in range(1, count))


def key_parts(
    image: Image, accel: str, memory_mb: int, cpus: int, nics: int, baked: dict[str, str | None] | None = None
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
    return seeds_dir(cache_dir) / f"{parts['image']}-{parts['memory_mb']}m{parts['cpus']}c{parts['nics']}n-{digest}"


def ensure_seed(
    image: Image,
    accel: str,
    memory_mb: int,
    cpus: int,
    nics: int,
    cache_dir: Path,
    rebuild_before: float | None = None,
    baked: dict[str, str | None] | None = None,
) -> Seed:
    """The verified seed for these parts, created (once, under a lock) if needed.

    ``baked`` are setup values written into the seed itself, so that clones
    need not write them again on the restore path.
    """
    parts = key_parts(image, accel, memory_mb, cpus, nics, baked)
    final = seed_dir(cache_dir, parts)
    for _ in range(2):
        seed = load(final)
        if seed is not None and (rebuild_before is None or seed.manifest["created"] >= rebuild_before):
            try:
                verify(seed)
                return seed
            except SeedCorrupt as e:
                discard(final, str(e), seed.manifest.get("created"))
        final.parent.mkdir(parents=True, exist_ok=True)
        with reporting_lock(lock_path(final), f"the seed {final.name}"):
            seed = load(final)
            if seed is None or (rebuild_before is not None and seed.manifest["created"] < rebuild_before):
                _create(image, accel, parts, final, baked or {})
                prune_seeds(cache_dir, {image.name: image}, only=image.name)
    seed = load(final)
    assert seed is not None
    verify(seed)
    return seed


def _create(image: Image, accel: str, parts: dict[str, Any], final: Path, baked: dict[str, str | None]) -> None:
    for stale in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        remove_tree(stale)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid()}")
    # The machine runs in the seed's own directory: its disk then names the
    # image relative to where it stays (tmp is renamed, at the same depth).
    tmp.mkdir(parents=True)
    started = time.monotonic()
    try:
        boot_seconds, settle, named = _boot_and_save(image, accel, parts, tmp, baked)
        _dig_holes(tmp / "memory.ram")
        for scratch in ("qemu.log", "qemu.argv"):
            (tmp / scratch).unlink(missing_ok=True)
        files = {n: {"size": (tmp / n).stat().st_size, "sha256": digest(tmp / n)} for n in SEED_FILES}
        manifest = {
            "key_parts": parts,
            "image_path": str(image.path),
            "files": files,
            "boot_seconds": round(boot_seconds - started, 2),
            "creation_seconds": round(time.monotonic() - started, 2),
            "guest_state": settle.get("state"),
            "nic_names": [named[n.mac.lower()] for n in seed_nics(parts["nics"])],
            "created": time.time(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        write_stamp(tmp, signature(tmp))
        remove_entry(final, "old")  # under the lock ensure_seed holds
        os.rename(tmp, final)
        log.debug("seed %s created in %.1fs", final.name, manifest["creation_seconds"])
    except BaseException:
        remove_tree(tmp)
        raise


def _boot_and_save(
    image: Image, accel: str, parts: dict[str, Any], tmp: Path, baked: dict[str, str | None]
) -> tuple[float, dict[str, Any], dict[str, str]]:
    """Boot the seed machine in ``tmp``, set it up as a clone would be and save
    its state; returns when it was ready (monotonic), the settle result and
    the guest's NIC names by MAC."""
    cfg = MachineConfig(
        kernel=image.kernel,
        initrd=image.initrd,
        disk=image.rootfs,
        memory_mb=parts["memory_mb"],
        cpus=parts["cpus"],
        accel="kvm" if accel == "kvm" else "tcg",
        nics=seed_nics(parts["nics"]),
        save_ram=tmp / "memory.ram",
    )
    machine, channel = start_machine(cfg, tmp, "seed", SEED_BOOT_TIMEOUT)
    try:
        ready = time.monotonic()
        nic_setup = [dict(match=SEED_MACS[0], mac=SEED_MACS[0], **USER_NET)]
        # Every step a clone's handshake takes, so that the code it runs is
        # in the seed's page cache.
        args: dict[str, Any] = dict(
            baked,
            nics=nic_setup,
            entropy=os.urandom(64).hex(),
            time_ns=time.time_ns(),
            hostname=SEED_HOSTNAME,
            machine_id="0" * 32,
            list_nics=True,
        )
        if image.recipe.has_sshd and (key := new_host_key(SEED_HOSTNAME)):
            args["ssh_host_key"] = {"private": key[0], "public": key[1]}
        named: dict[str, str] = channel.call("setup", timeout=60, **args)["nics"]
        settle: dict[str, Any] = channel.call("settle", timeout=120, quiet=1.0)
        channel.call("quiesce", timeout=300, warm=WARM_DIRS)
        machine.save_state(tmp / "memory.state")
    finally:
        machine.stop()
        channel.close()
    return ready, settle, named


def _dig_holes(path: Path) -> None:
    """Give the zero pages of a RAM file back to the file system.

    The guest kernel zeroes all free memory at boot (init_on_free), so the
    file is fully written; most of it is zeros that need not take disk space
    or page cache.
    """
    try:
        subprocess.run(["fallocate", "--dig-holes", str(path)], check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:  # only space is lost
        log.debug("fallocate --dig-holes %s: %s", path, e)
