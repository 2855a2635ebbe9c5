"""The QEMU command line, built from a plain description of the machine (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Accel = Literal["kvm", "tcg"]
# "hubport": a NIC with nothing behind it (a seed's LAN slot, where a clone puts a TAP).
NicKind = Literal["user", "tap", "hubport"]
DiskFormat = Literal["raw", "qcow2"]

KERNEL_ARGS = (
    "console=ttyS0",
    "root=/dev/vda",
    "rw",
    # eth0 is eth0: the host addresses NICs by MAC anyway, but names stay stable.
    "net.ifnames=0",
    # Freed pages are zeroed, so a snapshot's memory state compresses to what is live.
    "init_on_free=1",
    # A panic reboots at once, and -no-reboot turns that into QEMU exiting.
    "panic=-1",
    # Reboot by triple fault.  The default tries the keyboard controller, which
    # microvm lacks: under TCG trixie's kernel spun 10-90 s polling it.
    "reboot=t",
    "edd=off",
    # microvm has no PCI bus; without this the kernel logs a "Fatal" that is not.
    "pci=off",
    # Kernel messages stay on the console (they are the failure report); systemd
    # only reports failures there, since every byte through the UART costs under TCG.
    "systemd.show_status=error",
)

# Only under TCG, where code is translated per virtual address: with ASLR
# every new process maps libc and ld.so elsewhere and they are translated
# again (a `true` costs ~30 ms instead of ~11 ms).  Tests can turn it back on
# with `sysctl -w kernel.randomize_va_space=2`.
TCG_KERNEL_ARGS = ("norandmaps",)


# TCG's translation cache, in MiB.  A boot runs far more distinct code than a
# restore: bookworm's makes ~157 MB of translated code, which a 64 MiB cache
# flushed 4 times, translating much of it again (cold boot -> first exec 0.76x
# per pair with 256, bench/boot.py).  A clone has ~13 MB by the end of its
# first command; a bigger cache did not speed a busy one (concepts.md) and
# would let it hold more host memory.  Only pages in use count in RSS.
TB_SIZE_BOOT = 256
TB_SIZE_RESTORE = 64


def kernel_args(accel: str) -> tuple[str, ...]:
    """The fixed part of the kernel command line (tcg_kernel_args() adds the TSC)."""
    return KERNEL_ARGS + (TCG_KERNEL_ARGS if accel == "tcg" else ())


@dataclass(frozen=True)
class Forward:
    host_ip: str
    host_port: int
    guest_port: int


@dataclass(frozen=True)
class Nic:
    """One virtio-net device: "user" (slirp, forwards), "tap" (its fd comes with the start) or "hubport"."""

    id: str
    mac: str
    kind: NicKind = "user"
    restrict: bool = True
    forwards: tuple[Forward, ...] = ()


@dataclass(frozen=True)
class Restore:
    """A saved machine state to resume instead of booting."""

    state: Path  # device state: what -incoming loads
    disk: Path  # the saved disk (qcow2) the machine's overlay sits on
    # Guest RAM in its own file, mapped copy-on-write: a restore reads only the pages it touches.
    ram: Path | None = None
    console: Path | None = None  # the console so far: the machine's console log starts with it


@dataclass(frozen=True)
class MachineConfig:
    """One machine, from plan to argv.  What only exists once it starts (its
    run directory's files, the fds QEMU inherits) is a separate ``Runtime``."""

    kernel: Path
    initrd: Path
    disk: Path  # the image's disk (its root file system), under the overlay of a cold boot
    memory_mb: int = 512
    cpus: int = 1
    accel: Accel = "tcg"
    nics: tuple[Nic, ...] = ()
    restore: Restore | None = None
    # Guest RAM written through to this file (a seed being made: its clones map it).
    save_ram: Path | None = None
    extra_kernel_args: tuple[str, ...] = ()
    qemu: str = "qemu-system-x86_64"
    extra_args: tuple[str, ...] = field(default=())
    disk_format: DiskFormat = "raw"  # of ``disk``: "qcow2" for a derived image's layer (last: positional calls)

    @property
    def backing(self) -> tuple[Path, DiskFormat]:
        """The disk the machine's overlay sits on, and its format."""
        if self.restore is not None:
            return self.restore.disk, "qcow2"
        return self.disk, self.disk_format

    @property
    def ram_file(self) -> tuple[Path, bool] | None:
        """The file guest RAM lives in and whether writes reach it (shared), or None."""
        if self.save_ram is not None:
            return self.save_ram, True
        if self.restore is not None and self.restore.ram is not None:
            return self.restore.ram, False
        return None


@dataclass(frozen=True)
class Runtime:
    """What one start of a machine adds to its config: files in its run
    directory, the fds QEMU inherits and what the host's clock tells the guest."""

    disk: Path  # the machine's own overlay
    console_log: Path
    agent_fd: int
    qmp_fd: int
    incoming_fd: int | None = None  # the saved state being restored
    tap_fds: Mapping[str, int] = field(default_factory=dict)  # by NIC id
    clock_args: tuple[str, ...] = ()  # kernel arguments (vmm.clock)
    # The file given as -kernel instead of cfg.kernel: a restore's is only the
    # kernel's boot header (machine.boot_header_of).
    kernel: Path | None = None


def kernel_cmdline(cfg: MachineConfig, rt: Runtime) -> str:
    return " ".join(kernel_args(cfg.accel) + cfg.extra_kernel_args + rt.clock_args)


# CPU flags that steer a guest to `rep movsb`/`rep stosb` for its memset and
# memcpy, which TCG emulates a byte per step: ERMS (the kernel's page and user
# copies, glibc above 2 KiB) and FSRM (Linux 6.x memcpy and user copies); from
# QEMU 8.0 TCG also offers FZRM, FSRS and FSRC (memset, clear_user), which an
# older QEMU does not know by name.  Without them the same work runs as
# `rep stosq` and vector loops: reading /dev/zero in a guest 0.46 -> 2.5 GB/s,
# `exec(["true"])` ~0.8x the time (docs/concepts.md, the guest CPU under TCG).
BYTE_STRINGS = ("erms", "fsrm")
BYTE_STRINGS_QEMU8 = ("fzrm", "fsrs", "fsrc")


def cpu_model(accel: str, release: tuple[int, int] | None = None) -> str:
    """``-cpu`` for ``accel``; ``release``: QEMU's (major, minor), found if None."""
    if accel == "kvm":
        return "host"
    if release is None:
        from .accel import qemu_release  # cached; accel imports this module

        release = qemu_release()
    slow = BYTE_STRINGS + (BYTE_STRINGS_QEMU8 if release >= (8, 0) else ())
    # Everything TCG emulates, minus 5-level paging (longer page walks, slower
    # boots), nested virtualisation (the guest would load kvm modules for
    # nothing) and the byte-string flags above.
    return "max,la57=off,svm=off,vmx=off," + ",".join(f"{flag}=off" for flag in slow)


def build_argv(cfg: MachineConfig, rt: Runtime) -> list[str]:
    if cfg.memory_mb <= 0 or cfg.cpus <= 0:
        raise ValueError("memory and cpus must be positive")
    if cfg.accel == "kvm":
        accel = ["-accel", "kvm"]
    else:
        accel = ["-accel", f"tcg,tb-size={TB_SIZE_BOOT if rt.incoming_fd is None else TB_SIZE_RESTORE}"]
    cpu = cpu_model(cfg.accel)
    argv = [
        cfg.qemu,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-M", "microvm,rtc=on" + (",memory-backend=ram" if cfg.ram_file else ""),
        *accel,
        "-cpu", cpu,
        "-m", f"{cfg.memory_mb}M",
        "-smp", str(cfg.cpus),
        "-kernel", str(rt.kernel or cfg.kernel),
        # A restored guest booted long ago: its initrd would only be read into
        # QEMU's memory (fw_cfg, not migrated) for nothing.  A kernel is still
        # needed (it brings the option ROM whose RAM block the saved state
        # has), but only its boot header (rt.kernel).
        *(["-initrd", str(cfg.initrd)] if rt.incoming_fd is None else []),
        "-append", kernel_cmdline(cfg, rt),
        "-chardev", f"file,id=console,path={_opt(rt.console_log)},append=on",
        "-serial", "chardev:console",
        "-drive", f"id=root,file={_opt(rt.disk)},format=qcow2,if=none,cache=unsafe,discard=unmap",
        "-device", "virtio-blk-device,drive=root",
        "-chardev", f"socket,id=agent,fd={rt.agent_fd}",
        "-device", "virtio-serial-device",
        "-device", "virtserialport,chardev=agent,name=bottle.agent",
        "-chardev", f"socket,id=qmp,fd={rt.qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-rng-device",
        # A saved state then carries no "paused" run state: a restore starts
        # running at once, with no QMP round trip on the hot path.
        "-global", "migration.store-global-state=off",
    ]  # fmt: skip
    if cfg.ram_file is not None:
        ram, shared = cfg.ram_file
        share = "on" if shared else "off"
        argv += [
            "-object", f"memory-backend-file,id=ram,size={cfg.memory_mb}M,mem-path={_opt(ram)},share={share}",
        ]  # fmt: skip
    for nic in cfg.nics:
        # No guest announce: after every restore the guest would send ARPs and
        # IPv6 reports with its seed's MAC, work on the restore path; the clone
        # handshake announces the clone's own MAC instead.
        device = f"virtio-net-device,netdev={nic.id},mac={nic.mac},guest_announce=off"
        argv += ["-netdev", _netdev(nic, rt), "-device", device]
    if rt.incoming_fd is not None:
        # With file-backed RAM the stream leaves RAM out (x-ignore-shared), a
        # capability both ends must set before the stream is read: QMP does it.
        argv += ["-incoming", "defer" if deferred_incoming(cfg, rt) else f"fd:{rt.incoming_fd}"]
    return argv + list(cfg.extra_args)


def deferred_incoming(cfg: MachineConfig, rt: Runtime) -> bool:
    return rt.incoming_fd is not None and cfg.ram_file is not None


IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]


def _netdev(nic: Nic, rt: Runtime) -> str:
    if nic.kind == "tap":
        if nic.id not in rt.tap_fds:
            raise ValueError(f"tap NIC {nic.id} has no TAP fd")
        return f"tap,id={nic.id},fd={rt.tap_fds[nic.id]}"
    if nic.kind == "hubport":  # a NIC with nothing behind it
        return f"hubport,id={nic.id},hubid=0"
    if nic.kind != "user":
        raise ValueError(f"unknown NIC kind {nic.kind!r}")
    opts = [f"user,id={nic.id}", "net=10.0.2.0/24", f"restrict={'on' if nic.restrict else 'off'}"]
    opts += [f"hostfwd=tcp:{f.host_ip}:{f.host_port}-:{f.guest_port}" for f in nic.forwards]
    return ",".join(opts)


def _opt(path: Path) -> str:
    """Escape a path for a QEMU option value (commas are doubled)."""
    return str(path).replace(",", ",,")
