"""Host programs pytest-bottle runs, and the Debian packages that provide them."""

from __future__ import annotations

import shutil

from ..errors import HostDependencyError

PROVIDERS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "ssh": "openssh-client",
    "scp": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ip": "iproute2",
    "unshare": "util-linux",
    "fallocate": "util-linux",
}


def which(program: str) -> str | None:
    # sbin is not on every user's PATH, but mkfs.ext4 lives there.
    return shutil.which(program) or shutil.which(program, path="/usr/local/sbin:/usr/sbin:/sbin")


def require(program: str, purpose: str = "") -> str:
    """Return the program's path or raise ``HostDependencyError`` naming its package."""
    path = which(program)
    if path is None:
        raise HostDependencyError(program, PROVIDERS.get(program), f"needed to {purpose}" if purpose else "")
    return path
