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
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from .boot import BootPlan, start_machine
from .errors import BootError
from .images.cache import Image
from .locks import reporting_lock
from .paths import remove_tree
from .ssh import new_host_key
from .vmm.accel import qemu_version
from .vmm.qemu import Nic, cpu_model, kernel_args

log = logging.getLogger(__name__)

# 2: guest RAM in its own file; 3: caches kept and warmed, identity placeholders, no announce;
# 4: the disk names its image by a relative path (a moved cache keeps working)
SEED_VERSION = 4
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
TMP_PREFIX = ".tmp-"
SEED_FILES = ("disk.qcow2", "memory.state", "memory.ram")
CHUNK = 1 << 20
ZERO_CHUNK = hashlib.sha256(bytes(CHUNK)).digest()
STAMP = "verified.json"

_verified: set[tuple[Any, ...]] = set()
_verified_lock = threading.Lock()


class SeedCorrupt(BootError):
    pass


@dataclass(frozen=True)
class Seed:
    path: Path
    manifest: dict[str, Any]

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def memory(self) -> Path:
        """Device state (small): what ``-incoming`` loads."""
        return self.path / "memory.state"

    @property
    def ram(self) -> Path:
        """Guest RAM (sparse): clones map it copy-on-write."""
        return self.path / "memory.ram"

    @property
    def console(self) -> Path:
        return self.path / "console.log"

    @property
    def nic_count(self) -> int:
        return int(self.manifest["key_parts"]["nics"])

    @property
    def nic_names(self) -> tuple[str, ...]:
        """The guest's interface names, in device order (none known: empty)."""
        return tuple(self.manifest.get("nic_names") or ())


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


def seeds_dir(cache_dir: Path) -> Path:
    return cache_dir / "seeds"


