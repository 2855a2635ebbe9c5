"""Work seeds and clone identity against real VMs (issue: work seeds)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import pytest_bottle
from pytest_bottle import Bottle
from pytest_bottle.seeds import list_seeds


def _identity(b: Bottle) -> dict[str, str]:
    out = b.check_output(
        "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
        "date +%s; hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address; cat /etc/ssh/ssh_host_ed25519_key.pub"
    ).splitlines()
    keys = ("random", "clock", "hostname", "machine_id", "mac", "host_key")
    return dict(zip(keys, out, strict=True))


def test_two_clones_have_their_own_identity(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    a, b = bottle_factory(), bottle_factory()
    ia, ib = _identity(a), _identity(b)
    for key in ("random", "hostname", "machine_id", "mac", "host_key"):
        assert ia[key] != ib[key], key
    assert ia["hostname"] == a.name and ib["hostname"] == b.name
    for ident in (ia, ib):
        assert abs(int(ident["clock"]) - time.time()) < 5
    # The guest's own random bytes differ from a second read too (no replayed state).
    assert a.check_output("head -c 16 /dev/urandom | od -An -tx1") != a.check_output(
        "head -c 16 /dev/urandom | od -An -tx1"
    )


def test_clones_on_a_lan_have_their_own_lan_address(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    a, b = bottle_factory(lan="seg"), bottle_factory(lan="seg")
    assert a.lan_ip and b.lan_ip and a.lan_ip != b.lan_ip
    assert a.lan_ip in a.check_output("ip -4 -o addr show eth1")
    mac_a = a.check_output("cat /sys/class/net/eth1/address")
    assert mac_a != b.check_output("cat /sys/class/net/eth1/address")


def test_snapshot_and_cold_boot_give_the_same_machine(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    warm, cold = bottle_factory(), bottle_factory(boot="cold")
    for b in (warm, cold):
        assert b.exec("systemctl is-system-running").stdout.strip() in ("running", "degraded")
        assert b.check_output("hostname").strip() == b.name
    assert "Linux version" in cold.console_log


def _corrupt_and_relaunch(cache: Path, damage: str) -> None:
    with pytest_bottle.launch(cache_dir=cache) as b:
        assert b.check_output("echo ok") == "ok\n"
    (seed,) = list_seeds(cache)
    mem = seed.memory
    if damage == "truncate":
        with open(mem, "r+b") as f:
            f.truncate(mem.stat().st_size // 2)
    else:  # same size, different bytes: only the checksum can tell
        with open(mem, "r+b") as f:
            f.seek(mem.stat().st_size // 2)
            chunk = f.read(4096)
            f.seek(mem.stat().st_size // 2)
            f.write(bytes(x ^ 0xFF for x in chunk))
    with pytest.warns(UserWarning, match="discarding seed"):
        with pytest_bottle.launch(cache_dir=cache) as b:
            assert b.check_output("echo again") == "again\n"
    (rebuilt,) = list_seeds(cache)
    assert rebuilt.manifest["created"] > seed.manifest["created"]


@pytest.mark.slow
def test_truncated_seed_is_discarded_and_rebuilt(private_cache: Path) -> None:
    _corrupt_and_relaunch(private_cache, "truncate")


@pytest.mark.slow
def test_seed_with_flipped_bytes_is_discarded_and_rebuilt(private_cache: Path) -> None:
    _corrupt_and_relaunch(private_cache, "flip")
