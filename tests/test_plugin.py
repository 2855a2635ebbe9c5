"""The pytest face, through real pytest runs in subprocesses (pytester)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.vmm.accel import host_id

CACHE = str(default_cache_dir())


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # pytester points HOME at a temp dir; keep the shared cache (built images).
    return pytester.runpytest_subprocess(f"--bottle-cache-dir={CACHE}", "-p", "no:cacheprovider", *args)


def test_marker_arguments_reach_the_vm(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.bottle(memory="768M", cpus=2, boot="cold")
        def test_size(bottle):
            kb = int(bottle.check_output("awk '/MemTotal/ {print $2}' /proc/meminfo"))
            assert 600_000 < kb <= 768 * 1024
            assert bottle.check_output("nproc").strip() == "2"
    """)
    result = run(pytester, "--strict-markers")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("source", "args", "expected"),
    [
        ('@pytest.mark.bottle(memory="lots")', (), r"@pytest\.mark\.bottle on test_bad\.py::test_it: bad memory"),
        ("@pytest.mark.bottle(cpus=0)", (), r"test_bad\.py::test_it: bad cpus"),
        ('@pytest.mark.bottle("debian")', (), r"keyword arguments only"),
        ('@pytest.mark.bottle(colour="red")', (), r"unknown argument 'colour'"),
        ('@pytest.mark.bottle(cache_dir="/tmp")', (), r"unknown argument 'cache_dir'"),
        ('@pytest.mark.bottle(image="windows")', (), r"unknown image 'windows'; known images: debian-bookworm"),
        ("", ("--bottle-cpus=0",), r"command line: bad cpus"),
        ("", ("--bottle-memory=lots",), r"command line: bad memory"),
        ("", ("--bottle-accel=hvf",), r"command line: bad accel"),
    ],
)
def test_bad_arguments_are_usage_errors(
    pytester: pytest.Pytester, source: str, args: tuple[str, ...], expected: str
) -> None:
    pytester.makepyfile(
        test_bad=f"""
        import pytest

        {source}
        def test_it(bottle):
            pass
    """
    )
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert re.search(expected, result.stderr.str()), result.stderr.str()
    result.stdout.no_fnmatch_line("*passed*")


