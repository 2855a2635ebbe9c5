"""Which conftest.py files the ``bottle`` command reads for a name given
without ``--from``: those a ``pytest`` started in that directory imports
first (checked against pytest itself), and what the commands then know (no VM)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_bottle.user_images import find_setup, initial_conftests

LOGS = "import os\nopen({log!r}, 'a').write(os.path.abspath(__file__) + '\\n')\n"


def _tree(base: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)


def _pytest_loads(start: Path, log: Path) -> list[str]:
    """The conftest.py files ``pytest`` itself imports at its start in ``start``
    (``--help`` loads them, for their options, and collects nothing)."""
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    argv = [sys.executable, "-m", "pytest", "--help", "-p", "no:bottle", "-p", "no:cacheprovider"]
    r = subprocess.run(argv, cwd=start, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return log.read_text().splitlines() if log.exists() else []


CONFTESTS = [
    "conftest.py",
    "p/conftest.py",
    "p/q/conftest.py",
    "p/q/r/conftest.py",
    "p/q/r/tests/conftest.py",
    "p/q/r/testing/conftest.py",
    "p/q/r/other/conftest.py",  # not test*
    "p/q/r/tests/deeper/conftest.py",  # read when pytest collects there, not at its start
]


@pytest.mark.parametrize(
    "configs",
    [
        {"p/pytest.ini": ""},  # the file alone, even empty
        {"p/q/.pytest.ini": "[pytest]\n"},
        {"p/pytest.toml": "", "p/q/pyproject.toml": "[project]\nname = 'x'\n"},  # pytest 9's own files
        {"p/q/pyproject.toml": "[tool.pytest.ini_options]\nx = '1'\n", "p/pytest.ini": ""},
        {"p/q/pyproject.toml": "[tool.pytest]\nx = 1\n"},
        {"p/tox.ini": "[pytest]\n", "p/q/tox.ini": "[tox]\n"},  # a tox.ini without [pytest] does not count
        {"p/setup.cfg": "[tool:pytest]\n", "p/q/setup.cfg": "[metadata]\nname = x\n"},
        {"p/pyproject.toml": "[project]\nname = 'x'\n", "p/q/setup.py": ""},  # any pyproject.toml before setup.py
        {"p/q/setup.py": ""},
        {},  # no config, no marker: the start directory alone
    ],
    ids=lambda c: ",".join(c) or "none",
)
def test_the_conftests_read_are_those_pytest_imports_at_its_start(tmp_path: Path, configs: dict[str, str]) -> None:
    log = tmp_path / "loaded.log"
    _tree(tmp_path, {name: LOGS.format(log=str(log)) for name in CONFTESTS} | configs)
    (tmp_path / "p/q/r/test_x.py").mkdir()  # a directory named test*.py is one of them too
    (tmp_path / "p/q/r/test_x.py/conftest.py").write_text(LOGS.format(log=str(log)))
    start = tmp_path / "p/q/r"
    ours = [str(p) for p in initial_conftests(start)]
    assert sorted(ours) == sorted(_pytest_loads(start, log))  # pytest takes test* in directory order
    assert ours[0].startswith(str(find_setup(start)[0]))


@pytest.mark.parametrize(
    ("name", "text", "entries"),
    [
        ("pytest.ini", "[pytest]\npythonpath = src lib\n", ["src", "lib"]),
        ("pyproject.toml", "[tool.pytest.ini_options]\npythonpath = 'src lib'\n", ["src", "lib"]),
        ("pyproject.toml", "[tool.pytest.ini_options]\npythonpath = ['src', 'lib']\n", ["src", "lib"]),
        ("pyproject.toml", "[tool.pytest]\npythonpath = ['src']\n", ["src"]),
        ("pytest.toml", "[pytest]\npythonpath = ['src']\n", ["src"]),
        ("setup.cfg", "[tool:pytest]\npythonpath =\n  src\n  lib\n", ["src", "lib"]),
        ("tox.ini", "[pytest]\naddopts = -q\n", []),
    ],
)
def test_the_configs_pythonpath_is_relative_to_its_directory(
    tmp_path: Path, name: str, text: str, entries: list[str]
) -> None:
    _tree(tmp_path, {f"p/{name}": text, "p/a/.keep": ""})
    assert find_setup(tmp_path / "p/a") == (tmp_path / "p", [tmp_path / "p" / e for e in entries])


def _bottle(cwd: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed command, as a user runs it (``image key`` needs no image or VM)."""
    argv = [str(Path(sys.executable).with_name("bottle")), "--cache-dir", str(cache), *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120)


