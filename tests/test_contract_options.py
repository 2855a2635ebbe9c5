"""Options, ini twins, precedence, fixtures and signals of docs/reference.md (issue 12).

Each test runs real, inner pytest sessions in subprocesses (pytester), so
options, process-wide state and signals behave as in a user's run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.host.runstate import RunRecord
from pytest_bottle.images import Recipe, ensure_image
from pytest_bottle.net import pools

CACHE = default_cache_dir()
QUIET = ("-p", "no:cacheprovider", "-p", "no:randomly")


@pytest.fixture(scope="module")
def built(warm_cache: Path) -> Path:
    """The default image and its seed, made before any inner run (which then finds them cached)."""
    return ensure_image("debian-bookworm", CACHE).path


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # pytester points HOME at a temp dir: name the shared cache explicitly.
    return pytester.runpytest_subprocess(f"--bottle-cache-dir={CACHE}", *QUIET, *args)


# Restored from a seed, a guest has been up since the seed booted: longer than
# its QEMU process has existed. A cold-booted guest is younger than its QEMU.
BOOT_HELPERS = """
import time
import psutil

def booted_cold(b):
    uptime = float(b.read_text("/proc/uptime").split()[0])
    return uptime < time.time() - psutil.Process(b.pid).create_time()
"""


def test_boot_option_ini_twin_and_their_precedence(pytester: pytest.Pytester, built: Path) -> None:
    pytester.makeini("[pytest]\nbottle_boot = cold\n")
    pytester.makepyfile(
        test_ini=BOOT_HELPERS
        + """
import pytest

def test_ini_boots_cold(bottle):
    assert booted_cold(bottle)

@pytest.mark.bottle(boot="snapshot")
def test_marker_beats_ini(bottle):
    assert not booted_cold(bottle)
""",
        test_cli=BOOT_HELPERS
        + """
def test_cli_beats_ini(bottle):
    assert not booted_cold(bottle)
""",
    )
    run(pytester, "test_ini.py", "--bottle-prestart=0").assert_outcomes(passed=2)
    run(pytester, "test_cli.py", "--bottle-boot=snapshot", "--bottle-prestart=0").assert_outcomes(passed=1)
    pytester.makeini("[pytest]\nbottle_boot = warm\n")
    result = run(pytester, "test_cli.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "ini file tox.ini: bad boot" in result.stderr.str()


PID = """
import os
from pathlib import Path

def pytest_configure(config):
    Path("pid.txt").write_text(str(os.getpid()))
"""
TIMEOUT_TESTS = """
import pytest

def test_default(bottle):
    pass

@pytest.mark.bottle(timeout=300)
def test_marker_beats_cli_and_ini(bottle):
    pass

def test_factory_beats_cli_and_ini(bottle_factory):
    bottle_factory(timeout=300)
"""


def test_timeout_option_ini_twin_and_their_precedence(pytester: pytest.Pytester, built: Path) -> None:
    pytester.makepyfile(test_timeout=TIMEOUT_TESTS)
    pytester.makeconftest(PID)
    for ini, cli in (("0.01", ()), ("300", ("--bottle-timeout=0.01",))):
        pytester.makeini(f"[pytest]\nbottle_timeout = {ini}\n")
        result = run(pytester, "--bottle-prestart=0", *cli)
        result.assert_outcomes(passed=2, errors=1)
        result.stdout.fnmatch_lines(["*ERROR at setup of test_default*", "*BootTimeout*within 0.01 s*"])
        # No bottle of the run is left behind, the one that timed out included.
        pid = int((pytester.path / "pid.txt").read_text())
        assert not [r.name for r in RunRecord.load_all() if r.owner_pid == pid]


SPARES = """
import os, time
from pathlib import Path
from pytest_bottle.host.runstate import RunRecord

def test_count_my_bottles(bottle):
    deadline = time.monotonic() + float(os.environ["CONTRACT_WAIT"])
    while True:
        mine = [r.name for r in RunRecord.load_all() if r.owner_pid == os.getpid()]
        if len(mine) > 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    Path("count.txt").write_text(str(len(mine)))
