"""The image matrix: ``--bottle-image a,b`` runs bottle tests once per image (issue 16)."""

from __future__ import annotations

import re

import pytest

from pytest_bottle.host.paths import default_cache_dir

CACHE = str(default_cache_dir())
BOTH = "--bottle-image=debian-bookworm,debian-trixie"

TESTS = """
import pytest

def test_plain():
    pass

def test_vm(bottle):
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_param(bottle_factory, n):
    pass

@pytest.mark.bottle(image="debian-trixie-minimal")
def test_pinned(bottle):
    pass

def test_module(module_bottle):
    pass
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(f"--bottle-cache-dir={CACHE}", "-p", "no:cacheprovider", *args)


def collected(result: pytest.RunResult) -> list[str]:
    return sorted(line.split("::", 1)[1] for line in result.outlines if "::" in line)


def test_a_list_runs_each_bottle_test_once_per_image(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=TESTS)
    result = run(pytester, "--collect-only", "-q", "-p", "no:randomly", BOTH)
    assert collected(result) == sorted(
        [
            "test_plain",
            "test_vm[debian-bookworm]",
            "test_vm[debian-trixie]",
            "test_param[1-debian-bookworm]",
            "test_param[1-debian-trixie]",
            "test_param[2-debian-bookworm]",
            "test_param[2-debian-trixie]",
            "test_pinned",  # its marker names an image: once, on that image
            "test_module[debian-bookworm]",
            "test_module[debian-trixie]",
        ]
    ), result.stdout.str()
    # One image's tests together: its seed stays warm and the spare matches the next test.
    order = [line for line in result.outlines if "trixie]" in line or "bookworm]" in line]
    firsts = [i for i, line in enumerate(order) if "trixie]" in line]
    assert firsts == list(range(firsts[0], len(order))), order


def test_a_case_whose_own_marker_names_an_image_runs_once(pytester: pytest.Pytester) -> None:
    """``pytest.param(..., marks=pytest.mark.bottle(image=...))``: the marker wins
    over the matrix, so its other copies would run on the same image under
    another image's id; they are deselected."""
    pytester.makepyfile(
        test_m="""
        import pytest

        @pytest.mark.parametrize("v", [
            1,
            pytest.param(2, marks=pytest.mark.bottle(image="debian-trixie")),
            pytest.param(3, marks=pytest.mark.bottle(image="debian-trixie-minimal")),
        ])
        def test_p(bottle, v):
            pass
        """
    )
    result = run(pytester, "--collect-only", "-q", "-p", "no:randomly", BOTH)
    assert collected(result) == [
        "test_p[1-debian-bookworm]",
        "test_p[1-debian-trixie]",
        "test_p[2-debian-trixie]",  # its own image's copy
        "test_p[3-debian-bookworm]",  # an image not in the list: the first copy (it runs on trixie-minimal)
    ], result.stdout.str()
    result.stdout.fnmatch_lines(["4/6 tests collected (2 deselected)*"])
    # A case whose own image's copy -k deselects does not run under the other image's id.
    result = run(pytester, "--collect-only", "-q", "-p", "no:randomly", BOTH, "-k", "debian-bookworm]")
    assert collected(result) == ["test_p[1-debian-bookworm]", "test_p[3-debian-bookworm]"], result.stdout.str()


def test_a_bottle_argument_a_hook_parametrizes_runs_once_unmarked(pytester: pytest.Pytester) -> None:
    """A conftest's ``pytest_generate_tests`` that gives ``bottle`` values of its own
    leaves no VM in the test: it was still copied per image, and ``-m "not bottle"``
    ran each copy of a test that no image changes."""
    pytester.makeconftest(
        """
        def pytest_generate_tests(metafunc):
            if metafunc.function.__name__ == "test_direct":
                metafunc.parametrize("bottle", ["a", "b"])
        """
    )
    pytester.makepyfile(test_m="def test_direct(bottle):\n    assert bottle in 'ab'\ndef test_vm(bottle):\n    pass\n")
    result = run(pytester, "-q", "-p", "no:randomly", BOTH, "-m", "not bottle")
    result.assert_outcomes(passed=2, deselected=4)  # test_vm's 2 copies by -m, test_direct's by image
    result = run(pytester, "--collect-only", "-q", "-p", "no:randomly", BOTH)
    assert collected(result) == [
        "test_direct[a-debian-bookworm]",
        "test_direct[b-debian-bookworm]",
        "test_vm[debian-bookworm]",
        "test_vm[debian-trixie]",
    ], result.stdout.str()


