"""Progress of first-use work under pytest: a new user never watches a silent minute.

Each test runs pytest in a subprocess against a cache of its own that shares
the built images but has no seed, so the child's first bottle makes one
(about a minute under TCG) and must say so while the test waits, through
pytest's capture, and under xdist through the controller.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import kill_group

from pytest_bottle.host.paths import default_cache_dir, state_dir
from pytest_bottle.host.progress import INTERVAL_ENV
from pytest_bottle.images import ensure_image

HEARTBEAT = 2.0  # seconds; a seed takes far longer, so heartbeats must show
SEED_LINE = r"pytest-bottle \[\s*\d+s\] making the work seed of image debian-bookworm \(512M, 1 cpu, 1 nic\)"

# The fast test's dot is on the terminal before the seed's lines: they still start a line.
TEST_FILE = """
def test_fast():
    pass

def test_first_bottle(bottle):
    assert bottle.exec("true").ok
"""


@pytest.fixture
def seedless_cache(tmp_path: Path) -> Path:
    """A cache with the built images (linked in) and the accelerator verdict, but no seed."""
    shared = default_cache_dir()
    ensure_image("debian-bookworm", shared)
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(shared / "images", cache / "images")
    if (shared / "accel.json").exists():
        shutil.copy(shared / "accel.json", cache / "accel.json")
    return cache


def run_child(tmp_path: Path, cache: Path, *args: str, test_file: str = TEST_FILE) -> tuple[int, str, int]:
    """Run pytest on ``test_file``; returns its exit code, its output (stdout and
    stderr interleaved, as a terminal shows them) and its pid."""
    (tmp_path / "test_first.py").write_text(test_file)
    env = dict(os.environ, **{INTERVAL_ENV: str(HEARTBEAT)})
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly"]
    argv += [f"--bottle-cache-dir={cache}", "--rootdir", str(tmp_path), *args, "test_first.py"]
    proc = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=540)
    finally:
        kill_group(proc)
    return proc.returncode, out, proc.pid


def check_seed_progress(out: str, prefix: str = "") -> None:
    start = rf"^{prefix}{SEED_LINE}: none yet"
    assert re.search(start, out, re.M), f"no start line for the seed:\n{out}"
    assert re.search(rf"^{prefix}{SEED_LINE}: still running", out, re.M), f"no heartbeat:\n{out}"
    assert re.search(rf"^{prefix}{SEED_LINE}: done in \d+\.\ds$", out, re.M), f"no end line:\n{out}"


def test_seed_progress_shows_through_capture(tmp_path: Path, seedless_cache: Path) -> None:
    rc, out, _ = run_child(tmp_path, seedless_cache)
    assert rc == 0, out
    check_seed_progress(out)
    # The lines come while the test waits, before its result.
    assert out.index("making the work seed") < out.index("2 passed")


def test_seed_progress_under_xdist_comes_through_the_controller(tmp_path: Path, seedless_cache: Path) -> None:
    rc, out, pid = run_child(tmp_path, seedless_cache, "-n", "2")
    assert rc == 0, out
    check_seed_progress(out, prefix=r"\[gw\d\] ")
    assert not list((state_dir() / "progress").glob(f"{pid}-*")), "the controller left its progress file"


def test_quiet_run_without_bottle_tests_shows_nothing(tmp_path: Path, seedless_cache: Path) -> None:
    rc, out, _ = run_child(tmp_path, seedless_cache, "-q", "-m", "not bottle", "-n", "2")
    assert rc == 0, out  # the bottle test deselected
    assert "pytest-bottle [" not in out
    assert not (seedless_cache / "seeds").exists() or not any((seedless_cache / "seeds").iterdir())


SIBLINGS = """
import os, time
from pathlib import Path
from filelock import FileLock
from pytest_bottle.host import progress
from pytest_bottle.host.locks import reporting_lock

LOCK = Path(os.environ["LOCK"])

def test_role(worker_id):
    held = LOCK.with_suffix(".held")
    if worker_id == "gw0":  # the builder: its own progress is what the run shows
        with FileLock(str(LOCK)):
            held.write_text("")
            time.sleep(1.5)
        return
    deadline = time.time() + 60
    while not held.exists():
        assert time.time() < deadline
        time.sleep(0.02)
    seen, busy = [], []
    reporter = progress.Reporter(seen.append)
    reporter.watchers.append(busy.append)
    previous = progress.install(reporter)
    try:
        with reporting_lock(LOCK, "the build of image x", show_after=0.2):
            pass
    finally:
        progress.install(previous)
    assert seen == [], seen  # no second task for a sibling worker's build
    assert busy == [True, False], busy  # but work all the same: pytest-timeout does not count the wait
"""


def test_a_sibling_workers_lock_is_waited_for_quietly(tmp_path: Path) -> None:
    """Its own progress reaches the controller: the waiting worker adds no task
    (the wait is work all the same, which pytest-timeout does not count)."""
    (tmp_path / "test_siblings.py").write_text(SIBLINGS)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "test_siblings.py", "-n", "2", "--dist", "each", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=dict(os.environ, LOCK=str(tmp_path / "image-x.lock")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout + r.stderr


TIMED_FILE = """
import time
import pytest

@pytest.mark.timeout(5)
def test_timed(bottle):
    print("bottle ready")
    time.sleep(60)
"""


def test_a_seed_made_while_a_test_waits_is_not_in_its_pytest_timeout(tmp_path: Path, seedless_cache: Path) -> None:
    """The seed's cold boot (15 s or more under TCG) ran into the test's 5 s and
    failed it; now its timer stops for the seed and runs on after it, so the
    test gets its bottle and times out in its own sleep."""
    # tcg: under KVM the seed could take less than the test's 5 s, which proves nothing
    rc, out, _ = run_child(
        tmp_path, seedless_cache, "--timeout-method=signal", "--bottle-accel=tcg", test_file=TIMED_FILE
    )
    took = re.search(rf"^{SEED_LINE}: done in (\d+\.\d)s$", out, re.M)
    assert took is not None and float(took[1]) > 5, out  # the seed alone outlasted the test's timeout
    assert rc != 0 and "bottle ready" in out and "Timeout" in out, out
    assert "time.sleep(60)" in out, out  # where the timer struck