def test_every_bottle_marker_is_checked_and_named_by_where_it_is(pytester: pytest.Pytester) -> None:
    """A stacked marker and an inherited one are checked too, each named by the node that holds it."""
    pytester.makepyfile(
        test_stacked="""
        import pytest

        @pytest.mark.bottle(cpus=0)
        @pytest.mark.bottle(memory="1G")
        def test_two(bottle):
            pass
        """,
        test_inherited="""
        import pytest

        pytestmark = pytest.mark.bottle(cpus=0)

        class TestX:
            @pytest.mark.bottle(memory="1G")
            def test_a(self, bottle):
                pass
        """,
    )
    result = run(pytester, "test_stacked.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "@pytest.mark.bottle on test_stacked.py::test_two: bad cpus" in result.stderr.str()
    result = run(pytester, "test_inherited.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "@pytest.mark.bottle on test_inherited.py: bad cpus" in result.stderr.str()  # the module's


def test_a_marker_a_fixture_appends_at_setup_is_used(pytester: pytest.Pytester) -> None:
    """The bare mark the plugin puts on a test that uses a bottle fixture counted
    as the closest marker: one added after it (append=True) was never read."""
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(autouse=True)
        def sized(request):
            request.node.add_marker(pytest.mark.bottle(memory="1.5X"), append=True)
        """
    )
    pytester.makepyfile(
        test_appended="""
        import pytest

        def test_a(bottle):
            pass

        @pytest.mark.bottle(cpus=1)  # closer than the appended one, which is still checked
        def test_b(bottle_factory):
            bottle_factory()
        """
    )
    result = run(pytester, "test_appended.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.assert_outcomes(errors=2)
    for test in ("test_a", "test_b"):
        assert f"@pytest.mark.bottle on test_appended.py::{test}: bad memory" in result.stdout.str()


def test_a_marker_added_after_the_factory_is_set_up_is_used(pytester: pytest.Pytester) -> None:
    """``bottle_factory`` read the test's marker once, at its setup: one that a
    later fixture or the test itself added was neither used nor checked."""
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def bad_later(bottle_factory, request):
            request.node.add_marker(pytest.mark.bottle(cpus="zz"))
        """
    )
    pytester.makepyfile(
        test_later="""
        import pytest

        def test_bad(bad_later, bottle_factory):
            bottle_factory()

        def test_forward(request, bottle_factory):
            request.node.add_marker(pytest.mark.bottle(forward=[8080]), append=False)
            b = bottle_factory()
            host, port = b.address(8080)
            assert host.startswith("127.") and port > 0
        """
    )
    result = run(pytester, "test_later.py")
    result.assert_outcomes(passed=1, failed=1)
    assert "@pytest.mark.bottle on test_later.py::test_bad: bad cpus" in result.stdout.str()


def test_a_factory_kept_past_its_test_refuses_to_start_a_bottle(pytester: pytest.Pytester) -> None:
    """It started one, which lived on in no test's teardown until the session ended."""
    pytester.makepyfile(
        test_stale="""
        import pytest
        from pytest_bottle import BottleError

        kept = []

        def test_a(bottle_factory):
            kept.append(bottle_factory)

        def test_b():
            with pytest.raises(BottleError, match="bottle_factory of test_stale.py::test_a was called after that test ended"):
                kept[0]()
        """
    )
    result = run(pytester, "test_stale.py")
    result.assert_outcomes(passed=2)


def test_a_bad_value_a_higher_layer_overrides_is_still_an_error(pytester: pytest.Pytester) -> None:
    """Only the value that won was parsed: a bad factory argument under a marker,
    or a bad ini value under the command line's, passed unseen."""
    pytester.makepyfile(
        test_hidden="""
        import pytest

        @pytest.mark.bottle(cpus=1, image="debian-bookworm")
        def test_cpus(bottle_factory):
            bottle_factory(cpus="lots")

        @pytest.mark.bottle(cpus=1, image="debian-bookworm")
        def test_image(bottle_factory):
            bottle_factory(image="no-such-image")
        """
    )
    result = run(pytester, "test_hidden.py")
    result.assert_outcomes(failed=2)
    assert "bottle_factory() arguments: bad cpus" in result.stdout.str()
    assert "bottle_factory() arguments: unknown image 'no-such-image'" in result.stdout.str()
    pytester.makeini("[pytest]\nbottle_memory = banana\n")
    result = run(pytester, "--bottle-memory=1G", "test_hidden.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini file tox.ini: bad memory" in result.stderr.str()


def test_a_bad_marker_under_xdist_fails_its_test_with_the_message(pytester: pytest.Pytester) -> None:
    """xdist turns a worker's usage error at collection into an INTERNALERROR that hides it."""
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.bottle(memory="lots")
        def test_badmem(bottle):
            pass

        def test_fine():
            pass
        """
    )
    result = run(pytester, "-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=1, errors=1)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert "@pytest.mark.bottle on test_bad.py::test_badmem: bad memory" in result.stdout.str()
    result.stdout.fnmatch_lines(["InvalidBottleArgument: @pytest.mark.bottle on test_bad.py::test_badmem: bad memory*"])
    assert "pytest_bottle" not in result.stdout.str()  # the message alone: no line of the plugin's code


def test_bad_ini_value_names_the_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nbottle_memory = huge\n")
    pytester.makepyfile("def test_x(): pass")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini file tox.ini: bad memory" in result.stderr.str()
    # It names the file pytest read: "ini file" alone left a user with several guessing.
    (pytester.path / "tox.ini").unlink()
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nbottle_cpus = "two"\n')
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ERROR: ini file pyproject.toml: bad cpus" in result.stderr.str(), result.stderr.str()
    sub = pytester.mkdir("sub")
    (sub / "pytest.ini").write_text("[pytest]\nbottle_memory = huge\n")
    result = pytester.runpytest_subprocess(
        f"--bottle-cache-dir={CACHE}", "-p", "no:cacheprovider", "--rootdir=.", "sub"
    )
    assert f"ERROR: ini file {sub / 'pytest.ini'}: bad memory" in result.stderr.str(), result.stderr.str()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["-o", "bottle_memory=1.5X"], "-o on the command line: bad memory"),
        (["-o", "bottle_keep=maybe"], "-o on the command line: bad bottle_keep: invalid truth value 'maybe'"),
        (["-o", "bottle_prestart=9"], "-o on the command line: bad prestart"),
        (["-o", "bottle_image=debian-trixie,"], "-o on the command line: bad image list"),
        (["-o", "bottle_cpus=2", "-o", "bottle_memory=1.5X"], "-o on the command line: bad memory"),
    ],
)
def test_a_bad_value_given_with_o_names_the_command_line(pytester: pytest.Pytester, args: list[str], said: str) -> None:
    """-o overrides an ini value from the command line: it was reported as the ini file's."""
    pytester.makeini("[pytest]\nbottle_cpus = 1\n")
    pytester.makepyfile("def test_x(): pass")
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert said in result.stderr.str(), result.stderr.str()


@pytest.mark.parametrize("name", ["keep", "rebuild", "save_failed"])
def test_a_bad_bool_in_the_ini_names_the_setting(pytester: pytest.Pytester, name: str) -> None:
    pytester.makeini(f"[pytest]\nbottle_{name} = maybe\n")
    pytester.makepyfile("def test_x(): pass")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"ini file tox.ini: bad bottle_{name}: invalid truth value 'maybe'" in result.stderr.str()


def test_factory_bad_argument_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        from pytest_bottle import SpecError

        def test_it(bottle_factory):
            with pytest.raises(pytest.UsageError, match=r"bottle_factory\\(\\) arguments: bad memory"):
                bottle_factory(memory="lots")
            with pytest.raises(SpecError):
                bottle_factory(network="wifi")
    """)
    run(pytester).assert_outcomes(passed=1)


def test_an_indirect_parameter_of_a_bottle_fixture_is_refused_not_ignored(pytester: pytest.Pytester) -> None:
    # it was ignored: {"memory": "300M"} gave a 512M bottle, and "junk" passed
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parametrize("bottle", [{"memory": "300M"}], indirect=True)
        def test_fresh(bottle):
            pass

        @pytest.mark.parametrize("module_bottle", ["junk"], indirect=True)
        def test_module(module_bottle):
            pass

        @pytest.mark.parametrize("bottle_factory", [1], indirect=["bottle_factory"])
        def test_factory(bottle_factory):
            pass
    """)
    # A user's fixture of the same name with params= passes its param down to ours: theirs, not refused.
    pytester.makepyfile(
        test_override="""
        import pytest

        @pytest.fixture(params=["a", "b"])
        def bottle_factory(request, bottle_factory):
            return request.param, bottle_factory

        def test_own_params(bottle_factory):
            assert bottle_factory[0] in ("a", "b") and callable(bottle_factory[1])
    """
    )
    result = run(pytester)
    result.assert_outcomes(errors=3, passed=2)
    said = result.stdout.str()
    # the short summary repeats each error in full where CI is set (pytest does not cut its lines there)
    sections = said.split("short test summary info")[0]
    assert sections.count("InvalidBottleArgument: @pytest.mark.parametrize on test_an_indirect_parameter") == 3
    for fixture, param in (("bottle", "{'memory': '300M'}"), ("module_bottle", "'junk'"), ("bottle_factory", "1")):
        assert f"the {fixture} fixture takes no parameter (indirect parametrization gave it {param})" in said
    assert "marks=pytest.mark.bottle(" in said and "console" not in said  # refused before any VM started


def test_more_memory_than_the_host_has_is_a_usage_error_naming_its_source(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_marked="""
        import pytest

        @pytest.mark.bottle(memory="4T")
        def test_it(bottle):
            pass
        """,
        test_factory="""
        import pytest

        def test_it(bottle_factory):
            with pytest.raises(pytest.UsageError, match=r"^bottle_factory\\(\\) arguments: bad memory: '4T' \\(4194304M\\) is more"):
                bottle_factory(memory="4T")
        """,
    )
    result = run(pytester, "test_marked.py")  # at setup, nothing booted (it may be skipped or deselected)
    result.assert_outcomes(errors=1)
    assert "@pytest.mark.bottle on test_marked.py::test_it: bad memory: '4T' (4194304M) is more" in result.stdout.str()
    run(pytester, "test_factory.py").assert_outcomes(passed=1)
    pytester.makepyfile(test_plain="def test_it(bottle): pass")
    result = run(pytester, "test_plain.py", "--bottle-memory", "4T")  # checked where the VM is to run
    result.assert_outcomes(errors=1)
    assert "InvalidBottleArgument: command line: bad memory: '4T' (4194304M) is more" in result.stdout.str()


def test_scopes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_a="""
        def test_write(bottle):
            bottle.write_text("/root/mark", "1")

        def test_fresh(bottle):
            assert bottle.exec("test -e /root/mark").returncode == 1

        def test_module_1(module_bottle):
            module_bottle.write_text("/root/shared", module_bottle.name)

        def test_module_2(module_bottle):
            assert module_bottle.read_text("/root/shared") == module_bottle.name
    """,
        test_b="""
        def test_other_module(module_bottle):
            assert module_bottle.exec("test -e /root/shared").returncode == 1

        def test_session(session_bottle):
            session_bottle.write_text("/root/s", "x")

        def test_session_again(session_bottle):
            assert session_bottle.read_text("/root/s") == "x"
    """,
    )
    run(pytester, "-p", "no:randomly").assert_outcomes(passed=7)


