"""Mounts a killed image build leaves, with real builds and real mounts
(issue: leaked build mounts).

As root, mmdebstrap mounts for its hooks (on this host: a fresh proc, sysfs
and devpts, and a bind of the host's /dev/shm).  It runs in a mount namespace
of its own, so SIGKILLed it leaves none of them in the host's: an `rm -rf` of
the cache cannot delete the host's /dev/shm through one.  Mounts that are
there all the same (an older version's build) are detached by whatever removes
a build directory, which never deletes through one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import group_members, kill_group, run_isolated, wait_until

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


def _mounts_under(path: Path, pid: int | str = "self") -> list[str]:
    """Mount points below ``path`` in the mount namespace of ``pid``, read here
    without the code under test: lines end at \\n only (a \\r in a name is
    kept), fields at a space."""
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        fields = [line.split(b" ")[4] for line in f.read().split(b"\n") if line]
    points = [os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), p)) for p in fields]
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
    for p in psutil.process_iter(["cmdline", "status", "name"]):  # names read now: a process may end at once
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(cache) in a for a in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _kill_build_once_mounted(cache: Path) -> tuple[list[str], list[str]]:
    """Start a build into ``cache``, SIGKILL the process that runs it (only that
    one) once mmdebstrap has mounted its root and installs packages, and return
    what mmdebstrap had mounted then (in its namespace) and what stayed mounted
    here.  Everything the build started dies with it, at once."""
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD, IMAGE, str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:

        def started() -> int:
            assert proc.poll() is None, proc.communicate()
            try:  # mounted, in its namespace (it may also have ended meanwhile)
                builders = [
                    b for b in _builders(cache) if b.info["name"] == "mmdebstrap" and _mounts_under(cache, b.pid)
                ]
            except OSError:
                builders = []
            # mmdebstrap leads its own group.  dpkg: it and the packages' scripts write nothing
            # to mmdebstrap's pipe for seconds, so only a kill stops them (apt's downloads
            # die on the broken pipe).
            group = group_members(builders[0].pid) if builders else []
            return builders[0].pid if any(p.info["name"] == "dpkg" for p in group) else 0

        group = wait_until(started, 600, "mmdebstrap installing packages with dpkg", interval=0.02)
        theirs = _mounts_under(cache, group)
        os.kill(proc.pid, signal.SIGKILL)  # as a kill -9 of pytest: not its process group
        wait_until(
            lambda: not group_members(group) and not _builders(cache), 5, "every process of the killed build gone"
        )
    finally:
        kill_group(proc)
    return theirs, _mounts_under(cache)


@pytest.mark.parametrize("cleanup", ["sweep", pytest.param("next-build", marks=pytest.mark.slow)])
def test_a_killed_builds_mounts_are_detached(unmount_after: Path, shm_canary: Path, cleanup: str) -> None:
    """The sweep (default run) or the next build (slow: a whole build) removes
    what a killed build left, mounts and all, through neither of them."""
    cache = unmount_after / "a cache"  # a space: /proc/self/mountinfo writes it as \040
    theirs, left = _kill_build_once_mounted(cache)
    assert theirs and all("/.tmp-" in p and "/.work/tmp/mmdebstrap." in p for p in theirs), theirs
    assert any(p.endswith("/dev/shm") for p in theirs), theirs
    assert left == [], left  # they were in the build's mount namespace, gone with it
    stale = {p for p in (cache / "images").iterdir() if p.name.startswith(".tmp-")}
    assert len(stale) == 1
    if cleanup == "sweep":
        out = run_isolated(SWEEP, str(cache), env={"BOTTLE_STATE_DIR": str(unmount_after / "state")}).stdout
        report = json.loads(out)
        assert report["paths"] == [str(p) for p in stale] and report["skipped"] == [], report
        assert not any(p.exists() for p in stale)
    else:
        built = Path(run_isolated(BUILD, IMAGE, str(cache)).stdout.strip())
        assert (built / "rootfs.ext4").is_file() and (built / "manifest.json").is_file()
        assert [p.name for p in (cache / "images").iterdir()] == [built.name]
    assert not _mounts_under(cache)
    assert shm_canary.read_text() == "the host's\n"  # nothing was deleted through the /dev/shm bind


def _user_namespaces() -> bool:
    return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


def test_a_mount_that_cannot_be_detached_is_not_descended_into(unmount_after: Path) -> None:
    """In a user namespace the mounts inherited from the host are locked, so
    detaching fails (EINVAL): the removal must stop at the mount, not delete
    the bound directory's files (a plain rmtree deleted the canary)."""
    if not _user_namespaces():
        pytest.skip("user namespaces are disabled here (unshare -Urm fails)")
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


