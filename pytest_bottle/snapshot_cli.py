"""The ``bottle snapshot`` commands (list, rm, prune) and ``bottle run --snapshot``."""

from __future__ import annotations

import argparse
import sys
import time

from .agent.replies import shell_status
from .arguments import check_days
from .bottle import Bottle
from .errors import ExecTimeout, SnapshotError, SnapshotGone, SpecError, error_line
from .host.paths import tree_size
from .host.runstate import MARKER, run_dir_owner
from .image_cli import column_widths
from .snapshot import resolve_saved_snapshot
from .store import snapshots
from .store.saved import SavedState
from .vmm.accel import qemu_version

# bottle run options that a snapshot decides
_FIXED = ("image", "memory", "cpus", "network", "boot", "accel")


def run_snapshot(args: argparse.Namespace, command: list[str]) -> int:
    """``bottle run --snapshot NAME -- CMD``: CMD in a fresh fork of a saved snapshot."""
    given = [f"--{k}" for k in _FIXED if getattr(args, k, None) is not None]
    given += ["--from"] if getattr(args, "source", None) else []
    if given:
        raise SpecError(f"{', '.join(given)} cannot be given with --snapshot: the snapshot decides", "bottle run")
    snap = resolve_saved_snapshot(args.cache_dir, args.snapshot)
    with snap.start() as b:
        return run_and_print(b, command, args.timeout)


TIMED_OUT = 124  # as coreutils' timeout exits


def run_and_print(b: Bottle, command: list[str], timeout: float | None) -> int:
    """``bottle run``: the command's output, and an exit status as a shell
    gives it (128 + N for a command killed by signal N; 124 timed out)."""
    try:
        r = b.exec(command[0] if len(command) == 1 else command, timeout=timeout)
    except ExecTimeout as e:  # what it printed before the kill still goes out
        sys.stdout.write(e.stdout)
        sys.stdout.flush()
        gap = "" if not e.stderr or e.stderr.endswith("\n") else "\n"
        said = ExecTimeout(e.cmd, e.timeout)  # its message without the output, printed above
        sys.stderr.write(f"{e.stderr}{gap}bottle: ExecTimeout: {said}\n")
        return TIMED_OUT
    sys.stdout.buffer.write(r.stdout_bytes)
    sys.stdout.flush()
    sys.stderr.buffer.write(r.stderr_bytes)
    return shell_status(r.returncode)


def _state_of(s: SavedState) -> str:
    try:
        seed = snapshots.seed_of(s)
    except SnapshotError:
        return "stale"  # its seed is gone or changed under it: it cannot be forked
    if seed.manifest["key_parts"].get("qemu") != qemu_version():
        return "stale"  # made by another QEMU: its state would not load
    if snapshots.is_kept(s):
        return "kept"
    verdict = run_dir_owner(s.path) if (s.path / MARKER).exists() else None
    if verdict and not verdict[0] and verdict[1].startswith("unreadable"):
        return "unknown"  # its owner marker is damaged: only bottle snapshot rm removes it
    return "orphaned" if verdict and verdict[0] else "session"


def cmd_list(args: argparse.Namespace) -> int:
    found = snapshots.list_snapshots(args.cache_dir)
    rows = [
        (s.path.name, _state_of(s), str(s.manifest.get("image_name")), f"{tree_size(s.path) / 1e6:.0f} MB")
        + (f"{(time.time() - s.created) / 3600:.1f}h",)
        for s in found
    ]
    # Columns as wide as their longest entry: saved names run to ~80 characters, derived images past 24.
    header = ("NAME", "STATE", "IMAGE", "SIZE", "AGE")
    widths = column_widths(header, rows)
    for row in (header, *rows):
        left = " ".join(f"{cell:{w}}" for cell, w in zip(row[:3], widths[:3], strict=True))
        print(f"{left} {row[3]:>{widths[3]}} {row[4]:>{widths[4]}}")
    if not found:
        print("(no snapshots)")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    status = 0
    for name in args.names:
        try:
            snapshots.check_name(name)
        except SnapshotError as e:  # the other names are still removed
            print(error_line(e), file=sys.stderr)
            status = 1
            continue
        path = args.cache_dir / "snapshots" / name
        if path.is_dir() and snapshots.remove(path):
            print(f"removed {path}")
        else:
            gone = SnapshotGone(name, "there is no snapshot of that name (see bottle snapshot list)")
            print(error_line(gone), file=sys.stderr)
            status = 1
    return status


def cmd_prune(args: argparse.Namespace) -> int:
    """Kept snapshots older than --older-than days (default: all of them), those
    of dead sessions and those whose seed is gone; a live session's stay."""
    if args.older_than is not None:
        check_days(args.older_than, "bottle snapshot prune")
    limit = time.time() - (args.older_than or 0.0) * 86400
    freed = 0
    count = 0
    for s in snapshots.list_snapshots(args.cache_dir):
        state = _state_of(s)
        if state in ("orphaned", "stale") or (state == "kept" and s.created <= limit):
            size = tree_size(s.path)
            if snapshots.remove(s.path):
                print(f"removed {s.path} ({size / 1e6:.0f} MB): {state}")
                freed += size
                count += 1
    print(f"pruned {count} snapshot(s), freed {freed / 1e6:.0f} MB")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    snap = sub.add_parser("snapshot", help="list or remove snapshots (kept by --bottle-save-failed)")
    cmds = snap.add_subparsers(dest="subcommand", required=True)
    cmds.add_parser("list", help="snapshots in the cache").set_defaults(fn=cmd_list)
    rm = cmds.add_parser("rm", help="remove snapshots by name")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(fn=cmd_rm)
    pr = cmds.add_parser("prune", help="remove kept snapshots (all, or older than DAYS), orphaned and stale ones")
    pr.add_argument("--older-than", type=float, metavar="DAYS", default=None)
    pr.set_defaults(fn=cmd_prune)