"""


def test_prestart_zero_on_the_command_line_and_in_the_ini(
    pytester: pytest.Pytester, built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_spares=SPARES)

    def count(ini: str, *cli: str, wait: float) -> int:
        pytester.makeini(f"[pytest]\nbottle_prestart = {ini}\n")
        monkeypatch.setenv("CONTRACT_WAIT", str(wait))
        run(pytester, *cli).assert_outcomes(passed=1)
        return int((pytester.path / "count.txt").read_text())

    assert count("1", "--bottle-prestart=0", wait=4) == 1  # no spare beside the test's bottle
    assert count("0", wait=4) == 1
    assert count("0", "--bottle-prestart=1", wait=120) == 2  # the check can see a spare


def _fake_old_entry(cache: Path, recipe: Recipe, created: float) -> Path:
    """A cache entry for ``recipe`` as an earlier run would have left it."""
    entry = cache / "images" / f"{recipe.name}-{recipe.key()}"
    entry.mkdir(parents=True)
    for name in ("rootfs.ext4", "vmlinuz", "initrd.img"):
        (entry / name).write_bytes(b"old")
    (entry / "manifest.json").write_text(json.dumps({"name": recipe.name, "key": recipe.key(), "created": created}))
    return entry


# Nothing listens on the discard port: apt fails at once, naming the mirror.
OFFLINE = 'Recipe(name="contract-offline", packages=("python3",), mirror="http://127.0.0.1:9/debian")'


def test_rebuild_option_and_ini_twin_rebuild_what_is_older_than_the_run(pytester: pytest.Pytester) -> None:
    cache = pytester.path / "cache"
    old = time.time() - 3600
    entry = _fake_old_entry(cache, eval(OFFLINE), old)
    pytester.makeconftest(f"from pytest_bottle.images import Recipe, register\nregister({OFFLINE})\n")
    pytester.makepyfile(
        """
        from pathlib import Path

        def test_image(bottle_image):
            Path("created.txt").write_text(repr(bottle_image.created))
        """
    )
    args = (f"--bottle-cache-dir={cache}", "--bottle-image=contract-offline", *QUIET)
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    assert float((pytester.path / "created.txt").read_text()) == old  # cached: no build without the flag
    for extra, ini in ((("--bottle-rebuild",), ""), ((), "[pytest]\nbottle_rebuild = true\n")):
        pytester.makeini(ini or "[pytest]\n")
        result = pytester.runpytest_subprocess(*args, *extra)
        result.assert_outcomes(errors=1)
        out = result.stdout.str()
        # It really ran mmdebstrap, against the recipe's own mirror.
        assert "ImageBuildError" in out and "building image 'contract-offline' failed" in out, out
        assert "127.0.0.1:9" in out, out
        assert json.loads((entry / "manifest.json").read_text())["created"] == old  # the old entry survives


def test_cache_dir_tilde_and_relative_paths(pytester: pytest.Pytester, built: Path) -> None:
    home = pytester.path  # pytester's HOME
    sub = home / "sub"
    pytester.makepyfile(
        test_where="""
        from pathlib import Path

        def test_where(bottle_image):
            Path(__file__).with_name("where.txt").write_text(str(bottle_image.path))
        """
    )

    def where(cwd: Path, ini: str | None, *cli: str) -> tuple[str, Path]:
        """The header's cache and the path of the image the run used."""
        pytester.makeini(f"[pytest]\n{ini or ''}\n")
        os.chdir(cwd)
        try:
            result = pytester.runpytest_subprocess(str(home / "test_where.py"), *QUIET, *cli)
        finally:
            os.chdir(home)
        result.assert_outcomes(passed=1)
        header = re.search(r"^bottle: .*, cache (.+)$", result.stdout.str(), re.M)
        assert header, result.stdout.str()
        return header.group(1), Path((home / "where.txt").read_text())

    def expect(cache: Path) -> Path:
        # Share the built images so that no run builds one.
        if not (cache / "images").exists():
            cache.mkdir(parents=True)
            (cache / "images").symlink_to(CACHE / "images")
        return cache

    sub.mkdir()
    cases = [
        (home, None, ("--bottle-cache-dir=~/tilde",), expect(home / "tilde")),
        (sub, None, ("--bottle-cache-dir=rel/c",), expect(sub / "rel" / "c")),  # the current directory
        (sub, "bottle_cache_dir = inirel", (), expect(home / "inirel")),  # the ini file's directory
        (sub, "bottle_cache_dir = ~/initilde", (), expect(home / "initilde")),
        (sub, "bottle_cache_dir = inirel", ("--bottle-cache-dir=../clirel",), expect(home / "clirel")),
    ]
    for cwd, ini, cli, cache in cases:
        header, image = where(cwd, ini, *cli)
        # (A "../" may stay in the path: the file system resolves it.)
        assert Path(header).resolve() == cache.resolve(), (ini, cli, header)
        assert image.is_relative_to(Path(header) / "images"), image  # the run used that cache
    assert not list(home.rglob("~*")) and not (sub / "inirel").exists()