@pytest.fixture(params=["openat2", "mount-id"])
def walker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The walker's way to see a mount point: openat2's RESOLVE_NO_XDEV, or
    (where openat2 is missing) the mount ids of parent and child.  Gives the
    list of openat2 calls made, to check the first way was really taken."""
    calls: list[int] = []
    if request.param == "openat2":
        monkeypatch.setattr(mounts, "_openat2_works", None)
        real = mounts._openat2

        def counted(fd: int, name: str, flags: int, resolve: int) -> int:
            calls.append(resolve)
            return real(fd, name, flags, resolve)

        monkeypatch.setattr(mounts, "_openat2", counted)
        if not _openat2_here():
            pytest.skip("openat2 is not available here (old kernel or a seccomp filter)")
    else:
        monkeypatch.setattr(mounts, "_openat2_works", False)
        monkeypatch.setattr(mounts, "_openat2_usable", lambda fd: False)
        monkeypatch.setattr(mounts, "_openat2", None)  # any call would fail the test
    return calls


def _openat2_here() -> bool:
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return mounts._openat2_usable(fd)
    finally:
        os.close(fd)


def _check_openat2_used(walker: list[int], request: pytest.FixtureRequest) -> None:
    if request.node.callspec.params["walker"] == "openat2":
        assert walker and all(r & mounts.RESOLVE_NO_SYMLINKS for r in walker), walker


def test_the_walker_stops_at_every_kind_of_mount_point(
    unmount_after: Path, walker: list[int], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tmpfs (another st_dev) and a bind of a directory of the same file
    system (same st_dev: ``os.path.ismount`` says no), the latter at a name
    with a \r (which ended the line for splitlines()) and missing from the
    mount table read before the walk (as a mount made meanwhile is), are
    both left whole by ``remove_within``, which detaches nothing itself."""
    outside, tree = unmount_after / "outside", unmount_after / "tree with space"
    outside.mkdir()
    (outside / "canary").write_text("keep\n")
    tmpfs, bind = tree / "a" / "tmpfs", tree / "b" / "c" / "bi\rnd"
    for d in (tmpfs, bind, tree / "plain" / "deep"):
        d.mkdir(parents=True)
    (tree / "plain" / "deep" / "file").write_text("x\n")
    os.symlink("/dev/shm", tree / "a" / "link")  # a symlink goes, what it points at stays
    _mount("-t", "tmpfs", "bottle-test", str(tmpfs))
    (tmpfs / "inside").write_text("in the tmpfs\n")
    _mount("--bind", str(outside), str(bind))
    assert not os.path.ismount(bind)
    monkeypatch.setattr(mounts, "mounts_under", lambda path: [])
    assert sorted(mounts.remove_within(tree)) == sorted([str(tmpfs), str(bind)])
    assert (outside / "canary").read_text() == "keep\n" and (tmpfs / "inside").is_file()
    assert not (tree / "plain").exists() and not (tree / "a" / "link").is_symlink() and Path("/dev/shm").is_dir()
    assert sorted(_mounts_under(tree)) == sorted([str(tmpfs), str(bind)])
    _check_openat2_used(walker, request)