def test_without_from_the_conftests_name_the_images(tmp_path: Path) -> None:
    root, cache = tmp_path / "project", tmp_path / "cache"
    _tree(
        tmp_path,
        {
            "conftest.py": "from pytest_bottle import Image\nImage('debian-bookworm').named('above')\n",
            "project/pytest.ini": "[pytest]\npythonpath = src\n",
            "project/src/mylib.py": "from pytest_bottle import Image\nLIB = Image('debian-bookworm').run('uname')\n",
            "project/conftest.py": (
                "from pytest_bottle import Image\n"
                "from pytest_bottle.images import Recipe, register\n"
                "from pytest_bottle.images.recipes import BASE_PACKAGES\n"
                "import mylib\n"  # from the config's pythonpath, as under pytest
                "mylib.LIB.named('libapp')\n"
                "ROOT = Image('debian-bookworm').named('rootapp')\n"
                "register(Recipe(name='proj-recipe', packages=BASE_PACKAGES + ('nginx',), description='x'))\n"
                "pytest_plugins = ['pytester', 'plugin_images']\n"  # pytest's own plugin: only a name to us
            ),
            "project/plugin_images.py": "from pytest_bottle import Image\nImage('debian-bookworm').run('id').named('plug')",
            # in a package, importing a sibling module, as it could under pytest
            "project/tests/__init__.py": "",
            "project/tests/images_def.py": "from pytest_bottle import Image\nAPP = Image('debian-bookworm').run('true')\n",
            "project/tests/conftest.py": "from .images_def import APP\nAPP.named('testsapp')\n",
            "project/tests_broken/conftest.py": "raise RuntimeError('boom in tests_broken')\n",
            "project/sub/conftest.py": (
                "from pytest_bottle import Image\n"
                "def pytest_bottle_images():\n    return [Image('debian-bookworm').write('/etc/x', 'x').named('subapp')]\n"
            ),
        },
    )

    def key(cwd: Path, name: str, *more: str) -> str:
        r = _bottle(cwd, cache, "image", "key", name, *more)
        assert r.returncode == 0 and r.stderr == "", r.stderr  # reading stopped before tests_broken
        return r.stdout.strip()

    # the rootdir's conftest (with the config's pythonpath), and a tests/ one in a package
    assert key(root, "rootapp") == key(root, "rootapp", "--from", "conftest.py")
    assert key(root, "libapp") not in (key(root, "rootapp"), "")
    assert key(root, "testsapp") == key(root, "testsapp", "--from", "tests/conftest.py") != key(root, "rootapp")
    # a recipe it registers, and an image of a plugin module it names (pytest_plugins)
    assert key(root, "proj-recipe") == key(root, "proj-recipe", "--from", "conftest.py") != key(root, "rootapp")
    assert key(root, "plug") == key(root, "plug", "--from", "plugin_images.py")
    # from below: its own conftest (a hook's images too) and those above it up to the rootdir
    assert key(root / "sub", "subapp") == key(root, "subapp", "--from", "sub/conftest.py")
    assert key(root / "sub", "rootapp") == key(root, "rootapp")
    # not read from there: the hint names the files read; a broken one is skipped, with its traceback
    for cwd, name, read, named in [
        (root / "sub", "above", "../conftest.py, conftest.py", "libapp, plug, proj-recipe, rootapp, subapp"),
        (root, "subapp", "conftest.py, tests/conftest.py", "libapp, plug, proj-recipe, rootapp, testsapp"),
    ]:
        for what, argv in [("find it", ["key", name]), ("build it", ["build", name]), ("remove it", ["rm", name])]:
            r = _bottle(cwd, cache, "image", *argv)
            assert r.returncode == 1, r.stderr
            hint = f"names with .named() outside {read}, give that file or module with --from FILE|MODULE to {what}"
            assert hint in r.stderr, r.stderr
            known = f"debian-bookworm, debian-bookworm-minimal, debian-trixie, debian-trixie-minimal, {named}"
            if what != "remove it":  # rm lists cached derived images instead of named ones
                assert r.stderr.rstrip().endswith(f"unknown image {name!r}; known images: {known}"), r.stderr
            broken = "RuntimeError: boom in tests_broken" in r.stderr
            assert broken == (cwd == root), r.stderr
            assert (
                "bottle: SpecError: tests_broken/conftest.py: loading it raised RuntimeError (its traceback is above) "
                f"(skipped it, looking for {name!r})" in r.stderr
            ) == broken, r.stderr
    # a cache entry's name or key prefix is not looked for in any conftest
    r = _bottle(root, cache, "image", "rm", "derived-0123456789abcdef")
    assert r.returncode == 1 and "boom" not in r.stderr, r.stderr