def test_an_unusable_cache_dir_stops_the_run_at_start_up_naming_its_source(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_two="def test_vm(bottle):\n    pass\n\ndef test_plain():\n    pass\n")
    afile = pytester.path / "afile"
    afile.write_text("")
    below = f"{afile}/sub: {afile} on its path is not a directory"
    cases = [
        ("", "--bottle-cache-dir=/proc/x", "command line: refusing to use /proc/x: it cannot be made ("),
        ("", f"--bottle-cache-dir={afile}/sub", f"command line: refusing to use {below};"),
        ("", f"--bottle-cache-dir={afile}", f"command line: refusing to use {afile}: it is not a directory;"),
        ("bottle_cache_dir = afile/sub", "", f"ini file tox.ini: refusing to use {below};"),  # relative to the ini file
    ]
    for ini, cli, message in cases:
        pytester.makeini(f"[pytest]\n{ini}\n")
        result = pytester.runpytest_subprocess(*QUIET, *filter(None, [cli]))
        out = result.stdout.str() + result.stderr.str()
        # Before any test: not an error at each bottle's setup with an OSError's traceback.
        assert result.ret == pytest.ExitCode.USAGE_ERROR, out
        assert f"ERROR: {message}" in result.stderr.str(), out
        assert "Traceback" not in out and "passed" not in out, out
    assert afile.read_text() == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give a directory to another user")
