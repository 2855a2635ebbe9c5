"""A host file system that fills up: at a bottle's start, and under a running one.

Each test runs in a mount namespace of its own: a small tmpfs is the cache,
with the warm cache's images, seeds and keys bound into it, so a bottle
restores as usual while its own files (run directory, overlay, console) have
no room.  Nothing stays mounted after the namespace's last process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")

FULL_CACHE = """
set -e
C=$1/c; REAL=$2
mkdir "$C"
mount -t tmpfs -o size="$7",mode=0700 tmpfs "$C"
for d in images seeds keys; do mkdir "$C/$d"; done
for d in $6; do [ ! -d "$REAL/$d" ] || mount --bind "$REAL/$d" "$C/$d"; done
[ ! -e "$REAL/accel.json" ] || cp "$REAL/accel.json" "$C/"
head -c "$4" /dev/zero > "$C/reserve"
cat /dev/zero > "$C/filler" 2>/dev/null || true
rm "$C/reserve"
"$3" -c "$5" "$C"
echo "left in run: [$(ls -A "$C/run" 2>/dev/null | tr '\\n' ' ')]"
echo "left in seeds: [$(ls -A "$C/seeds" | grep -v '[.]lock$' | tr '\\n' ' ')]"
"""

START = """
import sys, pytest_bottle
try:
    with pytest_bottle.launch(cache_dir=sys.argv[1]) as b:
        print("started", b.name)
except pytest_bottle.BottleError as e:
    print("launch:", type(e).__name__, e)
"""

FILL = """
import sys, time, pytest_bottle
with pytest_bottle.launch(cache_dir=sys.argv[1]) as b:
    b.check_output(["true"])
    t = time.monotonic()
    try:
        b.exec("dd if=/dev/urandom of=/big bs=1M count=24 conv=fsync")
    except pytest_bottle.AgentError as e:
        print("exec:", type(e).__name__, e)
    print(f"after {time.monotonic() - t:.1f} s")
    try:
        b.exec("true")
    except pytest_bottle.AgentError as e:
        print("next:", type(e).__name__, e)
