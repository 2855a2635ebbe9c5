"""Named derived images reach ``--bottle-image`` and the ini setting, from a
root conftest.py or the ``pytest_bottle_images`` hook (child pytest runs; no VM),
and the CLI's ``--from`` (one bottle)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pytest_bottle.cli import main
from pytest_bottle.images import BuiltImage
from pytest_bottle.images.image import NAMED

CONFTEST_NAMED = """
from pytest_bottle import Image
Image("debian-bookworm").install("curl").named("with-curl")
"""

CONFTEST_HOOK = """
from pytest_bottle import Image

def pytest_bottle_images():
    return [Image("debian-bookworm").run("true").named("from-hook")]
"""

CHECK = """
from pytest_bottle.images.image import NAMED

def test_spec(request):
    from pytest_bottle.plugin import _state
    spec = _state(request.config).spec()
    assert spec.image == {name!r} and {name!r} in NAMED
    assert NAMED[{name!r}].parent == "debian-bookworm"
"""


@pytest.mark.parametrize(
    ("conftest", "name"), [(CONFTEST_NAMED, "with-curl"), (CONFTEST_HOOK, "from-hook")], ids=["named", "hook"]
)
def test_a_named_image_works_with_the_option_and_the_ini_setting(
    pytester: pytest.Pytester, conftest: str, name: str
) -> None:
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_it=CHECK.format(name=name))
    pytester.runpytest_subprocess("-p", "no:randomly", f"--bottle-image={name}").assert_outcomes(passed=1)
    pytester.makeini(f"[pytest]\nbottle_image = {name}\n")
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=1)


def test_an_unknown_name_lists_the_named_images(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST_HOOK)
    pytester.makepyfile(test_it="def test_x(): pass\n")
    result = pytester.runpytest_subprocess("--bottle-image=nope")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*unknown image 'nope'*from-hook*"])


@pytest.mark.parametrize(
    ("returned", "says"),
    [
        ("[Image('debian-bookworm').run('true')]", "must return named Images*got Image("),
        ("'web'", "must return a list of named Images*got 'web'"),  # not a character at a time
        ("Image('debian-bookworm').named('one')", "must return a list of named Images*got Image("),
        ("{'web': Image('debian-bookworm').named('web')}", "must return a list of named Images*got {'web'"),
        # raised while the hook makes them: a usage error naming the hook, not an INTERNALERROR
        ("[Image('nope').named('w')]", "unknown image 'nope'; known images: debian-bookworm"),
        ("[Image('debian-bookworm').install('x').named('w')]", "install(): 'x' is not a Debian package name"),
    ],
)
def test_the_hook_must_return_named_images(pytester: pytest.Pytester, returned: str, says: str) -> None:
    pytester.makeconftest(f"from pytest_bottle import Image\ndef pytest_bottle_images():\n    return {returned}\n")
    pytester.makepyfile(test_it="def test_x(): pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "INTERNALERROR" not in result.stderr.str()
    result.stderr.fnmatch_lines([f"*pytest_bottle_images()*{says}*"])


@pytest.mark.parametrize(
    ("package", "importing"),
    [
        (False, "from images_def import APP"),
        (True, "from tests.images_def import APP"),
        (True, "from .images_def import APP"),
    ],
)
def test_from_imports_a_conftest_as_pytest_does_and_names_what_is_missing(
    tmp_path: Path, package: bool, importing: str
) -> None:
    tests = tmp_path / "project" / "tests"
    tests.mkdir(parents=True)
    if package:
        (tests / "__init__.py").write_text("")
    (tests / "images_def.py").write_text(
        "from pytest_bottle import Image\nAPP = Image('debian-bookworm').named('app')\n"
    )
    (tests / "conftest.py").write_text(importing + "\n")
    elsewhere = tmp_path / "elsewhere"  # the working directory does not help
    elsewhere.mkdir()

    def bottle(*args: str) -> subprocess.CompletedProcess[str]:  # the installed command, as a user runs it
        argv = [str(Path(sys.executable).with_name("bottle")), "--cache-dir", str(tmp_path / "cache"), *args]
        return subprocess.run(argv, capture_output=True, text=True, cwd=elsewhere, timeout=60)

    r = bottle("image", "key", "app", "--from", str(tests / "conftest.py"))
    assert r.returncode == 0 and len(r.stdout.split()[-1]) == 16, r.stderr
    r = bottle("image", "key", "app")  # as `image build`: without --from, what to give is said
    assert r.returncode == 1 and "give that file or module with --from FILE|MODULE to find it" in r.stderr, r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("bottle: ImageNotFound: unknown image 'app'"), r.stderr
    for source, says in [
        ("nope.py", "bottle: SpecError: --from nope.py: no such file\n"),
        ("no_such_module", "bottle: SpecError: --from no_such_module: no module named 'no_such_module'"),
    ]:
        r = bottle("image", "key", "app", "--from", source)
        assert r.returncode == 1 and r.stderr.startswith(says) and "Traceback" not in r.stderr, r.stderr
    # The user's code fails: its own frames, none of ours, and bottle's own error (run: 125, not 1)
    for name, text, where, kind, raised in [
        ("raises.py", "import os\nraise RuntimeError('boom')\n", 'raises.py", line 2', "RuntimeError", "boom"),
        ("syntax.py", "x = (\n", 'syntax.py", line 1', "SyntaxError", "never closed"),
        ("imports.py", "import no_such_xyz\n", 'imports.py", line 1', "ModuleNotFoundError", "'no_such_xyz'"),
        (
            "step.py",
            "from pytest_bottle import Image\nImage('debian-bookworm').run(3)\n",
            'step.py", line 2',
            "SpecError",
            "run",
        ),
        (
            "skips.py",
            "import pytest\npytest.skip('not here', allow_module_level=True)\n",
            'skips.py", line 2',
            "Skipped",
            "not here",
        ),
        (
            "hook.py",
            "def pytest_bottle_images():\n    return 1 / 0\n",
            "pytest_bottle_images",
            "ZeroDivisionError",
            "zero",
        ),
    ]:
        (elsewhere / name).write_text(text)
        for argv, code in [(["image", "key", "app"], 1), (["run", "--image", "app"], 125)]:
            r = bottle(*argv, "--from", name, *(["--", "true"] if code == 125 else []))
            said = f"bottle: SpecError: --from {name}: loading it raised {kind} (its traceback is above)"
            assert r.returncode == code and r.stderr.rstrip().endswith(said), r.stderr
            assert where in r.stderr and raised in r.stderr, r.stderr
            assert kind == "SpecError" or "pytest_bottle/" not in r.stderr, r.stderr  # below theirs: ours raised it


def test_bottle_image_build_takes_images_from_a_file(
    tmp_path: Path, default_image: BuiltImage, capsys: pytest.CaptureFixture[str]
) -> None:
    defs = tmp_path / "images.py"
    defs.write_text(
        "from pytest_bottle import Image\n"
        "def pytest_bottle_images():\n"
        "    return [Image('debian-bookworm').named('cli-alias')]\n"
    )
    saved = dict(NAMED)
    try:
        assert main(["image", "build", "cli-alias", "--from", str(defs)]) == 0
        assert NAMED["cli-alias"].resolved() == "debian-bookworm"
        assert default_image.key in capsys.readouterr().out  # an alias builds as what it names
        NAMED.pop("cli-alias")
        # bottle run takes the same --from: the name runs what it names
        assert (
            main(["run", "--from", str(defs), "--image", "cli-alias", "--", ". /etc/os-release; echo $VERSION_ID"]) == 0
        )
        assert capsys.readouterr().out == "12\n"
        assert main(["run", "--from", str(defs), "--snapshot", "any", "--", "true"]) == 125
        assert "SpecError: bottle run: --from cannot be given with --snapshot" in capsys.readouterr().err
    finally:
        NAMED.clear()
        NAMED.update(saved)


def test_without_from_build_and_run_find_a_conftests_image(tmp_path: Path, warm_cache: Path) -> None:
    # (which conftest.py files are read, and what `image key` then knows: tests/unit/test_user_images.py)
    root = tmp_path / "project"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "conftest.py").write_text("from pytest_bottle import Image\nImage('debian-bookworm').named('above')\n")
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "conftest.py").write_text("from pytest_bottle import Image\nImage('debian-bookworm').named('rootapp')\n")
    (root / "sub" / "conftest.py").write_text(
        "from pytest_bottle import Image\nImage('debian-bookworm').write('/etc/x', 'x').named('subapp')\n"
    )

    def bottle(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(Path(sys.executable).with_name("bottle")), "--cache-dir", str(warm_cache), *args]
        return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120)

    r = bottle(root, "image", "build", "rootapp")  # an alias: the base image, cached
    assert r.returncode == 0 and r.stdout.startswith("debian-bookworm "), r.stderr
    r = bottle(root / "sub", "run", "--image", "rootapp", "--", "cat /etc/os-release")
    assert r.returncode == 0 and 'VERSION_ID="12"' in r.stdout, r.stderr
    r = bottle(root / "sub", "run", "--image", "above", "--", "true")  # above the rootdir: not read
    assert r.returncode == 125 and r.stderr.startswith("bottle: ImageNotFound: unknown image 'above'"), r.stderr
    r = bottle(root / "sub", "image", "rm", "subapp")  # named but never built: nothing cached, not unknown
    assert (r.returncode, r.stdout) == (0, "subapp: nothing cached\n"), r.stderr