def test_a_default_cache_that_could_never_be_made_fails_only_the_bottle_tests_and_doctor_says_so(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default is made at the first bottle: a run without bottles must not need it
    # (a CI job whose HOME is another user's). `bottle doctor` said "none yet: the first
    # bottle or build makes it" of one that can never be made.
    pytester.makepyfile(test_two="def test_vm(bottle):\n    pass\n\ndef test_plain():\n    pass\n")
    theirs = pytester.path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    monkeypatch.setenv("XDG_CACHE_HOME", str(theirs))
    result = pytester.runpytest_subprocess(*QUIET)
    result.assert_outcomes(passed=1, errors=1)
    said = f"UnsafeDirectory: refusing to use {theirs}/pytest-bottle: the directory above it, {theirs}, belongs to uid 65534"
    assert said in result.stdout.str()
    doctor = subprocess.run([sys.executable, "-m", "pytest_bottle.cli", "doctor"], capture_output=True, text=True)
    assert (
        doctor.returncode == 1
        and f"cache: {theirs}/pytest-bottle: cannot be used: the directory above" in doctor.stdout
    )
    listing = subprocess.run(
        [sys.executable, "-m", "pytest_bottle.cli", "image", "list"], capture_output=True, text=True
    )
    assert listing.returncode == 0, listing  # a cache not there is an empty one to the commands that only read
    assert list(theirs.iterdir()) == []


PRECEDENCE = """
import warnings

import pytest
from pytest_bottle import BottleError

pytestmark = pytest.mark.bottle(forward=[7001])
SESSION = []

def forwarded(b):
    found = []
    for port in (7001, 7002, 7003, 7004):
        try:
            b.address(port)
            found.append(port)
        except BottleError:
            pass
    return found

@pytest.mark.bottle(forward=[7002])
def test_marker_beats_factory_arguments(bottle_factory):
    said = "bottle_factory.*: forward=.7003. is not used: @pytest.mark.bottle on .*::test_marker_beats.* sets forward=.7002."
    with pytest.warns(UserWarning, match=said) as got:
        b = bottle_factory(forward=[7003])
    assert [w.filename for w in got] == [__file__]  # where the test called it
    assert forwarded(b) == [7002]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the marker's own value, as a tuple: nothing to say
        assert forwarded(bottle_factory(forward=(7002,))) == [7002]

def test_module_marker_applies(bottle):
    assert forwarded(bottle) == [7001]

class TestClosest:
    pytestmark = pytest.mark.bottle(forward=[7003])

    def test_class_marker_is_closer_than_the_module_marker(self, bottle):
        assert forwarded(bottle) == [7003]

    @pytest.mark.bottle(timeout=200)
    def test_function_marker_replaces_the_others(self, bottle):
        assert forwarded(bottle) == []

    @pytest.mark.bottle  # only marks it (-m bottle): sets nothing, replaces nothing
    def test_a_bare_marker_leaves_the_class_marker_closest(self, bottle):
        assert forwarded(bottle) == [7003]

@pytest.mark.bottle(forward=[7002])
@pytest.mark.parametrize("case", [pytest.param(1, marks=pytest.mark.bottle(forward=[7004])), 2])
def test_a_functions_marker_is_closer_than_a_cases(bottle, case):
    assert forwarded(bottle) == [7002]  # pytest's order: the function's decorators come first

def test_factory_without_marker_arguments_gets_the_closest_marker(bottle_factory):
    assert forwarded(bottle_factory()) == [7001]

def test_module_bottle_follows_pytestmark(module_bottle):
    assert forwarded(module_bottle) == [7001]

@pytest.mark.bottle(forward=[7004])
def test_module_bottle_ignores_a_function_marker(module_bottle):
    assert forwarded(module_bottle) == [7001]

@pytest.mark.bottle(forward=[7002])
def test_session_bottle_ignores_markers(session_bottle):
    assert forwarded(session_bottle) == []

@pytest.mark.bottle(forward=[7002])
def test_session_factory_ignores_markers(session_bottle_factory):
    b = session_bottle_factory(forward=[7004])
    assert forwarded(b) == [7004]
    SESSION.append(b)

def test_session_factory_bottles_outlive_the_test():
    (b,) = SESSION
    assert not b.closed and b.check_output("echo alive") == "alive\\n"
    import os
    from pathlib import Path
    Path("session.json").write_text(repr((os.getpid(), b.name, b.pid)))
"""


def test_marker_precedence_and_fixture_scopes(pytester: pytest.Pytester, built: Path) -> None:
    pytester.makepyfile(test_precedence=PRECEDENCE)
    run(pytester, "--bottle-prestart=0").assert_outcomes(passed=13)
    owner, name, qemu = eval((pytester.path / "session.json").read_text())
    # The session's end stopped the session factory's bottle, and every other.
    assert not psutil.pid_exists(qemu) or psutil.Process(qemu).status() == psutil.STATUS_ZOMBIE
    assert not [r.name for r in RunRecord.load_all() if r.owner_pid == owner]
    assert name not in json.dumps(pools.snapshot())


def test_every_bottle_fixture_auto_marks_its_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def indirect(bottle):
            return bottle

        def test_plain(): pass
        def test_bottle(bottle): pass
        def test_factory(bottle_factory): pass
        def test_module(module_bottle): pass
        def test_session(session_bottle): pass
        def test_session_factory(session_bottle_factory): pass
        def test_image(bottle_image): pass
        def test_through_a_fixture(indirect): pass
        """
    )
    vm_tests = {"bottle", "factory", "module", "session", "session_factory", "image", "through_a_fixture"}
    marked = run(pytester, "--strict-markers", "--collect-only", "-q", "-m", "bottle")
    assert {m.group(1) for m in re.finditer(r"::test_(\w+)$", marked.stdout.str(), re.M)} == vm_tests
    result = run(pytester, "--strict-markers", "-m", "not bottle")  # runs, and boots nothing
    result.assert_outcomes(passed=1, deselected=len(vm_tests))


REPORTED = """
import os, signal, threading
import pytest
from pytest_bottle import AgentError, ExecTimeout

def test_dies(bottle):
    with pytest.raises(ExecTimeout):
        bottle.exec("sleep 30", timeout=0.5)
    threading.Timer(1.0, os.kill, (bottle.pid, signal.SIGKILL)).start()
    with pytest.raises(AgentError):
        bottle.exec("sleep 60")
    assert bottle.history[-1][1] is None
    assert False, "show the report"
"""


def test_report_marks_killed_and_unanswered_commands(pytester: pytest.Pytester, built: Path) -> None:
    pytester.makepyfile(test_report=REPORTED)
    result = run(pytester, "--bottle-prestart=0")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    section = out.split("last commands", 1)[1]
    assert re.search(r"^\[-9\] \d+\.\d\ds  sleep 30$", section, re.M), section  # killed by its timeout
    assert re.search(r"^\[\?\] \d+\.\d\ds  sleep 60$", section, re.M), section  # the VM died: no answer


HOLD = """
import json, os, time
from pathlib import Path

def test_hold(bottle):
    info = Path(os.environ["CONTRACT_INFO"])
    tmp = info.with_name(info.name + ".tmp")  # its own: info.jsona and info.jsonb shared info.tmp (a CI race)
    tmp.write_text(json.dumps(
        {"pid": os.getpid(), "name": bottle.name, "qemu": bottle.pid, "run_dir": str(bottle.console_log_path.parent)}
    ))
    tmp.replace(info)  # whole: the test reads it as soon as it exists
    time.sleep(600)
"""


HOLD_EACH = HOLD.replace('Path(os.environ["CONTRACT_INFO"])', 'Path(os.environ["CONTRACT_INFO"] + os.environ["WHICH"])')
HOLD_TWO = (
    HOLD_EACH.replace("def test_hold(", "def _hold(")
    + """
import pytest

@pytest.fixture
def slow_teardown():
    yield
    time.sleep(5.5)  # a teardown that takes a while: what a loaded host makes of it


@pytest.mark.parametrize("which", ["a", "b"])
def test_hold(which, bottle, slow_teardown, monkeypatch):  # slow_teardown's runs before the bottle's
    monkeypatch.setenv("WHICH", which)
    _hold(bottle)
"""
)


def test_sigterm_to_an_xdist_controller_alone_unwinds_its_workers_too(tmp_path: Path, built: Path) -> None:
    # Ctrl-C in a terminal reaches the whole process group; a SIGTERM (a CI
    # runner's, `timeout`) may reach the controller only.  Left to xdist, a
    # worker was interrupted 5 s after being told to exit and killed at 10 s:
    # on a loaded host its VMs were left to the next sweep (seen in CI).
    (tmp_path / "test_hold.py").write_text(HOLD_TWO)
    infos = [tmp_path / "info.jsona", tmp_path / "info.jsonb"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "test_hold.py", "-n", "2", f"--bottle-cache-dir={CACHE}", *QUIET],
        cwd=tmp_path,
        env=dict(os.environ, CONTRACT_INFO=str(tmp_path / "info.json")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not all(i.exists() for i in infos):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()  # type: ignore[union-attr]
            time.sleep(0.1)
        vms = [json.loads(i.read_text()) for i in infos]
        assert vms[0]["pid"] != vms[1]["pid"] != proc.pid  # two workers, neither the controller
        time.sleep(1.0)  # their pre-started spares are on their way too
        proc.send_signal(signal.SIGTERM)  # the controller only
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    for vm in vms:  # each worker's finalizers ran: nothing is left, without any sweep
        assert not psutil.pid_exists(vm["qemu"]) or psutil.Process(vm["qemu"]).status() == psutil.STATUS_ZOMBIE
        assert not Path(vm["run_dir"]).exists(), out
        assert not [r.name for r in RunRecord.load_all() if r.owner_pid == vm["pid"]], out
        assert vm["name"] not in json.dumps(pools.snapshot())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: a closed terminal or ssh session
def test_sigterm_and_sighup_unwind_like_ctrl_c(tmp_path: Path, built: Path, sig: signal.Signals) -> None:
    (tmp_path / "test_hold.py").write_text(HOLD)
    info = tmp_path / "info.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "test_hold.py", f"--bottle-cache-dir={CACHE}", *QUIET],
        cwd=tmp_path,
        env=dict(os.environ, CONTRACT_INFO=str(info)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # Under nohup (a CI runner may ignore SIGHUP) pytest would inherit it ignored, and keep it so.
        preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not info.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()  # type: ignore[union-attr]
            time.sleep(0.1)
        vm = json.loads(info.read_text())
        time.sleep(1.0)  # the pre-started spare is on its way too
        proc.send_signal(sig)
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Unwound (KeyboardInterrupt: exit 2), not killed by the signal (-15, -1: the record and leases were left).
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out and f"signal {int(sig)}" in out, out
    # Finalizers ran: no QEMU, run directory, record or lease is left, without any sweep.
    assert not psutil.pid_exists(vm["qemu"]) or psutil.Process(vm["qemu"]).status() == psutil.STATUS_ZOMBIE
    assert not Path(vm["run_dir"]).exists()
    assert not [r.name for r in RunRecord.load_all() if r.owner_pid == vm["pid"]]
    assert vm["name"] not in json.dumps(pools.snapshot())
