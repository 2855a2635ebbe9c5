"""pytest-timeout and first-use work, through real pytest runs with real
pytest-timeout timers (no VM: the work is a progress task that sleeps)."""

from __future__ import annotations

import pytest

TESTS = """
import time
import pytest
from pytest_bottle.host import progress

@pytest.mark.timeout(1)
def test_work_is_not_counted():
    with progress.task("building image x", "a test"):
        time.sleep(1.5)
    with progress.work():  # a wait on a sibling worker's build shows nothing
        time.sleep(1.5)
    time.sleep(0.3)  # what was left still holds this

@pytest.mark.timeout(1)
def test_the_test_is_still_timed():
    with progress.task("building image y"):
        time.sleep(0.5)
    time.sleep(5)
    print("not reached")
"""


@pytest.mark.parametrize("method", ["signal", "thread"])
@pytest.mark.parametrize("load", ["-ptimeout", "-ppytest_timeout"])
def test_first_use_work_is_not_in_a_tests_timeout_and_the_rest_is(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, method: str, load: str
) -> None:
    """Loaded by its entry point or by module name (then its plugin is named
    ``pytest_timeout``, not ``timeout``), with either of its methods."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(TESTS)
    args = ("-p", "no:cacheprovider", "-p", "pytest_bottle.plugin", load, f"--timeout-method={method}")
    ok = pytester.runpytest_subprocess(*args, "-k", "not_counted")
    assert ok.ret == 0, ok.stdout.str()
    ok.assert_outcomes(passed=1)
    late = pytester.runpytest_subprocess(*args, "-k", "still_timed")
    out = late.stdout.str() + late.stderr.str()
    assert late.ret != 0 and "Timeout" in out and "not reached" not in out, out
    assert "time.sleep(5)" in out, out  # where it struck: after the work, in the test's own sleep