def seed_dir(cache_dir: Path, parts: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return seeds_dir(cache_dir) / f"{parts['image']}-{parts['memory_mb']}m{parts['cpus']}c{parts['nics']}n-{digest}"


def _digest(path: Path) -> str:
    """sha256 over 1 MiB chunk digests, skipping holes.

    A hole and a chunk of written zeros digest alike, so the result depends on
    the content only, while a sparse 512 MB RAM file reads just its data.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        for pos in range(0, size, CHUNK):
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here on
                data_at = size
            if data_at >= min(pos + CHUNK, size):
                h.update(ZERO_CHUNK if size - pos >= CHUNK else hashlib.sha256(bytes(size - pos)).digest())
                continue
            f.seek(pos)
            h.update(hashlib.sha256(f.read(CHUNK)).digest())
    return h.hexdigest()


def _signature(path: Path) -> list[Any]:
    """What changes whenever a file is written (ctime cannot be set back)."""
    out: list[Any] = []
    for f in SEED_FILES:
        st = (path / f).stat()
        out += [f, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def verify(seed: Seed) -> None:
    """Raise SeedCorrupt if the files do not match the manifest.

    Sizes are checked on every use.  Checksums are checked when the files
    changed since they were last verified (a stamp of size, mtime, ctime and
    inode in the seed directory), since hashing costs more than a restore.
    """
    files = seed.manifest.get("files", {})
    for name in SEED_FILES:
        want = files.get(name)
        try:
            size = (seed.path / name).stat().st_size
        except OSError as e:
            raise SeedCorrupt(f"seed {seed.path.name}: {name} is missing ({e.strerror})") from None
        if not want or size != want["size"]:
            raise SeedCorrupt(f"seed {seed.path.name}: {name} has {size} bytes, the manifest says {want}")
    sig = _signature(seed.path)
    key = (str(seed.path), tuple(sig))
    with _verified_lock:
        if key in _verified:
            return
    try:
        stamped = json.loads((seed.path / STAMP).read_text()) == sig
    except (OSError, ValueError):
        stamped = False
    if not stamped:
        for name in SEED_FILES:
            if _digest(seed.path / name) != files[name]["sha256"]:
                raise SeedCorrupt(f"seed {seed.path.name}: {name} does not match its checksum")
        _write_stamp(seed.path, sig)
    with _verified_lock:
        _verified.add(key)


def _write_stamp(path: Path, sig: list[Any]) -> None:
    tmp = path / f".{STAMP}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(sig))
        os.replace(tmp, path / STAMP)
    except OSError as e:  # a read-only cache still works, it just hashes again
        log.debug("cannot stamp seed %s: %s", path.name, e)


def _load(path: Path) -> Seed | None:
    try:
        seed = Seed(path, json.loads((path / "manifest.json").read_text()))
        seed.manifest["files"], seed.manifest["key_parts"], seed.manifest["created"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not there, or not a manifest we wrote: rebuilt under the lock
    return seed


def lock_path(seed_path: Path) -> Path:
    """The seed's lock: held exclusively to create, discard or prune it, and
    shared by every clone while its QEMU opens the seed's files."""
    return seed_path.parent / f"{seed_path.name}.lock"


def discard(seed_path: Path, reason: str, created: float | None = None) -> None:
    """Remove a bad seed (only the one found bad: another process may have
    rebuilt it meanwhile), then warn once."""
    with FileLock(str(lock_path(seed_path))):
        current = _load(seed_path)
        if current is None or (created is not None and current.manifest.get("created") != created):
            return
        trash = seed_path.with_name(f"{TMP_PREFIX}{seed_path.name}-discard-{os.getpid()}")
        os.rename(seed_path, trash)
        remove_tree(trash)
    message = f"pytest-bottle: discarded seed {seed_path.name}, it will be built again: {reason}"
    log.warning("%s", message)
    with warnings.catch_warnings():
        # A self-healing cache is not an error, even under -W error.
        warnings.simplefilter("default")
        warnings.warn(message, stacklevel=3)


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
        seed = _load(final)
        if seed is not None and (rebuild_before is None or seed.manifest["created"] >= rebuild_before):
            try:
                verify(seed)
                return seed
            except SeedCorrupt as e:
                discard(final, str(e), seed.manifest.get("created"))
        final.parent.mkdir(parents=True, exist_ok=True)
        with reporting_lock(lock_path(final), f"the seed {final.name}"):
            seed = _load(final)
            if seed is None or (rebuild_before is not None and seed.manifest["created"] < rebuild_before):
                _create(image, accel, parts, final, baked or {})
                from .seed_gc import prune_seeds  # it builds on this module

                prune_seeds(cache_dir, {image.name: image}, only=image.name)
    seed = _load(final)
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
        plan = BootPlan(
            image.kernel,
            image.initrd,
            image.rootfs,
            "raw",
            parts["memory_mb"],
            parts["cpus"],
            accel,
            seed_nics(parts["nics"]),
            ram_file=tmp / "memory.ram",
            ram_shared=True,
        )
        machine, channel = start_machine(plan, tmp, "seed", SEED_BOOT_TIMEOUT)
        try:
            boot_seconds = time.monotonic() - started
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
            named = channel.call("setup", timeout=60, **args)["nics"]
            settle = channel.call("settle", timeout=120, quiet=1.0)
            channel.call("quiesce", timeout=300, warm=WARM_DIRS)
            machine.save_state(tmp / "memory.state")
        finally:
            machine.stop()
            channel.close()
        _dig_holes(tmp / "memory.ram")
        for scratch in ("qemu.log", "qemu.argv"):
            (tmp / scratch).unlink(missing_ok=True)
        files = {n: {"size": (tmp / n).stat().st_size, "sha256": _digest(tmp / n)} for n in SEED_FILES}
        manifest = {
            "key_parts": parts,
            "image_path": str(image.path),
            "files": files,
            "boot_seconds": round(boot_seconds, 2),
            "creation_seconds": round(time.monotonic() - started, 2),
            "guest_state": settle.get("state"),
            "nic_names": [named[n.mac.lower()] for n in seed_nics(parts["nics"])],
            "created": time.time(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _write_stamp(tmp, _signature(tmp))
        if final.exists():
            trash = final.with_name(f"{TMP_PREFIX}{final.name}-old-{os.getpid()}")
            os.rename(final, trash)
            remove_tree(trash)
        os.rename(tmp, final)
        log.debug("seed %s created in %.1fs", final.name, manifest["creation_seconds"])
    except BaseException:
        remove_tree(tmp)
        raise


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


def list_seeds(cache_dir: Path) -> list[Seed]:
    root = seeds_dir(cache_dir)
    if not root.is_dir():
        return []
    found = [_load(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(TMP_PREFIX)]
    return [s for s in found if s is not None]


def remove_seeds(cache_dir: Path, image_name: str | None = None, keep_image_keys: set[str] | None = None) -> list[Path]:
    """Remove the seeds of ``image_name`` (all images if None), except those
    made from an image key in ``keep_image_keys``."""
    removed = []
    for seed in list_seeds(cache_dir):
        parts = seed.manifest["key_parts"]
        if image_name is not None and parts["image"] != image_name:
            continue
        if keep_image_keys is not None and parts["image_key"] in keep_image_keys:
            continue
        with FileLock(str(seed.path.parent / f"{seed.path.name}.lock")):
            remove_tree(seed.path)
            (seed.path.parent / f"{seed.path.name}.lock").unlink(missing_ok=True)
        removed.append(seed.path)
    return removed