def test_failure_report_has_console_and_commands(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_fails(bottle):
            bottle.exec("echo preparing")
            # A guest's escape sequences (a title, a cleared screen) shown, not obeyed.
            bottle.exec("printf '\\033]0;pwned\\007\\033[2J' | tee /dev/console")
            assert bottle.exec("exit 3").ok
    """)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*bottle btl-* console (last 50 lines)*",
            # the seed's boot, long before: a few lines of it, then the bottle's own
            "[[]pytest-bottle: * earlier lines, from before the restore, not shown]",
            "[[]pytest-bottle: btl-* restored from *",
            "*\\x1b]0;pwned\\x07\\x1b[[]2J*",
            "*bottle btl-* last commands*",
            "*[[]0] *echo preparing*",
            "*\\x1b]0;pwned\\x07\\x1b[[]2J*",
            "*[[]3] *exit 3*",
        ]
    )
    assert "\x1b" not in result.stdout.str()
    section = result.stdout.str().partition(" console (last 50 lines) ")[2].partition("restored from")[0]
    assert section.count("\n") == 1 + 1 + 5, section  # the title's end, the note, five lines of the seed's boot


def test_a_failure_whose_command_has_a_name_that_is_not_utf8_is_reported_under_xdist(
    pytester: pytest.Pytester,
) -> None:
    # the "last commands" section kept the lone surrogate: xdist's channel refused the
    # report, the worker crashed, and the run said "1 passed" with exit code 0
    pytester.makepyfile("""
        import os

        def test_fails(bottle):
            bottle.exec(["touch", os.fsdecode(b"/tmp/caf\\xe9.txt")])
            bottle.exec("echo " + os.fsdecode(b"\\xff"))
            assert False

        def test_after():
            pass
    """)
    result = run(pytester, "-n", "1", "-p", "xdist")
    result.assert_outcomes(failed=1, passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*bottle btl-* last commands*", "*[[]0] *touch /tmp/caf\\xe9.txt*", "*echo \\xff*"])
    assert "INTERNALERROR" not in result.stdout.str()


def test_a_teardown_failure_reports_the_bottle_once(pytester: pytest.Pytester) -> None:
    """A fixture failing in teardown got no bottle sections; after a failed
    call, its teardown error must not repeat them."""
    pytester.makepyfile("""
        import pytest

        @pytest.fixture
        def broken_cleanup(bottle):
            yield bottle
            raise RuntimeError("cleanup failed")

        def test_passes_then_cleanup_fails(broken_cleanup):
            broken_cleanup.exec("echo in-teardown-test")

        def test_fails_then_cleanup_fails(broken_cleanup):
            broken_cleanup.exec("echo in-failed-test")
            assert False

        @pytest.fixture
        def broken_factory(bottle_factory):
            yield bottle_factory
            raise RuntimeError("cleanup failed")

        def test_factory_then_cleanup_fails(broken_factory):
            broken_factory().exec("echo from-the-factory")
    """)
    result = run(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1, errors=3)
    out = result.stdout.str()
    assert out.count("last commands") == 3, out
    assert out.count("echo from-the-factory") == 1, out  # its group was closed before the report
    assert out.count("echo in-teardown-test") == 1 and out.count("echo in-failed-test") == 2, out


# A conftest hook that prints how many bottle sections a test's call report has.
SECTIONS_HOOK = """
        def pytest_runtest_logreport(report):
            if report.when == "call":
                names = [t for t, _ in report.sections if t.startswith("bottle ")]
                print(f"SECTIONS {report.nodeid.split('::')[-1]} {len(names)}")
"""


def test_a_session_factory_bottle_is_in_the_report_of_the_test_that_made_it(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SECTIONS_HOOK)
    pytester.makepyfile("""
        def test_a_makes_one_and_fails(session_bottle_factory):
            b = session_bottle_factory()
            b.exec("echo from-the-session-factory")
            assert False

        def test_b_fails_without_making_one(session_bottle_factory):
            assert False
    """)
    result = run(pytester, "-p", "no:randomly", "-s")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["*SECTIONS test_a_makes_one_and_fails 2*", "*SECTIONS test_b_fails_without_making_one 0*"]
    )
    result.stdout.fnmatch_lines(["*bottle btl-* last commands*", "*[[]0] *echo from-the-session-factory*"])


def test_a_test_run_again_after_a_failure_reports_its_bottle_again(pytester: pytest.Pytester) -> None:
    """What pytest-rerunfailures does: the item's protocol runs twice; the
    failure reported at the end had no console section."""
    pytester.makeconftest(
        """
        import pytest
        from _pytest.runner import runtestprotocol

        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_protocol(item, nextitem):
            item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
            for attempt in (1, 2):
                reports = runtestprotocol(item, nextitem=nextitem, log=False)
                if attempt == 2:
                    for r in reports:
                        item.ihook.pytest_runtest_logreport(report=r)
            item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
            return True
    """
        + SECTIONS_HOOK
    )
    pytester.makepyfile("""
        def test_fails(bottle):
            bottle.exec("echo in-the-failing-test")
            assert False
    """)
    result = run(pytester, "-p", "no:randomly", "-s")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*SECTIONS test_fails 2*"])


def test_deselect_and_disable(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_plain():
            pass

        def test_vm(bottle):
            pass

        def test_factory(bottle_factory):
            pass
    """)
    result = run(pytester, "-m", "not bottle", "--strict-markers")
    result.assert_outcomes(passed=1, deselected=2)
    result = pytester.runpytest_subprocess("-p", "no:bottle", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*fixture 'bottle' not found*"])


def test_only_our_fixtures_mark_a_test(pytester: pytest.Pytester) -> None:
    """A ``bottle`` argument that parametrize gives, or a fixture of the user's
    own of one of our names, is no VM: ``-m "not bottle"`` keeps such tests."""
    pytester.makepyfile("""
        import pytest

        @pytest.fixture
        def bottle_factory():
            return "mine"

        @pytest.fixture
        def session_bottle(session_bottle):  # wraps ours: still a VM
            return session_bottle

        @pytest.mark.parametrize("bottle", [1, 2])
        def test_direct(bottle):
            assert bottle in (1, 2)

        def test_own(bottle_factory):
            assert bottle_factory == "mine"

        def test_wrapped(session_bottle):
            pass

        def test_image(bottle_image):
            pass
    """)
    result = run(pytester, "-m", "not bottle", "--strict-markers")
    result.assert_outcomes(passed=3, deselected=2)


def test_a_conftests_collection_hook_sees_the_bottle_mark_of_tests_that_only_use_fixtures(
    pytester: pytest.Pytester,
) -> None:
    """ "Skip every VM test here" in a conftest (get_closest_marker("bottle")) ran
    before the plugin had marked them: a test that only used a fixture booted."""
    pytester.makeconftest("""
        import pytest

        def pytest_collection_modifyitems(config, items):
            for item in items:
                if item.get_closest_marker("bottle") is not None:
                    item.add_marker(pytest.mark.skip(reason="no VMs on this runner"))
    """)
    pytester.makepyfile("""
        import pytest

        def test_plain():
            pass

        def test_vm(bottle):
            raise AssertionError("booted")

        def test_factory(bottle_factory):
            raise AssertionError("booted")

        @pytest.mark.bottle(memory="1G")
        def test_marked(bottle):
            raise AssertionError("booted")
    """)
    run(pytester).assert_outcomes(passed=1, skipped=3)


def test_help_shows_with_a_bad_setting_to_mend(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("-o", "bottle_memory=banana", "--help", "-p", "no:cacheprovider")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*--bottle-memory*"])
    result = run(pytester, "-o", "bottle_memory=banana")  # a run still refuses it
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_report_header(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = run(pytester, "--bottle-image=debian-bookworm-minimal")
    result.stdout.fnmatch_lines([f"bottle: image debian-bookworm-minimal, accel *, cache {CACHE}"])


def test_report_header_keeps_a_failed_probes_reason_short(pytester: pytest.Pytester) -> None:
    """A failed KVM probe's reason can quote all of a QEMU assertion (~250
    characters here): the header, one line, cuts it and says where the rest is."""
    cache = pytester.path / "cache"
    cache.mkdir(mode=0o700)
    reason = "KVM is present but a test boot failed: QEMU exited with -6: " + "assertion text " * 15
    verdict = {"host": host_id(), "accel": "tcg", "reason": reason, "definite": True, "run": "x"}
    (cache / "accel.json").write_text(json.dumps(verdict))
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(f"--bottle-cache-dir={cache}", "-p", "no:cacheprovider")
    header = [line for line in result.outlines if line.startswith("bottle: image")]
    assert len(header) == 1 and f"accel tcg ({reason[:100]}…; bottle doctor says all), cache {cache}" in header[0]
    assert len(header[0]) <= 180 + len(str(cache)), header
    # asking for kvm where the stored probe failed: each bottle will fail, and the header says so up front
    result = pytester.runpytest_subprocess(
        f"--bottle-cache-dir={cache}", "--bottle-accel=kvm", "-p", "no:cacheprovider"
    )
    header = [line for line in result.outlines if line.startswith("bottle: image")]
    expected = f"accel kvm (requested, but {reason[:100]}…; bottle doctor says all: each bottle fails to start)"
    assert len(header) == 1 and expected in header[0], header


def test_bottle_image_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_image(bottle_image):
            assert bottle_image.name == "debian-bookworm"
            assert bottle_image.rootfs.is_file() and bottle_image.kernel.is_file()
    """)
    run(pytester).assert_outcomes(passed=1)


def test_xdist_two_workers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_vm(bottle, i):
            assert bottle.check_output("hostname").strip() == bottle.name
            bottle.write_text("/root/i", str(i))
    """)
    result = run(pytester, "-n", "2")
    result.assert_outcomes(passed=6)


def test_keep_leaves_a_failed_vm_running(pytester: pytest.Pytester, stop_kept: list[str]) -> None:
    pytester.makepyfile("""
        def test_passes(bottle):
            open("passed.txt", "w").write(bottle.name)

        def test_fails(bottle):
            open("failed.txt", "w").write(bottle.name)
            assert False

        def test_stops_then_fails(bottle):
            import time
            open("stopped.txt", "w").write(bottle.name)
            bottle.exec("systemctl poweroff --no-block")
            deadline = time.monotonic() + 120
            while bottle.vm_running() and time.monotonic() < deadline:  # QEMU gone, not only the agent
                time.sleep(0.2)
            open("vm_running.txt", "w").write(str(bottle.vm_running()))
            assert False
    """)
    result = run(pytester, "--bottle-keep")
    passed, failed = (pytester.path / "passed.txt").read_text(), (pytester.path / "failed.txt").read_text()
    stopped = (pytester.path / "stopped.txt").read_text()
    stop_kept.extend([failed, passed, stopped])  # stopped whatever happens below
    result.assert_outcomes(passed=1, failed=2)
    assert (pytester.path / "vm_running.txt").read_text() == "False", "its QEMU did not end within 120 s of poweroff"
    # a VM that stopped in its failing test is not reported as running, nor listed
    result.stdout.fnmatch_lines(
        [
            "*bottles not kept (--bottle-keep): they had stopped*",
            f"{stopped}: not kept: it had stopped before*report of test_*.py::test_stops_then_fails)",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*bottles kept running (--bottle-keep)*",
            f"{failed}: QEMU pid *",
            "  kept for:  test_*.py::test_fails",
            "*reach it:  ssh -F * btl-*",
            "*stop it:   bottle stop btl-*",
        ]
    )
    assert re.findall(r"stop it:\s+bottle stop (btl-\w+)", result.stdout.str()) == [failed]
    ps = subprocess.run([sys.executable, "-m", "pytest_bottle.cli", "ps"], capture_output=True, text=True)
    assert re.search(rf"{failed}\s+kept", ps.stdout), ps.stdout
    assert passed not in ps.stdout, "the passing test's VM was kept too"
    assert stopped not in ps.stdout, ps.stdout
    config = re.search(r"ssh -F (\S+) " + failed, result.stdout.str()).group(1)  # type: ignore[union-attr]
    ssh = subprocess.run(["ssh", "-F", config, failed, "hostname"], capture_output=True, text=True, timeout=60)
    assert ssh.stdout.strip() == failed, ssh.stderr
    stop = subprocess.run([sys.executable, "-m", "pytest_bottle.cli", "stop", failed], capture_output=True, text=True)
    assert stop.returncode == 0, stop.stderr
    ps = subprocess.run([sys.executable, "-m", "pytest_bottle.cli", "ps"], capture_output=True, text=True)
    assert failed not in ps.stdout


# Read in the run's own process after the plugin closed everything: no other
# run's sweep can have tidied up for it by then (its records' owner is alive).
AFTER_RUN = """
import json, os
from pathlib import Path
import psutil, pytest
from pytest_bottle.plugin import STATE
from pytest_bottle.host.runstate import RunRecord

@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if STATE not in config.stash:  # a usage error stopped the run before it began
        return
    qemu = [p.pid for p in psutil.Process().children(recursive=True)
            if p.name().startswith("qemu") and p.status() != psutil.STATUS_ZOMBIE]
    Path("after.json").write_text(json.dumps({
        "records": [r.name for r in RunRecord.load_all() if r.owner_pid == os.getpid()],
        "qemu": qemu,
        "stats": dict(config.stash[STATE].manager.stats),
    }))
"""


def test_prestart_hands_out_fresh_bottles_and_leaves_none(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(AFTER_RUN)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_vm(bottle, i):
            assert bottle.exec("test -e /root/used").returncode == 1  # never used before
            bottle.write_text("/root/used", str(i))
            with open("names.txt", "a") as f:
                f.write(bottle.name + "\\n")
    """)
    run(pytester, "--bottle-prestart=1").assert_outcomes(passed=4)
    names = (pytester.path / "names.txt").read_text().split()
    assert len(set(names)) == 4
    after = json.loads((pytester.path / "after.json").read_text())
    assert after["records"] == [] and after["qemu"] == [], "a bottle (the spare?) was left behind"
    # Every test after the first got a spare: a failing spare would fall back to a fresh start unseen.
    assert after["stats"] == {"spare_used": 3}, after["stats"]
    result = run(pytester, "--bottle-prestart=many")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "command line: bad prestart" in result.stderr.str()


@pytest.mark.skipif(pytest.version_tuple[:2] < (9, 2), reason="[tool.pytest] with typed unions is pytest 9.2's")
def test_numbers_and_lists_in_a_pyproject_are_taken_as_toml_writes_them(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        from pytest_bottle.plugin import STATE
        from pytest_bottle.matrix import IMAGES

        def test_spec(request):
            spec = request.config.stash[STATE].spec()
            assert (spec.cpus, spec.memory_mb, spec.timeout) == (2, 640, 600.5)
            assert request.config.stash[STATE].manager.prestart == 0
            assert request.config.stash[IMAGES] == ("debian-bookworm", "debian-trixie")
            assert request.config.getini("bottle_rebuild") is False
    """)
    native = "[tool.pytest]\nbottle_cpus = 2\nbottle_memory = 640\nbottle_timeout = 600.5\nbottle_prestart = 0\n"
    pytester.makepyprojecttoml(native + 'bottle_image = "debian-bookworm,debian-trixie"\nbottle_rebuild = false\n')
    run(pytester).assert_outcomes(passed=1)
    pytester.makepyprojecttoml(native + 'bottle_rebuild = "false"\n')  # a flag takes a TOML boolean only
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "bad bottle_rebuild" in result.stderr.str()
    # The older table: numbers reach pytest as strings, a list stays a list.
    pytester.makepyprojecttoml(native.replace("[tool.pytest]", "[tool.pytest.ini_options]").replace("600.5", '"600.5"')
                               + 'bottle_image = ["debian-bookworm", "debian-trixie"]\n')  # fmt: skip
    run(pytester, "-W", "ignore::pytest.PytestRemovedIn10Warning").assert_outcomes(passed=1)
    # pytest deprecates that list: made an error, it is a usage error naming the setting, not a crash
    result = run(pytester, "-W", "error::pytest.PytestRemovedIn10Warning")
    assert (
        result.ret == pytest.ExitCode.USAGE_ERROR and "ini file pyproject.toml: bad bottle_image" in result.stderr.str()
    )
    pytester.makepyprojecttoml("[tool.pytest]\nbottle_cpus = 0\n")  # set, and refused: not read as unset
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "ini file pyproject.toml: bad cpus" in result.stderr.str()


def test_fixtures_lists_the_public_fixtures_with_their_docs_and_no_empty_section(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    result = run(pytester, "--fixtures")
    assert result.ret == 0
    sections = re.split(r"^-+ fixtures defined from (\S+) -+$", result.stdout.str(), flags=re.M)
    ours = {
        name: body
        for name, body in zip(sections[1::2], sections[2::2], strict=True)
        if name.startswith("pytest_bottle")
    }
    assert list(ours) == ["pytest_bottle.plugin"], list(ours)  # the matrix's private fixture made an empty one
    listed = re.findall(r"^(\w+)(?: \[\w+ scope\])? -- .+\n +\S", ours["pytest_bottle.plugin"], flags=re.M)
    public = ["bottle", "bottle_factory", "module_bottle", "session_bottle", "session_bottle_factory", "bottle_image"]
    assert sorted(listed) == sorted(public), listed


def test_pytest_main_in_a_process_that_lives_on_puts_the_signal_defaults_back(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_x():\n    pass\n")
    script = (
        "import signal, pytest\n"
        f"rc = pytest.main(['-q', '-p', 'no:cacheprovider', '--bottle-cache-dir={CACHE}', 'test_plain.py'])\n"
        "print('rc', int(rc), signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGHUP) == signal.SIG_DFL)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=pytester.path, capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines()[-1] == "rc 0 True", out.stdout + out.stderr
