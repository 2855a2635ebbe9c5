"""Planning a bottle: spec, image and accelerator to one machine description (pure, no VM)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_bottle.images import BuiltImage
from pytest_bottle.lifecycle import handshake
from pytest_bottle.lifecycle.plan import LAN_NIC, USER_NIC, make_plan, restore_from
from pytest_bottle.spec import BottleSpec
from pytest_bottle.store.saved import SavedState
from pytest_bottle.vmm.qemu import Forward, MachineConfig, Restore, Runtime, build_argv

MACS = ("52:54:b0:77:00:01", "52:54:b0:77:00:02")
IMAGE = BuiltImage("debian-bookworm", "k", Path("/c/images/bookworm"), {})
MINIMAL = BuiltImage("debian-bookworm-minimal", "k", Path("/c/images/minimal"), {})


def Saved(path: Path) -> SavedState:
    return SavedState(path, {})


def runtime(**kw: object) -> Runtime:
    base: dict[str, object] = dict(disk=Path("/r/disk.qcow2"), console_log=Path("/r/console.log"), agent_fd=5, qmp_fd=6)
    base.update(kw)
    return Runtime(**base)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_an_image_with_sshd_forwards_ssh_too() -> None:
    plan = make_plan(BottleSpec(forward=(8080, 22, 80)), IMAGE, "tcg", "btl-1")
    assert plan.ssh and plan.ports == (22, 80, 8080)
    bare = make_plan(BottleSpec(forward=(8080,)), MINIMAL, "tcg", "btl-2")
    assert not bare.ssh and bare.ports == (8080,)
    assert make_plan(BottleSpec(), MINIMAL, "tcg", "btl-3").ports == ()


def test_the_cold_machine_is_the_spec() -> None:
    plan = make_plan(BottleSpec(memory_mb=1024, cpus=2), IMAGE, "kvm", "btl-1")
    cfg = plan.machine(MACS[:1], {22: ("127.77.0.5", 2222)})
    assert (cfg.kernel, cfg.initrd, cfg.disk) == (IMAGE.kernel, IMAGE.initrd, IMAGE.rootfs)
    assert (cfg.memory_mb, cfg.cpus, cfg.accel) == (1024, 2, "kvm")
    assert cfg.backing == (IMAGE.rootfs, "raw") and cfg.restore is None and cfg.ram_file is None
    (nic,) = cfg.nics
    assert (nic.id, nic.mac, nic.kind, nic.restrict) == (USER_NIC, MACS[0], "user", True)
    assert nic.forwards == (Forward("127.77.0.5", 2222, 22),)


def test_nat_lifts_the_restriction_and_a_lan_adds_a_tap() -> None:
    plan = make_plan(BottleSpec(network="nat", lan="x"), IMAGE, "tcg", "btl-1")
    assert plan.nic_count == 2 and make_plan(BottleSpec(), IMAGE, "tcg", "b").nic_count == 1
    user, lan = plan.machine(MACS, {}).nics
    assert user.restrict is False and user.forwards == ()
    assert (lan.id, lan.mac, lan.kind) == (LAN_NIC, MACS[1], "tap")


def test_boot_mode_decides_whether_it_restores() -> None:
    assert make_plan(BottleSpec(), IMAGE, "tcg", "b").restores
    assert not make_plan(BottleSpec(boot="cold"), IMAGE, "tcg", "b").restores


def test_restore_from_adds_the_saved_state_and_changes_nothing_else() -> None:
    cfg = make_plan(BottleSpec(), IMAGE, "tcg", "b").machine(MACS[:1], {})
    saved = Saved(Path("/c/seeds/s"))
    restored = restore_from(cfg, saved)
    assert restored.restore == Restore(saved.memory, saved.disk, saved.ram, saved.console)
    assert restored.backing == (saved.disk, "qcow2")
    assert restored.ram_file == (saved.ram, False)  # mapped privately: the seed stays as it is
    assert dataclasses.replace(restored, restore=None) == cfg and cfg.restore is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        restored.memory_mb = 1  # type: ignore[misc]


def test_a_seed_being_made_writes_its_ram_through() -> None:
    cfg = MachineConfig(IMAGE.kernel, IMAGE.initrd, IMAGE.rootfs, save_ram=Path("/t/memory.ram"))
    assert cfg.ram_file == (Path("/t/memory.ram"), True)
    assert any(o.endswith("share=on") for o in opt(build_argv(cfg, runtime()), "-object"))


def test_a_planned_restore_becomes_argv_with_the_starts_fds() -> None:
    plan = make_plan(BottleSpec(lan="x"), IMAGE, "tcg", "b")
    cfg = restore_from(plan.machine(MACS, {}), Saved(Path("/c/seeds/s")))
    argv = build_argv(cfg, runtime(incoming_fd=7, tap_fds={LAN_NIC: 9}, clock_args=("tsc=reliable",)))
    assert opt(argv, "-incoming") == ["defer"]  # RAM in its file: QMP loads the stream
    assert "-initrd" not in argv and opt(argv, "-append")[0].endswith("tsc=reliable")
    assert f"tap,id={LAN_NIC},fd=9" in opt(argv, "-netdev")
    assert any("mem-path=/c/seeds/s/memory.ram,share=off" in o for o in opt(argv, "-object"))
    assert opt(argv, "-M") == ["microvm,rtc=on,memory-backend=ram"]


def test_the_clone_handshake_gets_what_is_left_of_the_start_timeout_and_no_more() -> None:
    """A start whose agent answered at the very end of its ``timeout`` is late:
    the handshake got at least 0.5 s whatever was left."""
    plan = make_plan(BottleSpec(), MINIMAL, "tcg", "btl-1")
    res = SimpleNamespace(macs=MACS, lan_ip=None)
    found = ({"match": MACS[0]},)
    asked: list[float] = []

    def setup(shake: object, *, timeout: float) -> SimpleNamespace:
        asked.append(timeout)
        return SimpleNamespace(nic_name=lambda mac: "eth0")

    agent = SimpleNamespace(setup=setup)
    args: tuple[object, ...] = (agent, plan, res, found, handshake.Keys(None, None), {})
    done = handshake.clone_setup(*args, time.monotonic() + 0.2)  # type: ignore[arg-type, call-arg]
    assert done.announce is not None and len(asked) == 1 and 0 < asked[0] <= 0.2
    with pytest.raises(TimeoutError, match="no time was left"):
        handshake.clone_setup(*args, time.monotonic() - 0.01)  # type: ignore[arg-type, call-arg]
    assert len(asked) == 1  # not asked at all
