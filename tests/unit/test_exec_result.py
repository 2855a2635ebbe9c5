"""ExecResult made by hand (a fake in a user's unit test), as DESIGN lists its fields."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from pytest_bottle import ExecError, ExecResult


def test_output_given_as_str_positionally_or_by_name_reads_back_as_given() -> None:
    by_position = ExecResult(["false"], 1, "out\n", "héllo\n")
    by_name = ExecResult(args=["false"], returncode=1, stdout="out\n", stderr="héllo\n")
    as_bytes = ExecResult(["false"], 1, b"out\n", "héllo\n".encode())
    assert by_position == by_name == as_bytes
    assert (by_name.stdout, by_name.stderr, by_name.stderr_bytes) == ("out\n", "héllo\n", "héllo\n".encode())
    assert not by_name.ok and by_name.duration == 0.0
    with pytest.raises(ExecError, match="exited with 1") as failed:
        by_name.check()
    assert (failed.value.rc, failed.value.stderr) == (1, "héllo\n")
    assert ExecResult("true", 0, stdout="x").check().stdout == "x"


def test_a_result_made_by_hand_copies_and_pickles_as_a_real_one() -> None:
    r = ExecResult(["x"], 2, "o", "e", 0.5)
    assert dataclasses.replace(r, returncode=0).ok and dataclasses.replace(r, returncode=0).stdout == "o"
    assert pickle.loads(pickle.dumps(r)) == r
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.returncode = 0  # type: ignore[misc]


def test_output_of_another_type_or_given_twice_is_a_type_error_at_once() -> None:
    with pytest.raises(TypeError, match="stdout must be str or bytes, not int"):
        ExecResult("x", 0, stdout=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="stderr must be str or bytes, not NoneType"):
        ExecResult("x", 0, b"", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="give stdout= or stdout_bytes, not both"):
        ExecResult("x", 0, b"a", stdout="b")
    assert ExecResult("x", 0, "\udcff").stdout_bytes == b"\xff"  # a str from undecodable bytes goes back to them