def test_a_test_runs_once_when_markers_choose_the_image_of_each_of_its_bottles(pytester: pytest.Pytester) -> None:
    """module_bottle follows the module's pytestmark, not the test's own marker:
    a test of a pinned module with a marker of its own ran 2 identical VMs under
    2 image ids. A marker a conftest hook adds is read too (its hook ran after the matrix's)."""
    pytester.makepyfile(
        test_pinned_module="""
        import pytest
        pytestmark = pytest.mark.bottle(image="debian-trixie-minimal")

        @pytest.mark.bottle(cpus=1)
        def test_shared(module_bottle):  # the module's image
            pass

        @pytest.mark.bottle(cpus=1)
        def test_own(bottle):  # its own marker replaces the module's: the matrix decides
            pass

        @pytest.mark.bottle(cpus=1)
        def test_both(bottle, module_bottle):
            pass
        """,
        test_free_module="""
        import pytest

        @pytest.mark.bottle(image="debian-trixie-minimal")
        def test_pinned_with_a_free_module_bottle(bottle, module_bottle):
            pass

        def test_hook_pins(bottle):
            pass
        """,
    )
    pytester.makeconftest(
        """
        import pytest

        def pytest_collection_modifyitems(items):
            for item in items:
                if "hook_pins" in item.name:
                    item.add_marker(pytest.mark.bottle(image="debian-trixie"))
        """
    )
    result = run(pytester, "--collect-only", "-q", "-p", "no:randomly", BOTH)
    assert collected(result) == sorted(
        [
            "test_shared",
            "test_own[debian-bookworm]",
            "test_own[debian-trixie]",
            "test_both[debian-bookworm]",
            "test_both[debian-trixie]",
            "test_pinned_with_a_free_module_bottle[debian-bookworm]",
            "test_pinned_with_a_free_module_bottle[debian-trixie]",
            "test_hook_pins[debian-trixie]",
        ]
    ), result.stdout.str()


def test_one_image_keeps_the_ids(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=TESTS)
    result = run(pytester, "--collect-only", "-q", "--bottle-image=debian-trixie")
    assert "[debian" not in result.stdout.str()
    assert len(collected(result)) == 6


@pytest.mark.parametrize(
    ("expression", "images"),
    [
        ("debian-trixie", {"debian-trixie", "debian-trixie-minimal"}),  # a substring: the minimal twin too
        ("debian-trixie and not minimal", {"debian-trixie"}),
        ("debian-trixie]", {"debian-trixie"}),  # the image ends the id
    ],
)
def test_k_selects_one_image(pytester: pytest.Pytester, expression: str, images: set[str]) -> None:
    # The expressions docs/reference.md and docs/howto.md give for "this image's tests only".
    pytester.makepyfile(test_m=TESTS)
    matrix = "--bottle-image=debian-bookworm,debian-trixie,debian-trixie-minimal"
    result = run(pytester, "--collect-only", "-q", matrix, "-k", expression)
    ids = collected(result)
    assert {re.sub(r".*\[(\d-)?(.+)\]$", r"\2", i) for i in ids} == images, ids
    assert len(ids) == 4 * len(images), ids  # test_vm, test_param x2, test_module per image


