"""A running QEMU machine: its process, agent socket, QMP session and console."""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import BootError, BootTimeout
from ..host.deps import require
from ..host.paths import naming, write_private
from . import clock, console, process, room
from .qemu import IGNORE_SHARED, MachineConfig, Runtime, build_argv, deferred_incoming
from .qmp import FAILED, QMP

log = logging.getLogger(__name__)

CONSOLE_TAIL_LINES = 60
# A machine's files in its run directory.
DISK = "disk.qcow2"
CONSOLE = "console.log"
BOOT_HEADER = "kernel.hdr"
# query-migrate statuses after which nothing more happens (None: no migration yet).
_MIGRATION_ENDED = (None, "none", "completed", "failed", "cancelled")


def console_tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    """The last ``lines`` lines of a console log (empty if there is none)."""
    text, _ = console.read_tail(path, 64 * 1024)
    return "\n".join(text.splitlines()[-lines:])


def _open_state(cfg: MachineConfig, name: str) -> int | None:
    """An fd on the saved state ``cfg`` restores, or None for a cold boot."""
    if cfg.restore is None:
        return None
    try:
        return os.open(cfg.restore.state, os.O_RDONLY)
    except OSError as e:  # e.g. a seed removed since it was verified
        raise BootError(f"cannot open the saved state {cfg.restore.state}: {e.strerror}", name=name) from None


def boot_header_of(kernel: Path, out: Path) -> Path:
    """Write the boot header of the bzImage ``kernel`` (its real-mode setup
    sectors, about 20 KiB) to ``out``, for a restore to give QEMU as its kernel.

    QEMU reads the whole -kernel file into memory and keeps it for the life of
    the process (fw_cfg serves it to the firmware): 13.5 MiB of every restored
    bottle's RSS, for a guest that booted long ago.  It still needs a kernel
    for the option ROM whose RAM block the saved state has; the header alone
    passes QEMU's checks and brings the same ROM."""
    try:
        with open(kernel, "rb") as f:
            head = f.read(0x206)
            if len(head) < 0x206 or head[0x202:0x206] != b"HdrS":
                raise BootError(f"{kernel} is not a bzImage (no boot header)")
            sectors = head[0x1F1] or 4
            data = head + f.read((sectors + 1) * 512 - len(head))
    except OSError as e:  # the image went (removed, pruned) or cannot be read
        raise BootError(f"cannot read the kernel {kernel}: {e.strerror}") from None
    with naming(out):  # the run directory's: a full disk, named by the start
        out.write_bytes(data)
    return out


