"""Where things live: the cache (images, seeds, keys) and host-wide run state."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-bottle"


def state_dir() -> Path:
    """Run state shared by every pytest run on this host (leases, VM records).

    Host-wide, not per cache: loopback aliases and TAP names are host-wide
    resources, whichever cache a run uses.
    """
    if env := os.environ.get("BOTTLE_STATE_DIR"):
        path = Path(env)
    elif os.geteuid() == 0:
        path = Path("/run/pytest-bottle")
    elif xdg := os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(xdg) / "pytest-bottle"
    else:
        path = Path(f"/tmp/pytest-bottle-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def remove_tree(path: Path) -> None:
    """Remove a directory even if a killed mmdebstrap left mounts inside it."""
    if not path.exists() and not path.is_symlink():
        return
    prefix = str(path.resolve()) + "/"
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f]
    except OSError:
        mounts = []
    for mnt in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def tree_size(path: Path) -> int:
    """Bytes actually allocated (sparse files count for what they hold)."""
    total = 0
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        total += st.st_blocks * 512
    return total