def test_ini_list_whitespace_or_commas_and_the_header(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=TESTS)
    pytester.makeini("[pytest]\nbottle_image =\n    debian-trixie\n    debian-bookworm-minimal,debian-bookworm\n")
    result = run(pytester, "--collect-only", "-q")
    ids = collected(result)
    assert {"test_vm[debian-trixie]", "test_vm[debian-bookworm-minimal]", "test_vm[debian-bookworm]"} <= set(ids)
    result = run(pytester, "-m", "not bottle")
    result.stdout.fnmatch_lines(
        ["bottle: images debian-trixie, debian-bookworm-minimal, debian-bookworm, accel *, cache *"]
    )
    result.assert_outcomes(passed=1, deselected=13)
    # The command line's list (or name) replaces the ini's, which is still checked.
    result = run(pytester, "--collect-only", "-q", "--bottle-image=debian-bookworm")
    assert result.ret == pytest.ExitCode.OK and len(collected(result)) == 6, result.stdout.str() + result.stderr.str()
    assert "[debian" not in result.stdout.str()
    result = run(pytester, "--collect-only", "-q", "--bottle-image=debian-bookworm,debian-trixie")
    assert result.ret == pytest.ExitCode.OK and "test_vm[debian-trixie]" in collected(result)
    pytester.makeini("[pytest]\nbottle_image = debian-trixie,debian-tixie\n")
    result = run(pytester, "--collect-only", "-q", "--bottle-image=debian-bookworm")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini file tox.ini: unknown image 'debian-tixie'" in result.stderr.str()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("debian-bookworm,debian-tixie", r"command line: unknown image 'debian-tixie'; known images: .*debian-trixie"),
        ("debian-tixie", r"command line: unknown image 'debian-tixie'; known images: .*debian-trixie"),
        ("debian-tixie", r"named\(\) name is known to options only from a plugin or a conftest.py pytest loads before"),
        ("debian-bookworm,,debian-trixie", r"command line: bad image list .*: entry 2 is empty"),
        ("debian-trixie,", r"command line: bad image list .*: entry 2 is empty"),
        (" ", r"command line: bad image list .*: entry 1 is empty"),
        ("debian-trixie debian-bookworm,debian-trixie", r"'debian-trixie' is listed twice"),
    ],
)
def test_bad_lists_are_usage_errors_naming_the_entry(pytester: pytest.Pytester, value: str, expected: str) -> None:
    pytester.makepyfile(test_m="def test_vm(bottle): pass")
    result = run(pytester, f"--bottle-image={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert re.search(expected, result.stderr.str()), result.stderr.str()
    assert "Traceback" not in result.stderr.str()


def test_one_name_with_whitespace_around_it_is_that_name(pytester: pytest.Pytester) -> None:
    """Whitespace separates names in a list; around a single name it is nothing."""
    pytester.makepyfile(test_m="def test_plain(): pass\ndef test_vm(bottle): pass")
    result = run(pytester, "-m", "not bottle", "--bottle-image= debian-trixie ")
    assert result.ret == pytest.ExitCode.OK, result.stderr.str()
    result.stdout.fnmatch_lines(["bottle: image debian-trixie,*"])
    result.assert_outcomes(passed=1, deselected=1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("debian-trixie,", "ini file tox.ini: bad image list 'debian-trixie,': entry 2 is empty"),
        ("debian-trixie,debian-tixie", "ini file tox.ini: unknown image 'debian-tixie'; known images: "),
        ("debian-bookworm debian-tixie", "ini file tox.ini: unknown image 'debian-tixie'; known images: "),
        ("debian-tixie", "ini file tox.ini: unknown image 'debian-tixie'; known images: "),
    ],
)
def test_bad_ini_list_names_the_ini(pytester: pytest.Pytester, value: str, expected: str) -> None:
    pytester.makepyfile(test_m="def test_vm(bottle): pass")
    pytester.makeini(f"[pytest]\nbottle_image = {value}\n")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert expected in result.stderr.str(), result.stderr.str()


MATRIX_RUN = """
import pytest

CODENAME = "grep -o 'VERSION_CODENAME=.*' /etc/os-release"
SESSION = {}

def release(b):
    return b.check_output(CODENAME).strip().split("=")[1]

def image_of(request):
    return request.node.callspec.params["_bottle_matrix_image"]

def test_bottle(bottle, bottle_image, request):
    assert bottle.image == image_of(request) == bottle_image.name
    assert release(bottle) == image_of(request).split("-")[1]

def test_factory_default_and_override(bottle_factory, bottle_image, request):
    assert bottle_factory().image == image_of(request)
    assert bottle_factory(image=bottle_image).image == image_of(request)  # the fixture's value is an image too
    assert bottle_factory(image="debian-bookworm-minimal").image == "debian-bookworm-minimal"

def test_module_1(module_bottle, request):
    assert release(module_bottle) == image_of(request).split("-")[1]
    module_bottle.write_text("/root/shared", image_of(request))

def test_module_2(module_bottle, request):
    assert module_bottle.read_text("/root/shared") == image_of(request)

@pytest.mark.parametrize("n", [1, 2])
def test_session(session_bottle, request, n):
    assert session_bottle.image == image_of(request)
    assert SESSION.setdefault(image_of(request), session_bottle.name) == session_bottle.name
    assert len(set(SESSION.values())) == len(SESSION)  # one per image

@pytest.mark.bottle(image="debian-trixie")
def test_pinned(bottle, request):
    assert not hasattr(request.node, "callspec") and release(bottle) == "trixie"
"""


