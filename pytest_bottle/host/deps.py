"""Host programs pytest-bottle runs, and the Debian packages that provide them."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

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


def core_toolchain() -> tuple[str | None, str]:
    """The C compiler that can build the agent's core (with a static libc), or
    None and what is missing, for ``bottle doctor`` (``images.guest_files.build_core``
    compiles with the same ``cc``, and fails without ``libc.a``)."""
    if platform.machine() != "x86_64":
        return None, "not an x86_64 host"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler"
    found = subprocess.run([cc, "-print-file-name=libc.a"], capture_output=True, text=True, check=False).stdout
    if not os.path.isabs(found.strip()):
        return None, "no static libc"
    return cc, ""
