"""Mounts a killed image build leaves, with real builds and real mounts
(issue: leaked build mounts).

As root, mmdebstrap mounts in the host's mount namespace for its hooks (on
this host: a fresh proc, sysfs and devpts, and a bind of the host's
/dev/shm).  SIGKILLed, it leaves them under the cache's build directory;
removing that directory must detach them, and never delete through one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import kill_group, run_isolated, wait_until

from pytest_bottle.host import mounts
from pytest_bottle.host.paths import remove_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="as non-root builds mount in a namespace of their own")

IMAGE = "debian-bookworm-minimal"
BUILD = "import sys; from pathlib import Path; from pytest_bottle.images import ensure_image; "
BUILD += "print(ensure_image(sys.argv[1], Path(sys.argv[2])).path)"
SWEEP = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from pytest_bottle.host.sweep import sweep
    r = sweep([Path(sys.argv[1])])
    print(json.dumps({"paths": r.paths, "skipped": r.skipped}))
""")


def _mounts_under(path: Path) -> list[str]:
    """Mount points below ``path``, read here without the code under test
    (the kernel's octal escapes are what ``unicode_escape`` undoes)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return [p for p in points if p.startswith(f"{path}/")]


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


@pytest.fixture
def unmount_after(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, and whatever stays mounted below it detached when the test ends."""
    yield tmp_path
    for point in sorted(_mounts_under(tmp_path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


@pytest.fixture
def shm_canary() -> Iterator[Path]:
    """A file of ours in the host's /dev/shm, which the build binds into its root."""
    canary = Path(f"/dev/shm/bottle-test-canary-{os.getpid()}")
    canary.write_text("the host's\n")
    yield canary
    canary.unlink(missing_ok=True)


def _builders(cache: Path) -> list[psutil.Process]:
    """Live processes (any name) whose command line names ``cache``."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(cache) in a for a in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _kill_build_once_mounted(cache: Path) -> list[str]:
    """Start a build into ``cache``, SIGKILL its whole process group as soon
    as mmdebstrap has mounted something, and return what stayed mounted."""
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD, IMAGE, str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:

        def mounted() -> list[str]:
            assert proc.poll() is None, proc.communicate()
            return _mounts_under(cache)

        wait_until(mounted, 600, "mmdebstrap mounting in the build root", interval=0.02)
    finally:
        kill_group(proc)
    wait_until(lambda: not _builders(cache), 30, "every process of the killed build gone")
    return _mounts_under(cache)


@pytest.mark.parametrize("cleanup", ["sweep", pytest.param("next-build", marks=pytest.mark.slow)])
def test_a_killed_builds_mounts_are_detached_and_the_next_build_succeeds(
    unmount_after: Path, shm_canary: Path, cleanup: str
) -> None:
    cache = unmount_after / "a cache"  # a space: /proc/self/mountinfo writes it as \040
    left = _kill_build_once_mounted(cache)
    assert left and all("/.tmp-" in p and "/.work/tmp/mmdebstrap." in p for p in left), left
    stale = {p for p in (cache / "images").iterdir() if p.name.startswith(".tmp-")}
    assert len(stale) == 1
    if cleanup == "sweep":
        out = run_isolated(SWEEP, str(cache), env={"BOTTLE_STATE_DIR": str(unmount_after / "state")}).stdout
        report = json.loads(out)
        assert report["paths"] == [str(p) for p in stale] and report["skipped"] == [], report
        assert not _mounts_under(cache) and not any(p.exists() for p in stale)
    built = Path(run_isolated(BUILD, IMAGE, str(cache)).stdout.strip())
    assert (built / "rootfs.ext4").is_file() and (built / "manifest.json").is_file()
    assert not _mounts_under(cache)
    assert [p.name for p in (cache / "images").iterdir()] == [built.name]
    assert shm_canary.read_text() == "the host's\n"  # nothing was deleted through the /dev/shm bind


def test_a_mount_that_cannot_be_detached_is_not_descended_into(unmount_after: Path) -> None:
    """In a user namespace the mounts inherited from the host are locked, so
    detaching fails (EINVAL): the removal must stop at the mount, not delete
    the bound directory's files (a plain rmtree deleted the canary)."""
    outside, tree = unmount_after / "outside", unmount_after / "tree"
    (outside).mkdir()
    (outside / "canary").write_text("keep\n")
    point = tree / "root" / "dev" / "shm"
    point.mkdir(parents=True)
    (tree / "root" / "etc").mkdir()
    (tree / "root" / "etc" / "hostname").write_text("x\n")
    _mount("--bind", str(outside), str(point))
    code = "import sys, json; from pathlib import Path; from pytest_bottle.host.paths import remove_tree; "
    code += "print(json.dumps(remove_tree(Path(sys.argv[1]))))"
    r = subprocess.run(["unshare", "-Urm", sys.executable, "-c", code, str(tree)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (outside / "canary").read_text() == "keep\n"
    assert json.loads(r.stdout) == [str(point)]
    assert not (tree / "root" / "etc").exists()  # what is not under the mount went
    assert remove_tree(tree) == [] and not tree.exists() and not _mounts_under(unmount_after)
    assert (outside / "canary").read_text() == "keep\n"


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "st_dev-and-mountinfo"])
def test_the_walker_stops_at_every_kind_of_mount_point(
    unmount_after: Path, openat2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tmpfs (another st_dev) and a bind of a directory of the same file
    system (same st_dev: ``os.path.ismount`` says no) are both left whole
    by ``remove_within``, which detaches nothing itself."""
    monkeypatch.setattr(mounts, "_openat2_works", None if openat2 else False)
    if not openat2:
        monkeypatch.setattr(mounts, "_openat2_usable", lambda fd: False)
    outside, tree = unmount_after / "outside", unmount_after / "tree with space"
    outside.mkdir()
    (outside / "canary").write_text("keep\n")
    tmpfs, bind = tree / "a" / "tmpfs", tree / "b" / "c" / "bind"
    for d in (tmpfs, bind, tree / "plain" / "deep"):
        d.mkdir(parents=True)
    (tree / "plain" / "deep" / "file").write_text("x\n")
    os.symlink("/dev/shm", tree / "a" / "link")  # a symlink goes, what it points at stays
    _mount("-t", "tmpfs", "bottle-test", str(tmpfs))
    (tmpfs / "inside").write_text("in the tmpfs\n")
    _mount("--bind", str(outside), str(bind))
    assert not os.path.ismount(bind)
    assert sorted(mounts.remove_within(tree)) == sorted([str(tmpfs), str(bind)])
    assert (outside / "canary").read_text() == "keep\n" and (tmpfs / "inside").is_file()
    assert not (tree / "plain").exists() and not (tree / "a" / "link").is_symlink() and Path("/dev/shm").is_dir()
    assert sorted(_mounts_under(tree)) == sorted([str(tmpfs), str(bind)])