@pytest.mark.slow
def test_fixtures_follow_the_image_of_their_parameter(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=MATRIX_RUN)
    result = run(pytester, "-p", "no:randomly", "-v", BOTH)
    result.assert_outcomes(passed=13)
    result.stdout.fnmatch_lines_random(["*test_session[[]2-debian-trixie] PASSED*", "*test_pinned PASSED*"])


@pytest.mark.slow
def test_matrix_under_xdist(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_m="""
        import pytest

        @pytest.mark.parametrize("i", range(3))
        def test_vm(bottle, i, request):
            assert bottle.check_output("hostname").strip() == bottle.name
            # The release that booted is the one in the id (bookworm is 12, trixie 13).
            image = request.node.callspec.params["_bottle_matrix_image"]
            version = bottle.check_output(". /etc/os-release && echo $VERSION_ID").strip()
            assert (image, version) in {("debian-bookworm", "12"), ("debian-trixie", "13")}
            print(f"BOOTED {request.node.name} {version}")
    """
    )
    result = run(pytester, "-n", "2", "-rA", BOTH)
    result.assert_outcomes(passed=6)
    booted = sorted(line.split("BOOTED ", 1)[1] for line in result.outlines if line.startswith("BOOTED "))
    assert booted == sorted(
        [f"test_vm[{i}-debian-bookworm] 12" for i in range(3)] + [f"test_vm[{i}-debian-trixie] 13" for i in range(3)]
    ), result.stdout.str()


def _collect_with_a_conftest_matrix(pytester: pytest.Pytester, names: str) -> pytest.RunResult:
    """Collect a bottle test that a conftest puts on ``matrix.parametrize(metafunc, NAMES)``."""
    pytester.makeconftest(
        f"""
        from pytest_bottle import matrix

        def pytest_generate_tests(metafunc):
            matrix.parametrize(metafunc, {names})
        """
    )
    pytester.makepyfile(test_m="def test_vm(bottle):\n    pass\n")
    return run(pytester, "--collect-only", "-q")


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ('["debian-bookworm", "no-such-image"]', "pytest_bottle.matrix.parametrize(): unknown image 'no-such-image'"),
        ('["debian-bookworm", "debian-bookworm"]', "'debian-bookworm' is listed twice"),
        ("[]", "pytest_bottle.matrix.parametrize(): bad image"),
    ],
)
def test_a_conftests_own_matrix_checks_its_names(pytester: pytest.Pytester, names: str, expected: str) -> None:
    """An unknown name was taken, and its bottle's error blamed the command line."""
    result = _collect_with_a_conftest_matrix(pytester, names)
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()
    assert expected in result.stdout.str()


@pytest.mark.parametrize(
    ("names", "ids"),
    [
        ('"debian-trixie"', ["debian-trixie"]),
        ('"debian-bookworm,debian-trixie"', ["debian-bookworm", "debian-trixie"]),
        ('("debian-trixie", "debian-bookworm")', ["debian-trixie", "debian-bookworm"]),
    ],
)
def test_a_conftests_own_matrix_takes_one_string_as_the_command_line_does(
    pytester: pytest.Pytester, names: str, ids: list[str]
) -> None:
    """A single name was split into its letters ("unknown image 'd'")."""
    result = _collect_with_a_conftest_matrix(pytester, names)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert [line for line in result.outlines if "::" in line] == [f"test_m.py::test_vm[{i}]" for i in ids]