print("closed")
"""


def _in_a_full_cache(
    tmp_path: Path, cache: Path, reserve: int, code: str, bound: str = "images seeds keys", size: str = "4m"
) -> str:
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", FULL_CACHE, "sh"]
        + [str(tmp_path), str(cache), sys.executable, str(reserve), code, bound, size],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    ours = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or ())]
    assert ours == [], f"processes left: {ours}\n{out}"
    return out


@needs_root
@pytest.mark.parametrize("reserve", [0, 8192, 40960], ids=["marker", "overlay", "console"])
def test_a_start_on_a_full_file_system_is_a_boot_error_that_leaves_nothing(
    warm_cache: Path, tmp_path: Path, reserve: int
) -> None:
    """It was a bare ``OSError`` (ENOSPC) from wherever the start wrote first, a
    run directory (and an SSH key's) left behind when that was its marker, and
    an overlay's said its seed's disk was the file it could not write."""
    out = _in_a_full_cache(tmp_path, warm_cache, reserve, START)
    full = re.search(r"launch: BootError bottle failed to boot: the host's file system is full \((/[^)]+)\)", out)
    assert full and full.group(1).startswith(f"{tmp_path}/c/run/"), out  # the file that found no room
    assert "No space left on device; nothing was started" in out and "/seeds/" not in out, out
    assert "left in run: []" in out and "Traceback" not in out, out


EVERY_ROOM = """
import pathlib, subprocess, sys, pytest_bottle
c = pathlib.Path(sys.argv[1])
started = 0
for reserve in range(0, 512 << 10, 4 << 10):  # a page more each time: each write of a start in turn
    if started == 3:
        break
    (c / "filler").unlink()
    (c / "reserve").write_bytes(bytes(reserve))
    subprocess.run(["sh", "-c", "cat /dev/zero > filler 2>/dev/null"], cwd=c)
    (c / "reserve").unlink()
    try:
        with pytest_bottle.launch(cache_dir=c) as b:
            print(reserve, "started", b.exec("true").returncode)
            started += 1
    except pytest_bottle.BootError as e:
        print(reserve, "full" if "the host's file system is full (" in e.reason else "other", e.reason)
    except Exception as e:
        print(reserve, "other", type(e).__name__, e)
    print(reserve, "left:", sorted(p.name for p in (c / "run").iterdir()))
"""


@needs_root
def test_a_start_meets_a_full_file_system_at_every_write_and_names_it(warm_cache: Path, tmp_path: Path) -> None:
    """Each write of a start in turn finds no room (4 KiB more each time, until it
    starts): every one is the named ``BootError``. Some were a bare ``OSError``
    (writes name no file), a ``BootError`` that blamed the kernel it read (the
    boot header's copy), a ``BottleError`` from ssh-keygen; and an SSH key's run
    directory was left until its thread ended."""
    out = _in_a_full_cache(tmp_path, warm_cache, 0, EVERY_ROOM)
    results = [line.split(" ", 2) for line in out.splitlines() if re.match(r"[0-9]+ (started|full|other)", line)]
    assert not [r for r in results if r[1] == "other"] and "(under " not in out, out  # each names its file
    # It spans a start: full at first, then started three times. What a start writes varies by a
    # page (the console's lines), so one near the edge may still find no room after one that did.
    kinds = [r[1] for r in results]
    assert kinds[0] == "full" and kinds.count("started") == 3 and kinds[-1] == "started", out
    assert all(line.endswith("left: []") for line in out.splitlines() if " left: " in line), out


@needs_root
def test_a_guest_that_fills_the_host_file_system_ends_its_bottle_at_once_with_why(
    warm_cache: Path, tmp_path: Path
) -> None:
    """QEMU stops a VM whose disk write finds no room (``werror=enospc``), and
    every call waited 32 s for an agent that could not answer, then said it was
    "hung or gone"."""
    out = _in_a_full_cache(tmp_path, warm_cache, 1536 << 10, FILL)
    full = "could not be written (the host's file system under it is full: No space left on device)"
    assert "exec: AgentError bottle btl-" in out and f"QEMU stopped the VM: its disk {tmp_path}/c/run/" in out, out
    assert f"{full} during exec\n" in out, out
    assert "next: AgentError agent channel of btl-" in out and "is closed: QEMU stopped the VM" in out, out
    assert "has not answered" not in out and "closed\nleft in run: []" in out, out


@needs_root
def test_a_seed_whose_memory_file_finds_no_room_says_so(warm_cache: Path, tmp_path: Path) -> None:
    """A seed's guest RAM is written through to a file in the cache: on a full
    file system QEMU dies of SIGBUS, and the error said only "QEMU exited with -7"."""
    out = _in_a_full_cache(tmp_path, warm_cache, 24 << 20, START, bound="images keys", size="48m")
    assert "launch: BootError bottle seed failed to boot: QEMU exited with -7 (SIGBUS: its guest RAM is the file" in out
    assert re.search(r"and the host's file system under it is full: [0-9]+ MiB free, for a machine of 512 MiB\)", out)
    assert "left in run: []" in out and "left in seeds: []" in out, out


SNAPSHOT = """
import sys, pathlib, pytest_bottle
with pytest_bottle.launch(cache_dir=sys.argv[1]) as b:
    b.check_output(["true"])
    try:
        print("snapshot:", b.snapshot())
    except pytest_bottle.BottleError as e:
        print("snapshot:", type(e).__name__, e)
    print("then:", b.check_output(["echo", "alive"]).strip())
    print("entries:", sorted(p.name for p in pathlib.Path(sys.argv[1], "snapshots").iterdir()))
"""


@needs_root
def test_a_snapshot_that_finds_no_room_says_so_and_its_bottle_runs_on(warm_cache: Path, tmp_path: Path) -> None:
    """The state streamed to the cache found no room, and the error said only
    "sending the VM state failed (failed): " (QEMU's ``exec:cat`` says no more)."""
    out = _in_a_full_cache(tmp_path, warm_cache, 2 << 20, SNAPSHOT)
    assert "snapshot: SnapshotError snapshot btl-" in out and "sending the VM state failed (failed)" in out, out
    assert re.search(rf"the host's file system under {tmp_path}/c/snapshots/\S+ is full \([0-9]+ KiB free\)", out), out
    assert "then: alive" in out and "entries: []" in out, out


GET_INTO = """
import sys, pathlib, pytest_bottle
c = pathlib.Path(sys.argv[1])
with pytest_bottle.launch(cache_dir=c) as b:  # the source on the guest's tmpfs: its disk stays as it is
    b.exec("mkdir -p /dev/shm/d/sub && echo hi > /dev/shm/d/a && head -c 4M /dev/zero > /dev/shm/d/sub/big", check=True)
    for src, dst in (("/dev/shm/d", c / "dir"), ("/dev/shm/d/sub/big", c / "file")):
        try:
            b.get(src, dst)
            print("get:", src, "copied")
        except Exception as e:
            print("get:", src, type(e).__name__, getattr(e, "errno", None), getattr(e, "filename", None))
    print("then:", b.check_output(["echo", "alive"]).strip())
    print("parts:", sorted(p.name for p in c.rglob("*bottle-part*")))
"""


@needs_root
def test_a_get_into_a_full_host_directory_is_the_hosts_oserror(warm_cache: Path, tmp_path: Path) -> None:
    """A file's get() said ``OSError`` (ENOSPC) naming the file; a directory's
    said the guest's archive was unsafe: ``UnsafeTransfer`` "could not be written"."""
    out = _in_a_full_cache(tmp_path, warm_cache, 1536 << 10, GET_INTO)
    assert f"get: /dev/shm/d OSError 28 {tmp_path}/c/dir/sub/big\n" in out, out
    assert f"get: /dev/shm/d/sub/big OSError 28 {tmp_path}/c/file\n" in out, out
    assert "then: alive" in out and "parts: []" in out and "UnsafeTransfer" not in out, out