class QemuMachine:
    """One QEMU process.  The agent and QMP sockets are socketpairs handed to
    QEMU as file descriptors: no paths to race on, and QEMU's death shows up
    at once as EOF on our ends."""

    backend = "qemu"

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        agent_sock: socket.socket,
        qmp: QMP,
        cfg: MachineConfig,
        runtime: Runtime,
        run_dir: Path,
        detached: bool = False,
    ) -> None:
        self.proc = proc
        self.agent_sock = agent_sock
        self.qmp = qmp
        self.cfg = cfg
        self.runtime = runtime
        self.run_dir = run_dir
        self.pid = proc.pid
        self.started = process.start_time(proc.pid)
        # Without the parent-death signal: it may outlive us (Bottle.keep).
        self.detached = detached
        self.top_disk = runtime.disk  # the qcow2 it writes to (a snapshot puts a new one on top)
        self.snapshot_lock = threading.Lock()  # one snapshot at a time: each is a QMP conversation

    @classmethod
    def start(
        cls,
        cfg: MachineConfig,
        run_dir: Path,
        *,
        name: str = "bottle",
        detached: bool = False,
        tap_fds: Mapping[str, int] | None = None,
        deadline: float | None = None,
        on_spawn: Callable[[QemuMachine], None] | None = None,
    ) -> QemuMachine:
        """Start QEMU for ``cfg`` on the overlay ``run_dir/disk.qcow2`` (made by the caller).

        ``tap_fds``: an open TAP per "tap" NIC id, passed to QEMU (it may live in another netns).
        ``deadline`` (``time.monotonic()``): when a state load QEMU does not answer is given up on.
        ``on_spawn`` sees the machine as soon as QEMU runs, before anything waits on
        it: a detached QEMU (no parent-death signal) outlives a kill -9 of ours
        from then on, so its pid must be on record by then.
        """
        qemu = require(cfg.qemu, "run virtual machines")
        agent_host, agent_qemu = socket.socketpair()
        qmp_host, qmp_qemu = socket.socketpair()
        taps = dict(tap_fds or {})
        child_fds = [agent_qemu.fileno(), qmp_qemu.fileno(), *taps.values()]
        incoming_fd = None
        try:
            incoming_fd = _open_state(cfg, name)
            if incoming_fd is not None:
                child_fds.append(incoming_fd)
            rt = Runtime(
                disk=run_dir / DISK,
                console_log=run_dir / CONSOLE,
                agent_fd=agent_qemu.fileno(),
                qmp_fd=qmp_qemu.fileno(),
                incoming_fd=incoming_fd,
                tap_fds=taps,
                clock_args=clock.tcg_kernel_args() if cfg.accel == "tcg" else (),
                kernel=boot_header_of(cfg.kernel, run_dir / BOOT_HEADER) if incoming_fd is not None else None,
            )
            argv = build_argv(cfg, rt)
            argv[0] = qemu  # as found on PATH
            write_private(run_dir / "qemu.argv", shlex.join(argv) + "\n")  # its error names the file
            proc = process.spawn(
                argv,
                log_path=run_dir / "qemu.log",
                pass_fds=child_fds,
                env=dict(os.environ, TMPDIR=str(run_dir)),
                die_with_parent=not detached,
                # With its RAM in a file (a clone, a seed being made) and under
                # TCG, huge pages only round the translated code up to 2 MB
                # steps, and a few buffers to 2 MB each: ~3.5 MB of an idle
                # clone's ~100 MB, for no measured speed.  Anonymous guest RAM
                # (a cold boot) keeps them.
                small_pages=cfg.accel == "tcg" and cfg.ram_file is not None,
            )
        except BaseException:
            agent_host.close()
            qmp_host.close()
            raise
        finally:
            agent_qemu.close()
            qmp_qemu.close()
            if incoming_fd is not None:
                os.close(incoming_fd)
        machine = cls(proc, agent_host, QMP(qmp_host, name), cfg, rt, run_dir, detached)
        try:
            if on_spawn is not None:
                on_spawn(machine)
        except BaseException:
            machine.stop(grace=0.5)
            raise
        console.watch(machine, rt.console_log)  # a guest may flood it: kept bounded on disk
        if deferred_incoming(cfg, rt):
            machine._load_deferred(name, deadline)
        return machine

    def _load_deferred(self, name: str, deadline: float | None) -> None:
        """Load a saved state whose RAM stays in its file (see ``build_argv``)."""
        try:
            self.qmp.cmd("migrate-set-capabilities", timeout=self._left(deadline), capabilities=IGNORE_SHARED)
            self.qmp.cmd("migrate-incoming", timeout=self._left(deadline), uri=f"fd:{self.runtime.incoming_fd}")
        except Exception as e:
            raise self.start_failed(e, name) from None
        except BaseException:
            self.stop(grace=0.5)
            raise

    def on_disk_stop(self, callback: Callable[[str], None], deadline: float | None = None) -> None:
        self.qmp.on_stop = lambda why: callback(  # the disk it writes then: a snapshot puts one on top
            f"QEMU stopped the VM: its disk {self.top_disk} could not be written ({why})"
        )
        try:  # a restore's session is connected already; its events are read while it is
            self.qmp.connect(self._left(deadline))
        except FAILED as e:  # QEMU is gone: the agent's wait says why
            log.debug("qmp %s: %s", self.qmp.name, e)

    def _left(self, deadline: float | None) -> float | None:
        """A command's wait: QMP's own, or less when the bottle's start ends sooner."""
        return None if deadline is None else max(0.5, min(self.qmp.timeout, deadline - time.monotonic()))

    def start_failed(self, error: Exception, name: str) -> BootError:
        """Stop the machine and say why it did not start, in QEMU's words.

        A QEMU that exits during start-up (a forwarded port taken, a backing
        file missing) shows up on the QMP side as a refused or broken
        connection: its own log, not that, is the reason.
        """
        try:
            self.proc.wait(2.0)  # EOF on QMP usually means QEMU is exiting
        except subprocess.TimeoutExpired:
            pass
        reason = self.exit_reason()
        alive = not reason
        self.stop(grace=0.5)
        tail = console_tail(self.console_log)
        if alive and isinstance(error, TimeoutError):
            return BootTimeout(f"QEMU did not answer QMP in time ({error})", tail, name)
        return BootError(reason or f"QMP failed during start-up: {type(error).__name__}: {error}", tail, name)

    @property
    def console_log(self) -> Path:
        return self.runtime.console_log

    def alive(self) -> bool:
        return self.proc.poll() is None

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        """QEMU's exit code, or None if it still runs after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def exit_reason(self) -> str:
        rc = self.proc.poll()
        if rc is None:
            return ""
        out, _ = console.read_tail(self.run_dir / "qemu.log", 64 * 1024)  # what QEMU said last
        out = out.strip()
        return f"QEMU exited with {rc}{room.ram_bus_error(self.cfg, rc)}" + (f": {out[-1500:]}" if out else "")

    def save_state(self, path: Path, timeout: float = 120.0) -> None:
        """Stop the guest and write its whole state (devices and RAM) to ``path``;
        ``BootError`` if QEMU fails at it or does not answer."""
        try:
            self.qmp.cmd("stop")
            self.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            if self.cfg.ram_file is not None:  # RAM stays in its file; save the devices
                self.qmp.cmd("migrate-set-capabilities", capabilities=IGNORE_SHARED)
            self.qmp.cmd("migrate", uri="exec:cat > " + shlex.quote(str(path)))
            self._wait_migration("saving the VM state", timeout, path)
        except FAILED as e:  # QEMU stuck, or gone mid-save
            why = self.exit_reason() or (str(e) if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}")
            raise BootError(f"saving the VM state failed: {why}", name=self.qmp.name) from None

    # -- live snapshots (see store/snapshots.py) ----------------------------

    def pause(self) -> None:
        self.qmp.cmd("stop")

    def resume(self, timeout: float = 30.0) -> None:
        """Run on after ``pause`` (also after ``stream_state``, which handed the
        disks over: ``cont`` takes them back).  A state still being written
        (a failed or timed-out snapshot) is cancelled and waited for first;
        ``BootError`` if the guest does not run afterwards."""
        deadline = time.monotonic() + timeout
        cancelled = False
        while (status := self.qmp.cmd("query-migrate").get("status")) not in _MIGRATION_ENDED:
            if not cancelled:
                self.qmp.cmd("migrate_cancel")
                cancelled = True
            if time.monotonic() > deadline:
                raise BootError(
                    f"writing its state did not end in {timeout:.0f} s (status {status})", name=self.qmp.name
                )
            time.sleep(0.02)
        self.qmp.cmd("cont")
        status = self.qmp.cmd("query-status").get("status")
        if status != "running":
            raise BootError(f"it does not run on after a snapshot (status {status})", name=self.qmp.name)

    def freeze_disk(self, overlay: Path) -> Path:
        """Write on ``overlay`` from now on (a qcow2 already made on the current
        top disk); returns the old top, which nothing writes any more."""
        node = f"top-{overlay.stem}"
        args: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": node,
            "discard": "unmap",
            "cache": {"direct": False, "no-flush": True},  # as the -drive's cache=unsafe
            "file": {"driver": "file", "filename": str(overlay)},
            "backing": None,  # it is put on top by blockdev-snapshot
        }
        self.qmp.cmd("blockdev-add", **args)
        self.qmp.cmd("blockdev-snapshot", node="root", overlay=node)
        old, self.top_disk = self.top_disk, overlay
        return old

    def disk_size(self) -> int:
        """The guest disk's virtual size in bytes."""
        for dev in self.qmp.cmd("query-block"):
            if dev.get("device") == "root":
                return int(dev["inserted"]["image"]["virtual-size"])
        raise BootError("QEMU has no disk named root", name=self.qmp.name)

    def stream_state(self, path: Path, timeout: float = 120.0) -> None:
        """Write the paused guest's whole state, RAM included, to the file ``path``,
        which another QEMU reads next (see ``receive_state``)."""
        self.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": False}])
        self.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        self.qmp.cmd("migrate", uri="exec:cat > " + shlex.quote(str(path)))
        self._wait_migration("sending the VM state", timeout, path)

    def receive_state(self, path: Path) -> None:
        """Start loading a state from ``path`` (started with ``-incoming defer -S``)."""
        self.qmp.cmd("migrate-incoming", uri="exec:cat " + shlex.quote(str(path)))

    def wait_received(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.qmp.cmd("query-status").get("status") == "inmigrate":
            if not self.alive():
                raise BootError(f"loading the VM state failed: {self.exit_reason()}")
            if time.monotonic() > deadline:
                raise BootError(f"loading the VM state took longer than {timeout} s")
            time.sleep(0.02)

    def _wait_migration(self, what: str, timeout: float, target: Path) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or not self.alive():
                why = str(info.get("error-desc") or "")[:500] or self.exit_reason()
                raise BootError(f"{what} failed ({status}){': ' * bool(why)}{why}{room.write_failed(target)}")
            if time.monotonic() > deadline:
                try:
                    self.qmp.cmd("migrate_cancel")
                except Exception as e:  # the timeout is the error to report
                    log.debug("migrate_cancel after a timeout failed: %s", e)
                raise BootError(f"{what} took longer than {timeout} s")
            time.sleep(0.02)

    def stop(self, grace: float = 2.0) -> None:
        """QMP quit, then SIGTERM, then SIGKILL.  Idempotent."""
        if self.alive():
            try:
                self.qmp.cmd("quit", timeout=1.0)
                self.proc.wait(grace)
            except Exception as e:  # QMP gone or slow: signals will do
                log.debug("qmp quit of %s failed: %s", self.pid, e)
        process.terminate(self.proc, grace)
        console.forget(self)
        self.qmp.close()
        self.agent_sock.close()

    def expose_agent(self, path: Path) -> None:
        """Move the agent's chardev from our socketpair to a Unix socket at
        ``path`` that QEMU listens on: one client at a time (QEMU serves one
        connection per socket chardev), for a kept machine (``bottle shell``).
        Our end of the socketpair sees EOF; the guest agent resyncs with the next client."""
        unix = {"type": "unix", "data": {"path": str(path)}}
        backend = {"type": "socket", "data": {"addr": unix, "server": True, "wait": False}}
        self.qmp.cmd("chardev-change", id="agent", backend=backend)

    def disconnect(self) -> None:
        """Let go of the machine and leave it running (a kept bottle): our QMP
        end, and our end of the agent's socketpair (its channel has its own)."""
        self.qmp.close()
        self.agent_sock.close()
