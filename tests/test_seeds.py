"""Work seeds and clone identity against real VMs (issue: work seeds)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from harness import HAS_THP, thp_enabled

import pytest_bottle
from pytest_bottle import Bottle
from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.store.seeds import SEED_VERSION, list_seeds
from pytest_bottle.vmm.qemu import TB_SIZE_RESTORE, cpu_model, kernel_args


def _identity(b: Bottle) -> dict[str, str]:
    out = b.check_output(
        "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
        "date +%s; hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address; cat /etc/ssh/ssh_host_ed25519_key.pub"
    ).splitlines()
    keys = ("random", "clock", "hostname", "machine_id", "mac", "host_key")
    return dict(zip(keys, out, strict=True))


def test_two_clones_have_their_own_identity(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    a, b = bottle_factory(), bottle_factory()
    # Restored from one memory state: only the handshake's reseed makes their
    # first random bytes differ (two reads in one clone differ even when replayed).
    assert _boot_id(a) == _boot_id(b)
    ia, ib = _identity(a), _identity(b)
    for key in ("random", "hostname", "machine_id", "mac", "host_key"):
        assert ia[key] != ib[key], key
    assert ia["hostname"] == a.name and ib["hostname"] == b.name
    for ident in (ia, ib):
        assert abs(int(ident["clock"]) - time.time()) < 5


def _boot_id(b: Bottle) -> str:
    """Made by the kernel at boot: clones of one seed share it, a cold boot has its own."""
    return b.read_text("/proc/sys/kernel/random/boot_id").strip()


def test_clones_on_a_lan_have_their_own_lan_address(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    a, b = bottle_factory(lan="seg"), bottle_factory(lan="seg")
    assert a.lan_ip and b.lan_ip and a.lan_ip != b.lan_ip
    assert a.lan_ip in a.check_output("ip -4 -o addr show eth1")
    mac_a = a.check_output("cat /sys/class/net/eth1/address")
    assert mac_a != b.check_output("cat /sys/class/net/eth1/address")
    r = a.exec(["ping", "-c", "1", "-W", "10", b.lan_ip])  # the image has ping: peers reach each other
    assert r.ok and "1 received" in r.stdout, r


def test_snapshot_and_cold_boot_give_the_same_machine(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    warm_started = time.time()
    warm, cold = bottle_factory(), bottle_factory(boot="cold")
    for b in (warm, cold):
        assert b.exec("systemctl is-system-running").stdout.strip() in ("running", "degraded")
        assert b.check_output("hostname").strip() == b.name
    # The cold one really booted: its kernel was started for it, not restored
    # (a clone's console starts with its seed's boot log, so that proves nothing).
    assert _boot_id(cold) != _boot_id(warm)
    booted = float(cold.check_output("cut -d' ' -f1 /proc/uptime"))
    assert booted < time.time() - warm_started + 5
    # Only a clone (RAM in a file) starts without huge pages: a cold boot's
    # anonymous RAM keeps them.
    if HAS_THP:
        assert [thp_enabled(b.pid) for b in (warm, cold)] == (["0", "1"] if warm.accel == "tcg" else ["1", "1"])
    if warm.accel == "tcg":  # a boot's translated code fit its cache: nothing was flushed to be translated again
        (cold_used, cold_size, cold_flushes), (_, warm_size, _) = _jit(cold), _jit(warm)
        restore_cache = TB_SIZE_RESTORE << 20  # more than a boot's translated code, before the boot got its own
        assert cold_flushes == 0 and cold_used > restore_cache, (cold_used, cold_size, cold_flushes)
        assert warm_size <= restore_cache < cold_size  # a clone's is smaller: it bounds a busy clone's host memory


def _jit(b: Bottle) -> tuple[int, int, int]:
    """QEMU's translation cache: bytes of translated code, the cache's size, and how often it was flushed."""
    machine: Any = b._machine  # a QEMU machine: its monitor answers human commands
    text = machine.qmp.cmd("human-monitor-command", **{"command-line": "info jit"})
    used, size = re.search(r"gen code size\s+(\d+)/(\d+)", text).groups()  # type: ignore[union-attr]
    flushes = re.search(r"TB flush count\s+(\d+)", text).group(1)  # type: ignore[union-attr]
    return int(used), int(size), int(flushes)


@pytest.fixture
def seeded_cache(private_cache: Path) -> Path:
    """A private cache holding a copy of the default seed (copying beats a 25 s boot)."""
    with pytest_bottle.launch() as b:  # the main cache has its default seed now
        accel = b.accel
    (seed,) = [s for s in list_seeds(default_cache_dir()) if s.path.name == _default_seed_name(accel)]
    (private_cache / "seeds").mkdir()
    subprocess.run(["cp", "-a", "--sparse=always", str(seed.path), str(private_cache / "seeds")], check=True)
    # The seed carries the cache's client key: the copy needs the same key to match.
    subprocess.run(["cp", "-a", str(default_cache_dir() / "keys"), str(private_cache)], check=True)
    return private_cache


def _default_seed_name(accel: str) -> str:
    from pytest_bottle.images import ensure_image

    image = ensure_image("debian-bookworm", default_cache_dir())
    wanted = {
        "image_key": image.key,
        "image_built": image.manifest.get("created"),
        "seed_version": SEED_VERSION,
        "kernel_args": " ".join(kernel_args(accel)),
        "cpu": cpu_model(accel),
        "memory_mb": 512,
        "cpus": 1,
        "nics": 1,
    }
    seeds = [s for s in list_seeds(default_cache_dir()) if wanted.items() <= s.manifest["key_parts"].items()]
    return max(seeds, key=lambda s: s.manifest["created"]).path.name


def _damage(path: Path, how: str) -> None:
    with open(path, "r+b") as f:
        size = path.stat().st_size
        if how == "truncate":
            f.truncate(size // 2)
            return
        # Same size, different bytes: only the checksum can tell.  Pick a spot
        # that holds data (the RAM file is mostly holes).
        f.seek(os.lseek(f.fileno(), size // 4, os.SEEK_DATA))
        pos = f.tell()
        chunk = f.read(4096)
        f.seek(pos)
        f.write(bytes(x ^ 0xFF for x in chunk))


@pytest.mark.slow
@pytest.mark.parametrize(  # a size check and a checksum, each a seed boot; unit/test_entries checks each file's
    ("victim", "how"), [("memory.state", "truncate"), ("memory.ram", "flip")]
)
def test_corrupt_seed_is_discarded_and_rebuilt(seeded_cache: Path, victim: str, how: str) -> None:
    (seed,) = list_seeds(seeded_cache)
    _damage(seed.path / victim, how)
    with pytest.warns(UserWarning, match="discarded seed"):
        with pytest_bottle.launch(cache_dir=seeded_cache) as b:
            assert b.check_output("echo again") == "again\n"
    (rebuilt,) = list_seeds(seeded_cache)
    assert rebuilt.manifest["created"] > seed.manifest["created"]
