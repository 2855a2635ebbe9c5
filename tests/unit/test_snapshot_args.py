"""Pure logic of snapshots: which fork arguments are allowed, names, errors."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from pytest_bottle import snapshot
from pytest_bottle.errors import SnapshotError, SnapshotGone, SpecError
from pytest_bottle.images import Image
from pytest_bottle.images.cache import BuiltImage
from pytest_bottle.snapshot import Snapshot, check_fork_args, free_saved_name, saved_name
from pytest_bottle.spec import BOTTLE_KEYS, BottleSpec, resolve
from pytest_bottle.store.saved import SavedState, StateCorrupt, load
from pytest_bottle.store.snapshots import check_name, seed_of


def test_fork_takes_forward_and_timeout() -> None:
    assert check_fork_args({}, "s") == {}
    assert check_fork_args({"forward": "80, 22", "timeout": "30"}, "s") == {"forward": (22, 80), "timeout": 30.0}
    assert check_fork_args({"forward": None}, "s") == {}  # None: not given, as everywhere
    assert check_fork_args({"lan": None, "memory": None, "timeout": 5}, "s") == {"timeout": 5.0}
    for misspelt in ({"memroy": None}, {"forwad": [80]}):  # named as unknown, even as None
        with pytest.raises(
            SpecError, match=r"^s: unknown argument '(memroy|forwad)'; a fork takes only forward, timeout"
        ):
            check_fork_args(misspelt, "s")


@pytest.mark.parametrize("key", ["image", "memory", "cpus", "network", "lan", "boot", "accel", "cache_dir"])
def test_any_other_fork_argument_is_named(key: str) -> None:
    with pytest.raises(SpecError, match=rf"^where: {key}= cannot be given to a fork of a snapshot"):
        check_fork_args({key: "x"}, "where")


def _snapshot(spec: BottleSpec, ran_on: str) -> Snapshot:
    """What check_fork_args reads of a Snapshot: its source's spec, what it ran on, its image's key."""
    return cast(Snapshot, SimpleNamespace(spec=spec, accel=ran_on, image=SimpleNamespace(key=Image(spec.image).key)))


def test_a_fork_may_restate_what_its_snapshot_has(tmp_path: Path) -> None:
    spec = _snapshot(
        resolve([("launch()", {"memory": "1G", "cache_dir": str(tmp_path), "image": "debian-trixie"})]), "tcg"
    )
    same = {"memory": 1024, "cache_dir": f"{tmp_path}/", "image": "debian-trixie", "accel": "auto", "cpus": 1}
    assert check_fork_args({**same, "timeout": 9}, "s", spec) == {"timeout": 9.0}
    for key, other in (("memory", "2G"), ("cache_dir", tmp_path / "x"), ("image", "debian-bookworm"), ("cpus", "x")):
        with pytest.raises(SpecError, match=rf"^s: {key}= cannot be given to a fork of a snapshot"):
            check_fork_args({key: other}, "s", spec)
    # A factory takes no cache_dir at all: not even its snapshot's.
    assert check_fork_args({"memory": "1G"}, "f", spec, BOTTLE_KEYS) == {}
    with pytest.raises(SpecError, match=r"^f: cache_dir= cannot be given to a fork of a snapshot"):
        check_fork_args({"cache_dir": str(tmp_path)}, "f", spec, BOTTLE_KEYS)
    # accel: what the source asked for (auto) or what it ran on (tcg), not another
    assert check_fork_args({"accel": "auto"}, "s", spec) == check_fork_args({"accel": "tcg"}, "s", spec) == {}
    with pytest.raises(SpecError, match=r"^s: accel= cannot be given to a fork of a snapshot"):
        check_fork_args({"accel": "kvm"}, "s", spec)


def test_a_fork_may_restate_its_image_however_it_is_written() -> None:
    web = Image("debian-bookworm").write("/etc/restated", "1\n").named("restated-web")
    for source, restated in (
        ("restated-web", [web, "restated-web", Image("restated-web")]),
        (web, ["restated-web", Image(web)]),
        ("debian-bookworm", [Image("debian-bookworm")]),
        (Image("debian-bookworm"), ["debian-bookworm"]),
    ):
        snap = _snapshot(resolve([("launch()", {"image": source})]), "tcg")
        for value in restated:
            assert check_fork_args({"image": value}, "s", snap) == {}, (source, value)
        for other in ("debian-trixie", web.write("/etc/more", "2\n"), "no-such-image"):
            with pytest.raises(SpecError, match=r"^s: image= cannot be given to a fork of a snapshot"):
                check_fork_args({"image": other}, "s", snap)


def test_bad_fork_values_are_named() -> None:
    with pytest.raises(SpecError, match="where: bad timeout"):
        check_fork_args({"timeout": -1}, "where")
    with pytest.raises(SpecError, match=r"finite number of seconds \(below 1e9\), not 1000000000.0"):
        check_fork_args({"timeout": 1e9}, "where")  # the bound was not said
    with pytest.raises(SpecError, match="where: bad forward"):
        check_fork_args({"forward": [70000]}, "where")


def test_saved_names_are_valid_snapshot_names() -> None:
    name = saved_name("tests/test_x.py::test_it[a/b c]", "btl-0123abcd")
    assert re.fullmatch(r"test_it_a_b_c-[0-9a-f]{6}-btl-0123abcd", name)
    assert check_name(name) == name
    assert re.fullmatch(r"test-[0-9a-f]{6}-btl-1", check_name(saved_name("x::[[[", "btl-1")))
    for bad in ("", ".tmp-x", "../x", "a/b", "x" * 101, "x.lock", "x-rm", "x-old", "x-prune", "x-discard", "x\n"):
        with pytest.raises(SnapshotError):
            check_name(bad)
    for bad in (".", "..", "-x"):  # the message said nothing of the first character
        with pytest.raises(SnapshotError, match="starting with a letter or digit"):
            check_name(bad)


def test_snapshot_errors_pickle() -> None:
    for e in (SnapshotError("s1", "it is corrupt"), SnapshotGone("s2", "removed")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) == f"snapshot {e.snapshot}: {e.reason}"
    assert isinstance(SnapshotGone("s", "r"), LookupError)


def test_a_snapshot_finds_its_seed_by_a_relative_path(tmp_path: Path) -> None:
    seed_dir, snap_dir = tmp_path / "seeds" / "s1", tmp_path / "snapshots" / "x"
    for d, extra in ((seed_dir, {}), (snap_dir, {"kind": "snapshot", "rests_on": {"parent": "../../seeds/s1"}})):
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"files": {}, "key_parts": {}, "created": 1.0, **extra}))
    snap = load(snap_dir)
    assert snap is not None and seed_of(snap).path == seed_dir
    (seed_dir / "manifest.json").unlink()  # pruned
    with pytest.raises(SnapshotError, match="x: the seed it was taken from is gone"):
        seed_of(snap)


def test_a_snapshot_removed_while_it_is_checked_is_gone_not_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_dir, snap_dir = tmp_path / "seeds" / "s1", tmp_path / "snapshots" / "x"
    for d, extra in ((seed_dir, {}), (snap_dir, {"kind": "snapshot", "rests_on": {"parent": "../../seeds/s1"}})):
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"files": {}, "key_parts": {}, "created": 1.0, **extra}))
    state = load(snap_dir)
    assert state is not None
    snap = Snapshot(state, resolve([]), cast(BuiltImage, SimpleNamespace(name="img")))

    def removed_meanwhile(s: SavedState) -> None:  # bottle snapshot rm, between the manifest and the files
        shutil.rmtree(snap_dir)
        raise StateCorrupt("snapshot x: disk.qcow2 is missing (No such file or directory)")

    monkeypatch.setattr(snapshot, "verify", removed_meanwhile)
    with pytest.raises(SnapshotGone, match="x: it was removed"):
        snap._state()

    def damaged(s: SavedState) -> None:  # there, and its files are not what they were
        raise StateCorrupt("snapshot x: memory.ram changed")

    snap_dir.mkdir()
    (snap_dir / "manifest.json").write_text(
        json.dumps(
            {"files": {}, "key_parts": {}, "created": 1.0, "kind": "snapshot", "rests_on": {"parent": "../../seeds/s1"}}
        )
    )
    monkeypatch.setattr(snapshot, "verify", damaged)
    with pytest.raises(SnapshotError, match="x: it is corrupt: memory.ram changed") as e:
        snap._state()
    assert type(e.value) is SnapshotError


def test_saved_names_of_two_tests_of_one_name_differ_and_never_replace_one(tmp_path: Path) -> None:
    a = saved_name("a/test_x.py::TestA::test_it[a/b]", "btl-1")
    b = saved_name("b/test_x.py::TestB::test_it[a_b]", "btl-1")
    assert a != b and a.startswith("test_it_a_b-") and b.startswith("test_it_a_b-")
    assert free_saved_name(tmp_path, "a/test_x.py::TestA::test_it[a/b]", "btl-1") == a
    (tmp_path / "snapshots" / a).mkdir(parents=True)  # the same test failed before on this bottle
    again = free_saved_name(tmp_path, "a/test_x.py::TestA::test_it[a/b]", "btl-1")
    assert again == f"{a}.2" and check_name(again) == again
