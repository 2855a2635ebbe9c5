from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from pytest_bottle.errors import BootError
from pytest_bottle.vmm.machine import boot_header_of
from pytest_bottle.vmm.qemu import (
    TB_SIZE_BOOT,
    TB_SIZE_RESTORE,
    Forward,
    MachineConfig,
    Nic,
    Runtime,
    build_argv,
    cpu_model,
)

RUNTIME = {f.name for f in fields(Runtime)}


def build(**kw: object) -> list[str]:
    """argv for a default machine, ``kw`` changing its config or its runtime (``disk``: the overlay)."""
    base: dict[str, object] = dict(kernel=Path("/i/vmlinuz"), initrd=Path("/i/initrd.img"), disk=Path("/i/rootfs"))
    rt: dict[str, object] = dict(disk=Path("/r/disk.qcow2"), console_log=Path("/r/console.log"), agent_fd=5, qmp_fd=6)
    for key, value in kw.items():
        (rt if key in RUNTIME else base)[key] = value
    return build_argv(MachineConfig(**base), Runtime(**rt))  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_direct_kernel_boot() -> None:
    argv = build()
    assert opt(argv, "-M") == ["microvm,rtc=on"]
    assert opt(argv, "-kernel") == ["/i/vmlinuz"] and opt(argv, "-initrd") == ["/i/initrd.img"]
    assert "root=/dev/vda" in opt(argv, "-append")[0] and "panic=-1 reboot=t" in opt(argv, "-append")[0]
    assert "-no-reboot" in argv and "-nodefaults" in argv
    assert "socket,id=agent,fd=5" in opt(argv, "-chardev")
    assert "virtserialport,chardev=agent,name=bottle.agent" in opt(argv, "-device")
    assert "chardev=qmp,mode=control" in opt(argv, "-mon")
    assert any(
        d.startswith("file=/r/disk.qcow2,format=qcow2") or "file=/r/disk.qcow2" in d for d in opt(argv, "-drive")
    )


def test_accelerators() -> None:
    assert opt(build(accel="kvm"), "-accel") == ["kvm"]
    assert opt(build(accel="kvm"), "-cpu") == ["host"]
    tcg = build(accel="tcg")
    assert opt(tcg, "-accel")[0].startswith("tcg") and opt(tcg, "-cpu") == [cpu_model("tcg")]


def test_a_boot_gets_a_larger_translation_cache_than_a_restore() -> None:
    boot, restore = (opt(build(accel="tcg", **kw), "-accel") for kw in ({}, {"incoming_fd": 7}))
    assert boot == [f"tcg,tb-size={TB_SIZE_BOOT}"] and restore == [f"tcg,tb-size={TB_SIZE_RESTORE}"]
    assert TB_SIZE_BOOT > TB_SIZE_RESTORE


def test_user_nic_with_forwards() -> None:
    nic = Nic("net0", "52:54:b0:77:00:01", "user", restrict=True, forwards=(Forward("127.77.0.9", 22, 22),))
    argv = build(nics=(nic,))
    netdev = opt(argv, "-netdev")[0]
    assert "restrict=on" in netdev and "hostfwd=tcp:127.77.0.9:22-:22" in netdev
    assert "virtio-net-device,netdev=net0,mac=52:54:b0:77:00:01,guest_announce=off" in opt(argv, "-device")
    nat = build(nics=(Nic("net0", "52:54:b0:77:00:01", "user", restrict=False),))
    assert "restrict=off" in opt(nat, "-netdev")[0]


def test_tap_nic_and_incoming() -> None:
    argv = build(nics=(Nic("net1", "52:54:b0:77:00:02", "tap"),), tap_fds={"net1": 9}, incoming_fd=7)
    assert opt(argv, "-netdev") == ["tap,id=net1,fd=9"]
    assert opt(argv, "-incoming") == ["fd:7"]
    # A restore needs the kernel (its option ROM is in the saved state), not the initrd.
    assert opt(argv, "-kernel") == ["/i/vmlinuz"] and "-initrd" not in argv
    assert "guest_announce=off" in opt(argv, "-device")[-1]
    # ... and of the kernel only its boot header, when the runtime names one.
    assert opt(build(incoming_fd=7, kernel=Path("/r/kernel.hdr")), "-kernel") == ["/r/kernel.hdr"]


def test_boot_header_is_the_setup_sectors(tmp_path: Path) -> None:
    image = bytearray(64 * 1024)
    image[0x1F1] = 3  # setup sectors after the boot sector
    image[0x202:0x206] = b"HdrS"
    (tmp_path / "vmlinuz").write_bytes(bytes(image))
    out = boot_header_of(tmp_path / "vmlinuz", tmp_path / "kernel.hdr")
    assert out.read_bytes() == bytes(image[: 4 * 512])


def test_a_missing_or_foreign_kernel_is_a_boot_error(tmp_path: Path) -> None:
    with pytest.raises(BootError, match="cannot read the kernel"):
        boot_header_of(tmp_path / "gone", tmp_path / "kernel.hdr")
    (tmp_path / "not-a-bzimage").write_bytes(bytes(4096))
    with pytest.raises(BootError, match="not a bzImage"):
        boot_header_of(tmp_path / "not-a-bzimage", tmp_path / "kernel.hdr")
    assert not (tmp_path / "kernel.hdr").exists()


def test_a_tap_nic_without_its_fd_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="net1"):
        build(nics=(Nic("net1", "52:54:b0:77:00:02", "tap"),))


def test_commas_in_paths_are_escaped() -> None:
    argv = build(disk=Path("/r/a,b/disk.qcow2"))
    assert any("file=/r/a,,b/disk.qcow2" in d for d in opt(argv, "-drive"))


@pytest.mark.parametrize("kw", [{"memory_mb": 0}, {"cpus": 0}])
def test_invalid_sizes(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        build(**kw)


def test_aslr_is_off_only_under_tcg() -> None:
    tcg = build(accel="tcg", extra_kernel_args=("tsc=reliable",))
    kvm = build(accel="kvm")
    assert opt(tcg, "-append")[0].split()[-2:] == ["norandmaps", "tsc=reliable"]
    assert "norandmaps" not in opt(kvm, "-append")[0] and "root=/dev/vda" in opt(kvm, "-append")[0]


def test_tcg_cpu_model_drops_the_byte_string_flags_and_kvm_uses_the_host() -> None:
    tcg, kvm = build(accel="tcg"), build(accel="kvm")
    assert opt(tcg, "-cpu") == [cpu_model("tcg")] and opt(kvm, "-cpu") == ["host"]
    old, new = cpu_model("tcg", (7, 2)).split(","), cpu_model("tcg", (8, 0)).split(",")
    assert old[0] == new[0] == "max" and {"erms=off", "fsrm=off"} <= set(old)
    # QEMU 7.2 refuses a property it does not know: the 8.0 flags only from 8.0
    assert not {"fzrm=off", "fsrs=off", "fsrc=off"} & set(old)
    assert {"erms=off", "fsrm=off", "fzrm=off", "fsrs=off", "fsrc=off"} <= set(new)
    assert cpu_model("kvm", (8, 0)) == "host"
