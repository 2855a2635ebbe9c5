"""A guest kernel of our own against Debian's (issue 18): translated blocks and restore time.

    .venv/bin/python bench/kernel.py [--rounds 4] [--restores 3] [--lean-args "lsm=capability"]

Builds Debian's ``linux-source-6.1`` with the default image's own config, trimmed
of what a guest cannot see (modules a bottle does not load, hardening checks,
debugging, ``NO_HZ_FULL``; see ``DROP``), once into ``--work`` (about 30 min on 2
cores).  The default image is then copied into a private cache under ``--work``
with that kernel as its ``vmlinuz``, and restores of both alternate in fresh
processes: translated blocks from restore to the first answered `true` (QEMU's
``info jit``) and restore -> first exec.  ``--lean-args`` adds kernel arguments
on the lean side only (its seed is made again).  Installs nothing: it says what
to install when the source or the compiler is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from _util import p50, pct, table

from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.images import ensure_image

SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
NEEDS = "linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev"
# Modules a bottle loads (lsmod in a clone) and what they need: built in, so no initrd is needed.
BUILT_IN = (
    "VIRTIO VIRTIO_RING VIRTIO_MMIO VIRTIO_PCI VIRTIO_PCI_LIB VIRTIO_PCI_LIB_LEGACY VIRTIO_BLK VIRTIO_NET "
    "NET_FAILOVER FAILOVER VIRTIO_CONSOLE HW_RANDOM HW_RANDOM_VIRTIO EXT4_FS JBD2 FS_MBCACHE CRC16 LIBCRC32C "
    "CRYPTO_CRC32C CRYPTO_CRC32C_INTEL CRYPTO_CRC32_PCLMUL CRYPTO_CRCT10DIF_PCLMUL CRYPTO_GHASH_CLMUL_NI_INTEL "
    "CRYPTO_SHA512_SSSE3 CRYPTO_SHA512 CRYPTO_SHA256_SSSE3 CRYPTO_SHA1_SSSE3 CRYPTO_AES_NI_INTEL CRYPTO_SIMD "
    "CRYPTO_CRYPTD INPUT_EVDEV ACPI_BUTTON BINFMT_MISC FW_CFG_SYSFS AUTOFS_FS NETFILTER_XTABLES IP_NF_IPTABLES "
    "IP_NF_FILTER IP_NF_NAT NF_TABLES NF_CONNTRACK NF_NAT NFT_CT NFT_NAT NFT_MASQ UNIX INET IPV6 TUN VETH "
    "BRIDGE OVERLAY_FS FUSE_FS BLK_DEV_LOOP"
).split()
# Checks and bookkeeping a guest cannot observe: each adds branches (so blocks) to hot kernel paths.
DROP = (
    "STACKPROTECTOR STACKPROTECTOR_STRONG HARDENED_USERCOPY FORTIFY_SOURCE DEBUG_LIST BUG_ON_DATA_CORRUPTION "
    "SLAB_FREELIST_HARDENED SLAB_FREELIST_RANDOM SHUFFLE_PAGE_ALLOCATOR SLUB_DEBUG RANDOMIZE_KSTACK_OFFSET "
    "SCHEDSTATS SCHED_DEBUG NO_HZ_FULL INIT_STACK_ALL_ZERO DEBUG_INFO DEBUG_INFO_BTF DEBUG_INFO_DWARF5 "
    "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT MODULE_SIG SYSTEM_TRUSTED_KEYRING"
).split()
ENABLE = ("NO_HZ_IDLE", "INIT_STACK_NONE", "DEBUG_INFO_NONE")


def build(work: Path, image_dir: Path) -> Path:
    tree = work / "linux-source-6.1"
    bz = tree / "arch/x86/boot/bzImage"
    if bz.is_file():
        return bz
    if not SOURCE.is_file() or not shutil.which("gcc"):
        raise SystemExit(f"needs the kernel source and a compiler: apt-get install {NEEDS}")
    subprocess.run(["tar", "-C", str(work), "-xf", str(SOURCE)], check=True)
    config = tree / ".config"
    rootfs = image_dir / "rootfs.ext4"
    listing = subprocess.run(["debugfs", "-R", "ls /boot", str(rootfs)], capture_output=True, text=True).stdout
    name = max(re.findall(r"config-\S+", listing))
    subprocess.run(["debugfs", "-R", f"dump /boot/{name} {config}", str(rootfs)], check=True, capture_output=True)

    def cfg(*args: str) -> None:
        subprocess.run([str(tree / "scripts/config"), "--file", str(config), *args], check=True)

    cfg(*[a for s in BUILT_IN for a in ("--set-val", s, "y")])
    text = re.sub(r"^(CONFIG_\w+)=m$", r"# \1 is not set", config.read_text(), flags=re.M)
    config.write_text(text)
    cfg(*[a for s in DROP for a in ("--disable", s)], *[a for s in ENABLE for a in ("--enable", s)])
    cfg(
        "--set-str",
        "SYSTEM_TRUSTED_KEYS",
        "",
        "--set-str",
        "SYSTEM_REVOCATION_KEYS",
        "",
        "--set-str",
        "LOCALVERSION",
        "-lean",
    )
    subprocess.run(["make", "-C", str(tree), "olddefconfig"], check=True, capture_output=True)
    print(f"building the lean kernel in {tree} (about 30 min on 2 cores; log: {work / 'build.log'})", flush=True)
    with open(work / "build.log", "w") as log:
        subprocess.run(
            ["make", "-C", str(tree), f"-j{(os.cpu_count() or 1) + 1}", "bzImage"], check=True, stdout=log, stderr=log
        )
    return bz


def lean_cache(work: Path, image_dir: Path, bz: Path) -> Path:
    """A private cache holding a copy of the default image whose kernel is the lean one."""
    cache = work / "cache" / "pytest-bottle"
    copy = cache / "images" / image_dir.name
    if not copy.is_dir():
        cache.mkdir(parents=True, mode=0o700, exist_ok=True)
        shutil.copytree(image_dir, copy, symlinks=True)
        accel = default_cache_dir() / "accel.json"  # the host's KVM verdict, so it is not probed again
        if accel.is_file():
            shutil.copy2(accel, cache / "accel.json")
    shutil.copyfile(bz, copy / "vmlinuz")
    return cache.parent


CHILD = """
import json, os, sys, time
import pytest_bottle, pytest_bottle.vmm.qemu as q
from _ab import tb_count
q.KERNEL_ARGS += tuple(os.environ.get("LEAN_ARGS", "").split())
out = []
for i in range(int(sys.argv[1]) + 1):  # the first makes the seed if there is none, untimed
    t = time.perf_counter()
    with pytest_bottle.launch() as b:
        b.exec(["true"])
        took = time.perf_counter() - t
        if i:
            out.append((tb_count(b), took))
