"""A pytest-bottle error's report shows the line of the test (or of the fixture
that started the bottle) and the error's message, not the plugin's frames under
it; any other exception, and ``--full-trace``, keep every frame."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TESTS = """
import pytest

def test_exec_error(bottle):
    bottle.check_output("echo said-this >&2; exit 3")

@pytest.mark.bottle(boot="cold", timeout=2)
def test_boot_timeout(bottle):
    pass

def test_not_ours(bottle):
    bottle.exec(None)

def test_factory(bottle_factory):
    bottle_factory(boot="cold", timeout=2)
"""
OWN_FRAME = re.compile(r"pytest_bottle/[\w/]+\.py:\d+")


def tracebacks(output: str) -> dict[str, str]:
    """Each failed test's traceback in pytest's report, by test name (its bottle sections cut off)."""
    found: dict[str, str] = {}
    for head, body in re.findall(
        r"^_{3,} (?:ERROR at setup of )?(\w+) _{3,}$\n(.*?)(?=^_{3,} |^={3,} )", output, re.M | re.S
    ):
        found[head] = re.split(r"^-{3,} bottle ", body, maxsplit=1, flags=re.M)[0]
    return found


def run(pytester: pytest.Pytester, cache: Path, *args: str) -> dict[str, str]:
    pytester.makepyfile(test_errors=TESTS)
    result = pytester.runpytest_subprocess(f"--bottle-cache-dir={cache}", "-p", "no:cacheprovider", *args)
    return tracebacks(result.stdout.str())


def test_a_bottle_error_shows_the_users_line_and_not_the_plugins_frames(
    pytester: pytest.Pytester, warm_cache: Path
) -> None:
    shown = run(pytester, warm_cache)
    assert set(shown) == {"test_exec_error", "test_boot_timeout", "test_not_ours", "test_factory"}, shown

    called = shown["test_exec_error"]
    assert '>       bottle.check_output("echo said-this >&2; exit 3")' in called, called
    assert "E       pytest_bottle.errors.ExecError: command 'echo said-this >&2; exit 3' exited with 3" in called
    assert "E       said-this" in called and re.search(r"^test_errors\.py:4: ExecError$", called, re.M), called
    assert not OWN_FRAME.search(called), called

    # At setup, the fixture's line: the only frame of the plugin's that is shown.
    setup = shown["test_boot_timeout"]
    assert "E       pytest_bottle.errors.BootTimeout: bottle btl-" in setup, setup
    assert "the agent did not answer within 2 s" in setup, setup
    assert OWN_FRAME.findall(setup) and {f.split(":")[0] for f in OWN_FRAME.findall(setup)} == {
        "pytest_bottle/plugin.py"
    }, setup

    # A factory called by the test: its line, not the factory's.
    made = shown["test_factory"]
    assert '>       bottle_factory(boot="cold", timeout=2)' in made and "BootTimeout: bottle btl-" in made, made
    assert re.search(r"^test_errors\.py:14: BootTimeout$", made, re.M) and not OWN_FRAME.search(made), made

    # Not a BottleError (a TypeError here; it could be a bug of ours): every frame stays.
    other = shown["test_not_ours"]
    assert "TypeError" in other and len(OWN_FRAME.findall(other)) >= 1, other


@pytest.mark.parametrize("option", ["--full-trace", "--tb=native"])
def test_full_and_native_tracebacks_keep_the_plugins_frames(
    pytester: pytest.Pytester, warm_cache: Path, option: str
) -> None:
    called = run(pytester, warm_cache, option, "-k", "exec_error")["test_exec_error"]
    assert "pytest_bottle/results.py" in called and "pytest_bottle/bottle.py" in called, called