def test_a_plugin_package_that_raises_and_a_removed_directory_are_reported(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _tree(
        tmp_path,
        {
            "p/pytest.ini": "",
            "p/conftest.py": "pytest_plugins = ['pkgp.images']\n",
            "p/pkgp/__init__.py": "raise RuntimeError('pkgp is broken')\n",
            "p/pkgp/images.py": "",
        },
    )
    r = _bottle(tmp_path / "p", cache, "image", "key", "web")
    assert r.returncode == 1 and "RuntimeError: pkgp is broken" in r.stderr, r.stderr
    assert "SpecError: conftest.py: pytest_plugins 'pkgp.images': loading it raised RuntimeError" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("bottle: ImageNotFound: unknown image 'web'"), r.stderr
    gone = tmp_path / "gone"
    gone.mkdir()
    proc = subprocess.run(
        ["sh", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "$0" "$@"', str(Path(sys.executable).with_name("bottle")),
         "--cache-dir", str(cache), "image", "key", "web"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.rstrip().endswith("known images: " + KNOWN), proc.stderr


def test_what_a_conftest_prints_goes_to_stderr(tmp_path: Path) -> None:
    # `$(bottle image key app)` in a CI step, `bottle run`'s output: stdout is the command's alone
    named = (
        "import os\nprint('hello from conftest')\nos.system('echo hello from a child')\n"
        "from pytest_bottle import Image\nImage('debian-bookworm').named('app')\n"
        "pytest_plugins = ['pkgq.images']\n"
    )
    hook = "def pytest_bottle_images():\n    print('hello from a generator')\n    yield from ()\n"
    _tree(
        tmp_path,
        {
            "p/pytest.ini": "",
            "p/conftest.py": named,
            "p/hook.py": hook,
            "p/pkgq/__init__.py": "print('hello from a package')\n",
            "p/pkgq/images.py": "print('hello from a plugin')\n",
        },
    )
    says = {
        "app": ["hello from conftest", "hello from a child", "hello from a package", "hello from a plugin"],
        "debian-bookworm": ["hello from a generator"],
    }
    for name, more in [("app", ()), ("app", ("--from", "conftest.py")), ("debian-bookworm", ("--from", "hook.py"))]:
        r = _bottle(tmp_path / "p", tmp_path / "cache", "image", "key", name, *more)
        assert r.returncode == 0 and len(r.stdout.strip()) == 16 and r.stdout.count("\n") == 1, r.stdout
        assert r.stderr.splitlines() == says[name], r.stderr


KNOWN = "debian-bookworm, debian-bookworm-minimal, debian-trixie, debian-trixie-minimal"