print(json.dumps(out))
"""


def side(restores: int, env: dict[str, str]) -> list[tuple[int, float]]:
    r = subprocess.run(  # in bench/, for _ab
        [sys.executable, "-c", CHILD, str(restores)], capture_output=True, text=True, env=env, cwd=Path(__file__).parent
    )
    if r.returncode:
        raise SystemExit(f"a restore failed:\n{r.stderr[-3000:]}")
    return [tuple(x) for x in json.loads(r.stdout.splitlines()[-1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "pytest-bottle-bench-kernel")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--restores", type=int, default=3)
    ap.add_argument("--lean-args", default="", help="kernel arguments added on the lean side")
    args = ap.parse_args()
    args.work.mkdir(parents=True, mode=0o700, exist_ok=True)
    image_dir = ensure_image("debian-bookworm", default_cache_dir()).path
    lean_home = lean_cache(args.work, image_dir, build(args.work, image_dir))
    envs = {
        "debian": {**os.environ, "LEAN_ARGS": ""},
        "lean": {**os.environ, "XDG_CACHE_HOME": str(lean_home), "LEAN_ARGS": args.lean_args},
    }
    got: dict[str, list[tuple[int, float]]] = {"debian": [], "lean": []}
    for _ in range(args.rounds):
        for name, env in envs.items():
            got[name] += side(args.restores, env)
    rows = []
    for name, runs in got.items():
        blocks, secs = [b for b, _ in runs], [s for _, s in runs]
        rows.append([name, len(runs), f"{p50(blocks):,.0f}", f"{pct(blocks, 95):,.0f}", f"{p50(secs):.3f}"])
    table(
        f"debian-bookworm, Debian's kernel against the lean one ({args.lean_args or 'no extra arguments'})",
        ["kernel", "n", "blocks p50", "blocks p95", "restore -> first exec p50 (s)"],
        rows,
    )
    ratio = p50([b for b, _ in got["lean"]]) / p50([b for b, _ in got["debian"]])
    time_ratio = p50([s for _, s in got["lean"]]) / p50([s for _, s in got["debian"]])
    print(f"\n  lean / debian: blocks {ratio:.3f}, restore -> first exec {time_ratio:.3f} (target 18,000 blocks)")


if __name__ == "__main__":
    main()
