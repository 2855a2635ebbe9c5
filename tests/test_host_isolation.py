"""Other users on the same host (issue 11): real second uids, real locks, real processes.

Another uid is reached with ``setpriv --reuid``: 65534 (``nobody``) and
64999, a uid without an account (the kernel needs none).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from filelock import FileLock
from harness import close_pipes

import pytest_bottle
from pytest_bottle.errors import UnsafeDirectory
from pytest_bottle.host.paths import default_cache_dir, remove_tree, state_dir
from pytest_bottle.host.runstate import RunRecord
from pytest_bottle.host.sweep import sweep
from pytest_bottle.vmm import forks, process

# BOTTLE_STATE_DIR is set for the whole process here: no spare may be starting.
pytestmark = pytest.mark.usefixtures("no_spare_starting")

NOBODY = 65534
OTHER = 64999
CACHE = default_cache_dir()

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")


def as_uid(uid: int, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``uid`` with exactly ``env`` (no XDG_RUNTIME_DIR unless given)."""
    base = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    if "PYTHONPATH" in os.environ:
        base["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def start_as(uid: int, argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv])


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def chown_tree(path: Path, uid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.lchown(p, uid, uid)


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory of ``nobody`` that other uids cannot enter (a user's home)."""
    d = Path(tempfile.mkdtemp(prefix="bottle-iso-", dir="/tmp"))
    os.chown(d, NOBODY, NOBODY)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    close_pipes(proc)


TRIVIAL = "def test_nothing():\n    pass\n"


def _pytest_as(uid: int, home: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (home / "test_trivial.py").write_text(TRIVIAL)
    os.chown(home / "test_trivial.py", uid, uid)
    argv = [sys.executable, "-m", "pytest", "test_trivial.py", "-p", "no:cacheprovider", "-q"]
    return as_uid(uid, argv, env, cwd=home)


# --- 6. a state dir planted by another user -----------------------------------------------------------------------

PLANT = textwrap.dedent("""
    import os, sys
    root, record, target = sys.argv[1:]
    for d in (root, root + "/vms"):
        os.mkdir(d)
        os.chmod(d, 0o777)
    with open(root + "/vms/btl-planted.json", "w") as f:
        f.write(record)
    os.symlink(target, root + "/leases.tmp")
    os.symlink(target, root + "/vms/btl-planted.tmp")
""")


@pytest.fixture
def victim_fallback() -> Iterator[Path]:
    """``nobody``'s state dir when XDG_RUNTIME_DIR is unset: a fixed name in /tmp."""
    path = Path(f"/tmp/pytest-bottle-{NOBODY}")
    with FileLock(f"/tmp/.pytest-bottle-{NOBODY}-test.lock"):  # one fixed name: one test at a time (xdist)
        remove_tree(path)
        yield path
        remove_tree(path)


def _plant_victim_state(home: Path, planted: Path) -> tuple[Path, Path, subprocess.Popen[bytes]]:
    """Another uid plants ``planted`` as a state dir with a record naming a
    directory and a process of the victim (``nobody``), and symlinks at the
    names a victim's write would use.  Returns (victim dir, victim file, process)."""
    victim_vm = home / "precious"  # a directory of the victim that the planted record names
    victim_vm.mkdir()
    notes = home / "notes.txt"  # a file of the victim that a planted symlink points at
    notes.write_text("mine\n")
    chown_tree(home, NOBODY)
    sleeper = start_as(NOBODY, ["sleep", "300"])  # a process of the victim, named as the planted VM's QEMU
    time.sleep(0.2)
    record = {
        "name": "btl-planted",
        "owner_pid": dead_pid(),
        "owner_start": None,
        "run_dir": str(victim_vm),
        "qemu_pid": sleeper.pid,
        "qemu_start": process.start_time(sleeper.pid),
    }
    r = as_uid(OTHER, [sys.executable, "-c", PLANT, str(planted), json.dumps(record), str(notes)], {})
    assert r.returncode == 0, r.stderr
    return victim_vm, notes, sleeper


def _victim_run(entry: str, home: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if entry == "cli":
        return as_uid(NOBODY, [sys.executable, "-m", "pytest_bottle.cli", "sweep"], env)
    return _pytest_as(NOBODY, home, env)


@needs_root
@pytest.mark.parametrize("entry", ["cli", "pytest"])
def test_tmp_fallback_planted_by_another_user_is_left_for_home(home: Path, victim_fallback: Path, entry: str) -> None:
    """Without XDG_RUNTIME_DIR, another user's /tmp/pytest-bottle-UID neither
    stops the victim's runs nor steers them: they use a dir in the victim's home."""
    victim_vm, notes, sleeper = _plant_victim_state(home, victim_fallback)
    try:
        env = {"XDG_CACHE_HOME": str(home / "cache"), "HOME": str(home)}
        r = _victim_run(entry, home, env)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert "INTERNALERROR" not in out, out
        own = home / ".local" / "state" / "pytest-bottle"
        st = own.lstat()
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o700
        assert (own / "vms").is_dir(), "the victim's run did not use the state dir in its home"
        assert sleeper.poll() is None, "the victim's process was killed"
        assert victim_vm.is_dir(), "the victim's directory was removed"
        assert notes.read_text() == "mine\n", "a planted symlink redirected the victim's write"
        assert {p.name for p in victim_fallback.rglob("*")} == {
            "vms",
            "btl-planted.json",
            "leases.tmp",
            "btl-planted.tmp",
        }
    finally:
        _kill(sleeper)


@needs_root
@pytest.mark.parametrize("entry", ["cli", "pytest"])
def test_state_dir_the_user_named_is_refused_when_planted(home: Path, entry: str) -> None:
    """A state dir the user chose (XDG_RUNTIME_DIR here) is never silently
    replaced: refused loudly, as a usage error under pytest, not a traceback."""
    runtime = Path(tempfile.mkdtemp(prefix="bottle-iso-rt-", dir="/tmp"))
    os.chown(runtime, NOBODY, NOBODY)
    runtime.chmod(0o1777)  # sticky and open, so OTHER can plant the name in it first
    planted = runtime / "pytest-bottle"
    victim_vm, notes, sleeper = _plant_victim_state(home, planted)
    try:
        env = {"XDG_CACHE_HOME": str(home / "cache"), "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
        r = _victim_run(entry, home, env)
        out = r.stdout + r.stderr
        assert r.returncode == 4 if entry == "pytest" else r.returncode != 0, out
        assert f"refusing to use {planted}: it belongs to uid {OTHER}" in out and "XDG_RUNTIME_DIR" in out, out
        assert "INTERNALERROR" not in out, out
        assert not (home / ".local").exists(), "fell back silently from a state dir the user chose"
        assert sleeper.poll() is None and victim_vm.is_dir() and notes.read_text() == "mine\n"
    finally:
        _kill(sleeper)
        remove_tree(runtime)


@needs_root
def test_tmp_fallback_without_a_usable_home_is_a_clear_error(victim_fallback: Path) -> None:
    r = as_uid(OTHER, [sys.executable, "-c", f"import os; os.mkdir({str(victim_fallback)!r}, 0o700)"], {})
    assert r.returncode == 0, r.stderr
    code = "from pytest_bottle.host.paths import state_dir; state_dir()"
    r = as_uid(NOBODY, [sys.executable, "-c", code], {"HOME": "/nonexistent"})
    assert r.returncode != 0 and "UnsafeDirectory: refusing to use /nonexistent/.local/state/pytest-bottle" in r.stderr
    assert f"{victim_fallback} belongs to uid {OTHER}" in r.stderr, r.stderr


@needs_root
def test_tmp_fallback_warns_once(home: Path, victim_fallback: Path) -> None:
    r = as_uid(OTHER, [sys.executable, "-c", f"import os; os.mkdir({str(victim_fallback)!r}, 0o700)"], {})
    assert r.returncode == 0, r.stderr
    code = "import logging; logging.basicConfig(); from pytest_bottle.host.paths import state_dir; " + (
        "print({state_dir() for _ in range(3)})"
    )
    r = as_uid(NOBODY, [sys.executable, "-c", code], {"HOME": str(home)})
    own = home / ".local" / "state" / "pytest-bottle"
    assert r.returncode == 0 and r.stdout == f"{{PosixPath('{own}')}}\n", r.stdout + r.stderr
    assert r.stderr.count(f"{victim_fallback} belongs to uid {OTHER}, not to us: using {own}") == 1, r.stderr


@needs_root
def test_state_dir_under_another_users_symlink_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a sticky dir anyone may plant a symlink; one of another uid above the
    state dir is refused even when it points at a directory of root."""
    from pytest_bottle.errors import UnsafeDirectory

    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = Path(tempfile.mkdtemp(prefix="bottle-iso-link-", dir="/tmp"))
    link.rmdir()
    link.symlink_to(target)
    os.lchown(link, OTHER, OTHER)
    try:
        monkeypatch.setenv("BOTTLE_STATE_DIR", str(link / "state"))
        with pytest.raises(UnsafeDirectory, match=f"the directory above it, {link}, belongs to uid {OTHER}"):
            state_dir()
        assert not (target / "state").exists()
        os.lchown(link, 0, 0)  # root's own link (like /var/run): followed, and its target checked
        assert state_dir() == link / "state" and (target / "state").is_dir()
        target.chmod(0o777)
        with pytest.raises(UnsafeDirectory, match=f"{target}, is writable by everyone"):
            state_dir()
    finally:
        link.unlink()


@needs_root
def test_state_dir_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_bottle.errors import UnsafeDirectory

    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    cases: dict[str, tuple[Path, str]] = {}
    link = tmp_path / "link"
    link.symlink_to(own)
    cases["symlink"] = (link, "it is a symlink")
    wide = tmp_path / "wide"
    wide.mkdir()
    wide.chmod(0o755)
    cases["mode"] = (wide, "its mode 0755 lets other users in")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER, OTHER)
    cases["owner"] = (theirs, f"it belongs to uid {OTHER}")
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    cases["ancestor"] = (open_parent / "state", "is writable by everyone")
    for why, (path, reason) in cases.items():
        monkeypatch.setenv("BOTTLE_STATE_DIR", str(path))
        with pytest.raises(UnsafeDirectory) as info:
            state_dir()
        assert reason in str(info.value) and info.value.path == str(path), why
    # Missing: created 0700 whatever the umask.
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "new" / "state"))
    old = os.umask(0)
    try:
        made = state_dir()
    finally:
        os.umask(old)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


def test_relative_xdg_directories_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As the XDG spec says: a relative one would name another cache after a chdir.
    from pytest_bottle.host.paths import default_cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relcache")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pytest-bottle"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "abs"))
    assert default_cache_dir() == tmp_path / "abs" / "pytest-bottle"
    # Runs started in other directories would lease from other pools: refused, nothing made.
    monkeypatch.setenv("BOTTLE_STATE_DIR", "relstate")
    with pytest.raises(
        UnsafeDirectory, match="^refusing to use relstate: it is a relative path; set BOTTLE_STATE_DIR to an absolute"
    ):
        state_dir()
    assert not (tmp_path / "relstate").exists()


@needs_root
def test_cache_root_checks(tmp_path: Path) -> None:
    from pytest_bottle.errors import UnsafeDirectory
    from pytest_bottle.host.paths import cache_root

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "images").mkdir()
    (legacy / "accel.json").write_text("{}")
    (legacy / ".accel.json.4242.abcd1234.tmp").write_text("{")  # a killed writer's: the sweep's to remove
    legacy.chmod(0o755)  # what older versions made: fixed, not refused
    assert cache_root(legacy) == legacy and stat.S_IMODE(legacy.stat().st_mode) == 0o700
    # A directory of other things (/dev, a home) given by mistake: its mode was
    # set to 0700 too, and the cache's entries made in it.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (other / "images").mkdir()
    other.chmod(0o755)
    with pytest.raises(UnsafeDirectory, match=r"lets other users in \(want 0700\), and it holds what no cache does "):
        cache_root(other)
    assert stat.S_IMODE(other.stat().st_mode) == 0o755 and sorted(os.listdir(other)) == ["images", "notes.txt"]
    moved = tmp_path / "link"
    moved.symlink_to(legacy)  # a cache moved to another disk
    assert cache_root(moved) == moved
    writable = tmp_path / "writable"
    writable.mkdir()
    writable.chmod(0o777)
    with pytest.raises(UnsafeDirectory, match="0777"):
        cache_root(writable)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, OTHER, OTHER)
    with pytest.raises(UnsafeDirectory, match=f"uid {OTHER}"):
        cache_root(theirs)
    # A link of another user's to a directory of ours: they could point it
    # anywhere later, and the mode fix would follow it (a root 0755 dir made 0700).
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    planted = tmp_path / "planted"
    planted.symlink_to(target)
    os.lchown(planted, OTHER, OTHER)
    with pytest.raises(UnsafeDirectory, match=f"it is a symlink that belongs to uid {OTHER}"):
        cache_root(planted)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


READ_ONLY_CACHE = """
set -e
mount -t tmpfs -o size=1m,mode=0700 tmpfs "$1" && mkdir -m "$4" "$1/c" && mount -o remount,ro "$1"
"$2" -c 'import sys
import pytest_bottle
try:
    pytest_bottle.launch(cache_dir=sys.argv[1])
except pytest_bottle.BottleError as e:
    print("launch:", type(e).__name__, e)' "$1/c"
"$3" image build debian-bookworm --cache-dir "$1/c" 2>&1 || echo "build exit $?"
"$3" run --cache-dir "$1/c" -- true 2>&1 || echo "run exit $?"
"$3" image list --cache-dir "$1/c" >/dev/null && echo "list ok" || echo "list exit $?"
"""


@needs_root
@pytest.mark.parametrize("mode", ["0700", "0755"])
def test_a_cache_on_a_read_only_file_system_is_refused_by_name(tmp_path: Path, mode: str) -> None:
    """One there already (0700, ours) was taken, and its first lock raised a bare
    ``OSError`` (EROFS): a traceback from the CLI, exit 1 from ``bottle run``;
    one others may read (0755) was a bare ``OSError`` from making it 0700.
    Listing a 0700 one still works. In a mount namespace of its own: nothing stays mounted."""
    (tmp_path / "ro").mkdir()
    cli = str(Path(sys.executable).with_name("bottle"))
    r = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            READ_ONLY_CACHE,
            "sh",
            str(tmp_path / "ro"),
            sys.executable,
            cli,
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = r.stdout + r.stderr
    why = (
        "it is on a read-only file system"
        if mode == "0700"
        else "its mode 0755 lets other users in (want 0700), and it cannot be changed (Read-only file system)"
    )
    refused = f"refusing to use {tmp_path}/ro/c: {why}"
    assert r.returncode == 0 and f"launch: UnsafeDirectory {refused}" in out, out
    assert f"bottle: UnsafeDirectory: {refused}" in out and "build exit 1" in out, out
    listed = "list ok" if mode == "0700" else "list exit 1"
    assert "run exit 125" in out and listed in out and "Traceback" not in out, out


@pytest.fixture
def theirs_later(tmp_path: Path) -> Path:
    """A name in a sticky shared directory (like /tmp) that another user can
    take at any moment: missing when the cache is asked for."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared / "ci"


@needs_root
def test_a_missing_directory_above_made_by_someone_else_meanwhile_is_refused(
    theirs_later: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first look skips what is not there yet; another user may make it
    (in a sticky /tmp) before our mkdir, and own what we then make in it."""
    from pytest_bottle.errors import UnsafeDirectory
    from pytest_bottle.host import paths

    theirs = theirs_later
    first_look, looks = paths._check_ancestors, []

    def then_they_make_it(path: Path, hint: str) -> None:
        first_look(path, hint)
        looks.append(path)
        if len(looks) == 1:  # between our look and our mkdir
            theirs.mkdir(mode=0o777)
            os.chown(theirs, OTHER, OTHER)

    monkeypatch.setattr(paths, "_check_ancestors", then_they_make_it)
    with pytest.raises(UnsafeDirectory, match=f"{theirs}"):
        paths.cache_root(theirs / "pytest-bottle")
    assert len(looks) == 1  # the second look refused it
    assert not (theirs / "pytest-bottle").exists()  # before anything of ours went in


@needs_root
def test_a_directory_above_made_by_someone_else_just_before_our_mkdir_is_refused(
    theirs_later: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several levels missing: the first one is taken between our look and our
    mkdir (which then finds it there); nothing of ours may go into it."""
    from pytest_bottle.errors import UnsafeDirectory
    from pytest_bottle.host import paths

    theirs = theirs_later
    real_mkdir = os.mkdir

    def beaten_to_it(path: str | os.PathLike[str], mode: int = 0o777, **kw: object) -> None:
        if Path(path) == theirs and not theirs.exists():
            real_mkdir(theirs, 0o777)
            os.chown(theirs, OTHER, OTHER)
        real_mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", beaten_to_it)
    with pytest.raises(UnsafeDirectory, match=f"{theirs} above it was made by uid {OTHER} meanwhile"):
        paths.cache_root(theirs / "deeper" / "pytest-bottle")
    monkeypatch.undo()
    assert list(theirs.iterdir()) == []


@needs_root
def test_a_group_writable_directory_above_is_refused_unless_the_group_is_ours_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever may write in a directory may rename what is in it: Debian's
    /var/local is root:staff 2775, so anyone in staff could swap a cache or
    state dir there for one of theirs (and plant records the sweep acts on)."""
    from pytest_bottle.errors import UnsafeDirectory
    from pytest_bottle.host.paths import cache_root, group_others, state_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, 0, OTHER)  # a group this user is not in (nor has as its own)
    shared.chmod(0o2775)
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(shared / "state"))
    with pytest.raises(UnsafeDirectory, match=f"{shared}, is writable by group .*{OTHER}"):
        cache_root(shared / "cache")
    with pytest.raises(UnsafeDirectory, match=f"{shared}, is writable by group .*{OTHER}"):
        state_dir()
    assert not (shared / "cache").exists() and not (shared / "state").exists()
    shared.chmod(0o3775)  # sticky: only an entry's owner may rename it
    assert cache_root(shared / "cache") == shared / "cache"
    group_others.cache_clear()  # what this host's database said before
    own = tmp_path / "own"
    own.mkdir()
    os.chown(own, os.geteuid(), os.getegid())
    own.chmod(0o775)  # the user's own group, nobody else in it (a user private group)
    monkeypatch.setattr(pwd, "getpwall", lambda: [pwd.getpwuid(os.geteuid())])  # whatever this host's users
    monkeypatch.setattr(grp, "getgrgid", lambda gid: grp.struct_group(("mine", "x", gid, [])))
    group_others.cache_clear()
    try:
        assert cache_root(own / "cache") == own / "cache"
    finally:
        group_others.cache_clear()


# --- 2. bounded lock waits ----------------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(300)
""")
WAIT = textwrap.dedent("""
    import sys, time
    from pytest_bottle.net import pools
    pools.LOCK_TIMEOUT = float(sys.argv[1])
    t = time.monotonic()
    try:
        pools.lease("mac", "waiter")
    except Exception as e:
        print(f"{time.monotonic() - t:.2f} {type(e).__name__}: {e}")
""")


def test_lease_lock_wait_is_bounded_and_names_the_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    lock = state_dir() / "leases.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        r = subprocess.run([sys.executable, "-c", WAIT, "2"], capture_output=True, text=True, timeout=60)
        elapsed, _, message = r.stdout.partition(" ")
        assert elapsed, r.stdout + r.stderr
        assert 2.0 <= float(elapsed) < 30, r.stdout + r.stderr
        assert message.startswith("LockTimeout: "), message
        assert str(lock) in message and f"pid {holder.pid} (uid {os.getuid()}: " in message and "time.sleep" in message
    finally:
        holder.kill()
        holder.wait()
        close_pipes(holder)
    from pytest_bottle.net import pools

    assert pools.lease("mac", "after")  # free again once the holder is gone


# --- 3. process identity ------------------------------------------------------------------------------------------

CHECK_ID = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "/root/idt")
    from vmm import process as p
    pid = int(sys.argv[2])
    if sys.argv[1] == "record":
        print(json.dumps(p.start_time(pid)))
    else:
        print(p.is_same_process(pid, json.loads(sys.argv[3])))
""")


def test_identity_survives_a_clock_step(bottle: pytest_bottle.Bottle) -> None:
    """Inside a bottle, where the clock may be stepped: one process records a
    live process's identity, the clock jumps an hour, a fresh process checks it."""
    for module in (process, forks):  # process.py and what it imports of ours
        bottle.put(Path(module.__file__ or ""), f"/root/idt/vmm/{Path(module.__file__ or '').name}")
    bottle.write_text("/root/idt/vmm/__init__.py", "")
    bottle.put(Path(psutil.__file__).parent, "/root/idt/psutil")  # the previous identity used psutil
    bottle.write_text("/root/idt/check.py", CHECK_ID)
    pid = bottle.check_output("setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!").strip()
    recorded = bottle.check_output(["python3", "/root/idt/check.py", "record", pid]).strip()
    assert recorded != "null"
    bottle.check_output("date -s @$(( $(date +%s) + 3600 ))")
    assert bottle.check_output(["python3", "/root/idt/check.py", "check", pid, recorded]).strip() == "True"


@pytest.fixture
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    return state_dir()


def test_old_record_with_shifted_wall_clock_start_is_alive(private_state: Path, tmp_path: Path) -> None:
    owner = subprocess.Popen(["sleep", "300"])
    try:
        run_dir = tmp_path / "btl-old"
        run_dir.mkdir()
        # What psutil reported after the clock was stepped by 2 s.
        shifted = psutil.Process(owner.pid).create_time() + 2.0
        RunRecord(name="btl-old", owner_pid=owner.pid, owner_start=shifted, run_dir=str(run_dir)).save()
        report = sweep()
        assert "btl-old" not in report.vms and run_dir.is_dir()
        assert [r.name for r in RunRecord.load_all()] == ["btl-old"]
    finally:
        _kill(owner)


def test_old_record_never_kills_an_unproven_pid(private_state: Path, tmp_path: Path) -> None:
    qemu = subprocess.Popen(["sleep", "300"])  # lives under the pid an old record names, start as float
    try:
        run_dir = tmp_path / "btl-old-qemu"
        run_dir.mkdir()
        start = psutil.Process(qemu.pid).create_time()
        RunRecord("btl-old-qemu", dead_pid(), start - 5, str(run_dir), qemu_pid=qemu.pid, qemu_start=start).save()
        report = sweep()
        assert qemu.poll() is None and run_dir.is_dir() and "btl-old-qemu" not in report.vms
        assert any(f"QEMU pid {qemu.pid}" in s and "cannot prove" in s for s in report.skipped), report
    finally:
        _kill(qemu)


# --- 4. run dirs marked with their owner --------------------------------------------------------------------------

MAKE_RUN_DIR = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pytest_bottle.host.runstate import create_run_dir
    create_run_dir(Path(sys.argv[1]))
    print("made", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_run_dirs_go_only_when_their_marker_proves_them_dead(private_state: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run = cache / "run"
    subprocess.run([sys.executable, "-c", MAKE_RUN_DIR, str(run / "btl-dead"), "0"], check=True, capture_output=True)
    live = subprocess.Popen([sys.executable, "-c", MAKE_RUN_DIR, str(run / "btl-live"), "300"], stdout=subprocess.PIPE)
    try:
        assert live.stdout is not None and live.stdout.readline() == b"made\n"
        unmarked_busy = run / "btl-unmarked-busy"
        unmarked_busy.mkdir()
        busy = open(unmarked_busy / "disk.qcow2", "w")  # held open, as QEMU holds its disk
        (run / "btl-unmarked-young").mkdir()
        (run / "btl-unmarked-old").mkdir()
        long_ago = time.time() - 600
        for name in ("btl-live", "btl-unmarked-busy", "btl-unmarked-old"):
            os.utime(run / name, (long_ago, long_ago))
        report = sweep([cache])
        busy.close()
        left = {d.name for d in run.iterdir()}
        assert left == {"btl-live", "btl-unmarked-busy", "btl-unmarked-young"}, report
        assert any("btl-unmarked-busy" in s and str(os.getpid()) in s for s in report.skipped), report
        assert stat.S_IMODE((run / "btl-live").stat().st_mode) == 0o700
    finally:
        _kill(live)


def test_live_bottle_survives_a_sweep_from_another_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state-a"))
    with pytest_bottle.launch(cache_dir=CACHE) as b:
        run_dir = b.ssh_config.parent
        kept = [run_dir / n for n in ("ssh_config", "known_hosts", "console.log", "disk.qcow2")]
        assert all(p.is_file() for p in kept)
        long_ago = time.time() - 600  # the bottle has lived longer than ORPHAN_AGE
        os.utime(run_dir, (long_ago, long_ago))
        (tmp_path / "test_trivial.py").write_text(TRIVIAL)
        env = dict(os.environ, BOTTLE_STATE_DIR=str(tmp_path / "state-b"))
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "test_trivial.py",
                f"--bottle-cache-dir={CACHE}",
                "-p",
                "no:cacheprovider",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert all(p.is_file() for p in kept), f"{run_dir} lost files to a sweep of another state dir"
        assert b.ssh("echo still-here").stdout == "still-here\n"


# --- 5. what a sweep may not touch --------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("entry", ["cli", "pytest"])
def test_sweep_skips_another_users_process(home: Path, entry: str) -> None:
    state = home / "state"
    (state / "vms").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    run_dir = home / "cache" / "run" / "btl-theirs"
    run_dir.mkdir(parents=True)
    (home / "cache").chmod(0o700)
    theirs = start_as(OTHER, ["sleep", "300"])  # an orphaned QEMU of another user, as far as the record says
    try:
        time.sleep(0.2)
        record = RunRecord(
            "btl-theirs", dead_pid(), None, str(run_dir), qemu_pid=theirs.pid, qemu_start=process.start_time(theirs.pid)
        )
        (state / "vms" / "btl-theirs.json").write_text(json.dumps(record.__dict__))
        # A dead owner's run dir inside a directory of another user: it may not be removed.
        stuck = home / "shared" / "btl-stuck"
        stuck.mkdir(parents=True)
        (stuck / "disk.qcow2").write_text("x")
        stuck_record = RunRecord("btl-stuck", dead_pid(), None, str(stuck))
        (state / "vms" / "btl-stuck.json").write_text(json.dumps(stuck_record.__dict__))
        chown_tree(home, NOBODY)
        chown_tree(home / "shared", OTHER)
        env = {"BOTTLE_STATE_DIR": str(state), "XDG_CACHE_HOME": str(home)}
        if entry == "cli":
            r = as_uid(
                NOBODY, [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={home / 'cache'}", "sweep"], env
            )
            assert f"left VM btl-theirs (QEMU pid {theirs.pid}): may not signal it" in r.stdout, r.stdout + r.stderr
            assert f"left {stuck}: could not remove it" in r.stdout, r.stdout
        else:
            r = _pytest_as(NOBODY, home, env)
            assert "1 passed" in r.stdout, r.stdout + r.stderr
            assert "sweep left VM btl-theirs" in r.stdout + r.stderr
        assert r.returncode == 0, r.stdout + r.stderr
        assert theirs.poll() is None and run_dir.is_dir() and (state / "vms" / "btl-theirs.json").is_file()
        assert (stuck / "disk.qcow2").is_file() and (state / "vms" / "btl-stuck.json").is_file()
    finally:
        _kill(theirs)


# --- 1. the cache is private --------------------------------------------------------------------------------------


@needs_root
def test_cache_is_private_to_its_user(warm_cache: Path) -> None:
    # warm_cache: run first from an empty cache, ~/.cache did not exist yet to stat.
    # Others may pass through the directory above (as through a 0755 ~/.cache),
    # so only the cache's own modes keep them out: made 0700, ~/.cache would hide that.
    above = stat.S_IMODE(os.stat(CACHE.parent).st_mode)
    CACHE.parent.chmod(above | 0o011)
    try:
        _the_cache_is_private()
    finally:
        CACHE.parent.chmod(above)


def _the_cache_is_private() -> None:
    if CACHE.is_dir():
        CACHE.chmod(0o755)  # the mode older versions left
    with pytest_bottle.launch(cache_dir=CACHE) as b:
        run_dir = b.ssh_config.parent
        # This bottle's own seed: another worker's may be made or discarded meanwhile.
        restored = b._resources.restored
        assert restored is not None
        seeds = [restored.path / "memory.ram"]
        assert seeds[0].is_file()
        secrets = [seeds[0], run_dir / "disk.qcow2", run_dir / "console.log", CACHE / "keys" / "id_ed25519"]
        for path in secrets:
            r = as_uid(NOBODY, [sys.executable, "-c", f"open({str(path)!r}, 'rb').read(1)"], {})
            assert r.returncode != 0 and "PermissionError" in r.stderr, f"uid {NOBODY} could read {path}"
        assert stat.S_IMODE(CACHE.stat().st_mode) == 0o700
        for path in (run_dir / "qemu.log", *seeds):  # files QEMU itself made are the user's alone too
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_run_dir_marker_of_an_earlier_boot_or_another_pid_namespace(private_state: Path, tmp_path: Path) -> None:
    from pytest_bottle.host.runstate import MARKER, create_run_dir

    run = tmp_path / "cache" / "run"
    for name, change in (
        ("btl-old-boot", {"boot_id": "00000000-0000-0000-0000-000000000000"}),  # our live pid, but another boot
        ("btl-other-ns", {"pid_ns": "pid:[1]", "pid": dead_pid()}),  # a pid we cannot judge from here
    ):
        d = create_run_dir(run / name)
        marker = json.loads((d / MARKER).read_text())
        (d / MARKER).write_text(json.dumps({**marker, **change}))
    report = sweep([tmp_path / "cache"])
    assert {d.name for d in run.iterdir()} == {"btl-other-ns"}, report
