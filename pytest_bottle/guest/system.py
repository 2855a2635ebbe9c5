"""The agent's calls about the machine as a whole: listening ports, settling
after boot, quiescing before a snapshot (mixed into ``agent.Agent``)."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

try:  # on the host, as part of the package
    from . import frames
except ImportError:  # in the guest, files side by side
    import frames  # type: ignore[import-not-found,no-redef]


class SystemOps:
    """Mixed into ``agent.Agent``; uses nothing of it."""

    def op_listening(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        """TCP ports something listens on (from /proc/net/tcp*, no tools needed)."""
        ports = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    for line in f.readlines()[1:]:
                        cols = line.split()
                        if cols[3] == "0A":
                            ports.add(int(cols[1].rsplit(":", 1)[1], 16))
            except OSError:
                continue
        return {"ports": sorted(ports)}

    def op_settle(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        """Wait until boot is over and the machine is idle: what a snapshot should
        capture.  ``busy`` names what was still at work after ``within`` seconds
        (the host decides whether a half-booted machine will do)."""
        deadline = time.monotonic() + float(call.get("within", 60))
        state, busy = "", ""
        for step, argv in (("systemd", ["systemctl", "is-system-running", "--wait"]), ("udev", ["udevadm", "settle"])):
            left = deadline - time.monotonic()
            if left <= 0:
                busy = step
                break
            if step == "udev":  # its own default gives up after 120 s, and says so only by its exit code
                argv.append(f"--timeout={int(left)}")
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=left, check=False)
            except OSError:  # no systemd or udev: nothing to wait for
                continue
            except subprocess.TimeoutExpired:
                busy = step
                break
            if step == "systemd":
                state = r.stdout.strip()  # degraded exits 1 too: a finished boot all the same
            elif r.returncode != 0:
                busy = step
                break
        quiet = 0.0
        while quiet < float(call.get("quiet", 1.0)) and time.monotonic() < deadline:
            before = _cpu_times()
            time.sleep(0.25)
            after = _cpu_times()
            ticks = sum(after) - sum(before)
            idle = (after[3] - before[3]) / ticks if ticks else 1.0
            quiet = quiet + 0.25 if idle > 0.9 and not _has_process("udev-worker") else 0.0
        return {"state": state, "quiet": quiet, "busy": busy, "running": _running_jobs() if busy == "systemd" else []}

    def op_quiesce(self, rid: int, call: dict[str, Any], inbox: frames.Inbox) -> dict[str, Any]:
        """Make the disk consistent before a snapshot.  Caches stay: guest RAM
        is a file each clone maps lazily, so they cost nothing until touched,
        and they spare every clone the disk reads (and their translation).
        ``warm`` directories are read into the cache first: a clone's first
        command then starts without touching the disk."""
        for directory in call.get("warm") or ():
            try:
                entries = list(os.scandir(directory))
            except OSError:  # an image without it
                continue
            for entry in entries:
                try:
                    if not entry.is_file():  # a FIFO would block
                        continue
                    with open(entry.path, "rb") as f:
                        while f.read(1 << 20):
                            pass
                except OSError:  # a dangling link, an unreadable file
                    continue
        os.sync()
        return {}


def _running_jobs() -> list[str]:
    """The units systemd is still starting (what holds a boot up), a few of them."""
    try:
        argv = ["systemctl", "list-jobs", "--no-legend", "--no-pager", "--plain"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.split() for line in out.splitlines()]  # JOB UNIT TYPE STATE
    return [cols[1] for cols in rows if len(cols) >= 4 and cols[3] == "running"][:5]


def _cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def _has_process(comm: str) -> bool:
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if comm in f.read():
                    return True
        except OSError:
            continue
    return False
