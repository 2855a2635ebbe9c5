"""Which conftest.py files the ``bottle`` command reads for a name given
without ``--from``: those a ``pytest`` started in that directory reads first."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_bottle.user_images import initial_conftests, rootdir


def _tree(base: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)


@pytest.mark.parametrize(
    ("config", "text", "counts"),
    [
        ("pytest.ini", "", True),  # the file alone
        (".pytest.ini", "[pytest]\n", True),
        ("pyproject.toml", "[tool.pytest.ini_options]\nx = 1\n", True),
        ("pyproject.toml", "[tool.pytest]\nx = 1\n", True),
        ("tox.ini", "[pytest]\n", True),
        ("tox.ini", "[tox]\n", False),
        ("setup.cfg", "[tool:pytest]\n", True),
        ("setup.cfg", "[metadata]\n", False),
        ("setup.cfg", "not ini at all [", False),
    ],
)
def test_the_rootdir_is_the_first_directory_up_with_a_pytest_config(
    tmp_path: Path, config: str, text: str, counts: bool
) -> None:
    _tree(tmp_path, {f"proj/{config}": text, "proj/a/b/.keep": ""})
    start = tmp_path / "proj/a/b"
    assert rootdir(start) == (tmp_path / "proj" if counts else start)


def test_without_a_config_setup_py_then_any_pyproject_marks_the_rootdir(tmp_path: Path) -> None:
    _tree(tmp_path, {"p/pyproject.toml": "[project]\n", "p/q/setup.py": "", "p/q/r/.keep": ""})
    assert rootdir(tmp_path / "p/q/r") == tmp_path / "p/q"
    (tmp_path / "p/q/setup.py").unlink()
    assert rootdir(tmp_path / "p/q/r") == tmp_path / "p"
    _tree(tmp_path, {"p/q/tox.ini": "[pytest]\n"})  # a config file wins over both, wherever it is
    (tmp_path / "p/q/r/setup.py").write_text("")
    assert rootdir(tmp_path / "p/q/r") == tmp_path / "p/q"


def test_conftests_from_the_rootdir_down_then_the_test_subdirectories(tmp_path: Path) -> None:
    names = [
        "conftest.py",  # above the rootdir: not read
        "proj/pytest.ini",
        "proj/conftest.py",
        "proj/sub/conftest.py",
        "proj/sub/here/conftest.py",
        "proj/sub/here/tests/conftest.py",
        "proj/sub/here/testing/conftest.py",
        "proj/sub/here/test_x.py/conftest.py",  # a file named test*: not a directory of tests
        "proj/sub/here/other/conftest.py",  # not test*
        "proj/sub/here/tests/deeper/conftest.py",  # read when pytest collects there, not at its start
    ]
    _tree(tmp_path, dict.fromkeys(names, ""))
    (tmp_path / "proj/sub/here/test_x.py/conftest.py").unlink()
    (tmp_path / "proj/sub/here/test_x.py").rmdir()
    (tmp_path / "proj/sub/here/test_x.py").write_text("")
    found = [str(p.relative_to(tmp_path)) for p in initial_conftests(tmp_path / "proj/sub/here")]
    assert found == [
        "proj/conftest.py",
        "proj/sub/conftest.py",
        "proj/sub/here/conftest.py",
        "proj/sub/here/testing/conftest.py",
        "proj/sub/here/tests/conftest.py",
    ]


def test_with_no_rootdir_above_only_the_start_and_its_tests_count(tmp_path: Path) -> None:
    _tree(tmp_path, {"conftest.py": "", "a/conftest.py": "", "a/tests/conftest.py": ""})
    found = [str(p.relative_to(tmp_path)) for p in initial_conftests(tmp_path / "a")]
    assert found == ["a/conftest.py", "a/tests/conftest.py"]
