"""Images as data: a recipe names everything that goes into an image."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ImageNotFound

# Bump when the builder's output changes for the same recipe.
BUILDER_VERSION = 3

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
GUEST_FILES = (
    "agent.py",
    "frames.py",
    "files.py",
    "identity.py",
    "execute.py",
    "tarstream.py",
    "untar.py",
    "terminal.py",
    "system.py",
    "handoff.py",
)
# The agent's compiled core (``guest/handoff``): built into each image from these.
CORE_DIR = GUEST_DIR / "core"
CORE_NAME = "bottle-agent-core"
# What the image is made of besides the recipe: the builder and the files it lays in.
BUILD_SOURCES = (Path(__file__).with_name("builder.py"), Path(__file__).with_name("guest_files.py"))

VIRTIO_MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "virtio_rng")

# Units a throwaway test VM does not need: each one costs boot time and
# resident memory, and resident memory is what a snapshot restore pays for.
TRIMMED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    "getty@tty1.service",
    "getty-static.service",
    "serial-getty@ttyS0.service",
    "systemd-timesyncd.service",
    "systemd-update-utmp-runlevel.service",
    # Modules these load on boot autoload on first use anyway (kmod-static-nodes
    # stays, so /dev/loop-control, /dev/fuse... exist to trigger that).
    "modprobe@configfs.service",
    "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "modprobe@drm.service",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "dev-hugepages.mount",
    "systemd-pstore.service",
)


@dataclass(frozen=True)
class Recipe:
    """A named image.  Its cache key is a hash of every field plus the builder and agent."""

    name: str
    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = ()
    initrd_modules: tuple[str, ...] = VIRTIO_MODULES
    masked_units: tuple[str, ...] = TRIMMED_UNITS
    disk_size: str = "2G"
    mirror: str | None = None  # None: the host's apt sources for the suite
    description: str = ""
    extra_files: tuple[tuple[str, str], ...] = field(default=())  # (guest path, content)
    # Where a missing build may be pulled from (``images.pull``); not part of the key.
    pull_url: str | None = field(default=None, compare=False)

    @property
    def has_sshd(self) -> bool:
        return "openssh-server" in self.packages

    def key(self) -> str:
        h = hashlib.sha256()
        fields = dataclasses.asdict(self)
        fields.pop("pull_url")  # where a build may come from changes nothing in it
        h.update(json.dumps(fields, sort_keys=True).encode())
        h.update(f"builder={BUILDER_VERSION}".encode())
        for name in GUEST_FILES:
            h.update(name.encode() + b"\0" + (GUEST_DIR / name).read_bytes())
        for path in core_sources():
            h.update(b"core/" + path.name.encode() + b"\0" + path.read_bytes())
        for path in BUILD_SOURCES:
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        return h.hexdigest()[:16]


BASE_PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "python3",
    "iproute2",
    "ca-certificates",
    "iputils-ping",  # bottles on a LAN ping each other
    # ps, pgrep, pkill, free, sysctl: openssh-server pulls it in, and a -minimal
    # image is the same system without the SSH server, not one without them.
    "procps",
    # Resolves the machine's own hostname without /etc/hosts: clones rename
    # themselves without rewriting it.
    "libnss-myhostname",
)

RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    RECIPES[recipe.name] = recipe
    return recipe


register(
    Recipe(
        name="debian-bookworm",
        packages=BASE_PACKAGES + ("openssh-server",),
        description="Debian 12 minbase, systemd, python3, OpenSSH server",
    )
)
register(
    Recipe(
        name="debian-bookworm-minimal",
        packages=BASE_PACKAGES,
        description="Debian 12 minbase, systemd, python3; no SSH server",
    )
)
# Debian 13.  The host's apt sources may list only older suites: then the
# builder passes no mirror and mmdebstrap picks its own default.
register(
    Recipe(
        name="debian-trixie",
        suite="trixie",
        packages=BASE_PACKAGES + ("openssh-server",),
        description="Debian 13 minbase, systemd, python3, OpenSSH server",
    )
)
register(
    Recipe(
        name="debian-trixie-minimal",
        suite="trixie",
        packages=BASE_PACKAGES,
        description="Debian 13 minbase, systemd, python3; no SSH server",
    )
)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ImageNotFound(name, sorted(RECIPES)) from None


def core_sources() -> list[Path]:
    return sorted(p for p in CORE_DIR.iterdir() if p.suffix in (".c", ".h"))