def test_a_tree_that_is_itself_a_mount_point_is_not_entered(
    unmount_after: Path, walker: list[int], request: pytest.FixtureRequest
) -> None:
    """A bind of an outside directory onto the tree itself: nothing in it is
    deleted (the walk opened the tree and landed on the top mount), and the
    tree is named as left behind."""
    outside, tree = unmount_after / "outside", unmount_after / "tree"
    for d in (outside, tree):
        d.mkdir()
    (outside / "canary").write_text("keep\n")
    _mount("--bind", str(outside), str(tree))
    assert remove_tree(tree) == [str(tree)]
    assert (outside / "canary").read_text() == "keep\n" and (tree / "canary").is_file()
    _check_openat2_used(walker, request)


def test_a_mount_at_a_name_with_a_carriage_return_is_detached(unmount_after: Path) -> None:
    """The kernel escapes only space, tab, newline and backslash: a \r (or a
    \x0b, \x1c, U+2028...) stays raw in its mountinfo line."""
    outside, tree = unmount_after / "outside", unmount_after / "tree"
    outside.mkdir()
    (outside / "canary").write_text("keep\n")
    odd = tree / "a\rb\x0bc\x1cd\u2028e"
    odd.mkdir(parents=True)
    _mount("--bind", str(outside), str(odd))
    assert _mounts_under(tree) == [str(odd)]
    assert mounts.mounts_under(tree) == [str(odd)]
    assert remove_tree(tree) == [] and not tree.exists() and not _mounts_under(unmount_after)
    assert (outside / "canary").read_text() == "keep\n"


def test_mounts_hidden_under_other_mounts_are_all_detached(unmount_after: Path) -> None:
    """Three mounts each hiding the one below it (c under b under a): a
    detach by path reaches a hidden one only once those above went, so the
    detaching goes on while it frees some (one retry left b and c)."""
    tree = unmount_after / "tree"
    c = tree / "a" / "b" / "c"
    c.mkdir(parents=True)
    for point in (c, c.parent, c.parent.parent):
        _mount("-t", "tmpfs", "bottle-test", str(point))
    assert len(_mounts_under(tree)) == 3
    assert remove_tree(tree) == [] and not tree.exists() and not _mounts_under(unmount_after)


def test_a_symlink_on_the_way_to_a_mount_point_is_not_followed(unmount_after: Path) -> None:
    """The mount listed at tree/a/m, and tree/a then a symlink to a
    directory with a mount of its own at m: the detach must not reach it
    (UMOUNT_NOFOLLOW guards only the last component)."""
    if not _openat2_here():
        pytest.skip("without openat2 a detach by path follows symlinks before the last component")
    tree, elsewhere = unmount_after / "tree", unmount_after / "elsewhere"
    (tree / "a").mkdir(parents=True)
    (elsewhere / "m").mkdir(parents=True)
    _mount("-t", "tmpfs", "bottle-test", str(elsewhere / "m"))
    (tree / "a").rmdir()
    (tree / "a").symlink_to(elsewhere)
    root = os.open(tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        assert mounts.detach(root, "a/m", str(tree / "a" / "m")) == errno.ELOOP
    finally:
        os.close(root)
    assert _mounts_under(elsewhere) == [str(elsewhere / "m")]


def test_a_tree_deeper_than_the_recursion_limit_is_removed(tmp_path: Path) -> None:
    """1200 levels: a recursive walk raised RecursionError out of remove_tree."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("deep", dir_fd=fd)
    for _ in range(1200):
        child = os.open("deep" if _ == 0 else "d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
        os.mkdir("d", dir_fd=fd)
    with open("f", "w", opener=lambda name, flags: os.open(name, flags, dir_fd=fd)) as f:
        f.write("x\n")
    os.close(fd)
    try:
        assert remove_tree(tmp_path / "deep") == [] and not (tmp_path / "deep").exists()
    finally:  # left there, it would crash pytest's own (recursive) cleanup of old tmp dirs
        subprocess.run(["rm", "-rf", str(tmp_path / "deep")], check=True)
