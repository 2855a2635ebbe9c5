"""``bottle image list``/``prune --older-than`` over derived entries (fake entries, no VM)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pytest_bottle.agent.client import NOT_SETTLED
from pytest_bottle.cli import main
from pytest_bottle.errors import BootTimeout
from pytest_bottle.images.cache import USED_STAMP, BuiltImage
from pytest_bottle.images.derived import list_derived, prune_derived, remove_derived
from pytest_bottle.images.recipes import BASE_PACKAGES, RECIPES, Recipe
from pytest_bottle.store import unsettled


def _entry(cache: Path, key: str, chain: list[str], used_days_ago: float) -> Path:
    path = cache / "images" / f"derived-{key}"
    path.mkdir(parents=True)
    manifest = {"name": f"debian-bookworm+{key}", "key": key, "parent": "debian-bookworm", "chain": chain}
    (path / "manifest.json").write_text(json.dumps({**manifest, "steps": ["run true"], "created": 0.0}))
    (path / "disk.qcow2").write_bytes(b"x" * 4096)
    stamp = path / USED_STAMP
    stamp.touch()
    t = time.time() - used_days_ago * 86400
    os.utime(stamp, (t, t))
    return path


def test_prune_removes_unused_layers_but_keeps_what_a_used_one_rests_on(tmp_path: Path) -> None:
    old_parent = _entry(tmp_path, "aaaa", ["aaaa", "base"], 10)
    child = _entry(tmp_path, "bbbb", ["bbbb", "aaaa", "base"], 0)
    unused = _entry(tmp_path, "cccc", ["cccc", "base"], 10)
    assert {e.key for e in list_derived(tmp_path)} == {"aaaa", "bbbb", "cccc"}
    removed = prune_derived(tmp_path, 1)
    assert [p for p, _, _ in removed] == [unused]
    assert old_parent.is_dir() and child.is_dir() and not unused.exists()
    assert ": not used for 10.0 days" in removed[0][2]
    # A short unused time in a unit that shows it (3 minutes read "0.0 days").
    recent = _entry(tmp_path, "dddd", ["dddd", "base"], 180 / 86400)
    removed = prune_derived(tmp_path, 0.0001)
    assert [(p, why) for p, _, why in removed] == [
        (recent, "derived image debian-bookworm+dddd: not used for 3.0 minutes")
    ]


def test_the_cli_lists_and_prunes_derived_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _entry(tmp_path, "dddd", ["dddd", "base"], 3)
    assert main(["--cache-dir", str(tmp_path), "image", "list"]) == 0
    out = capsys.readouterr().out
    assert "DERIVED IMAGE" in out and "debian-bookworm+dddd" in out and "3.0d" in out
    main(["--cache-dir", str(tmp_path), "doctor"])  # its code says whether the host has what it needs
    out = capsys.readouterr().out
    assert "  image debian-bookworm+dddd dddd derived from debian-bookworm, " in out and "used 3.0d ago" in out
    assert main(["--cache-dir", str(tmp_path), "image", "prune", "--older-than", "5"]) == 0
    assert (tmp_path / "images" / "derived-dddd").is_dir()
    assert main(["--cache-dir", str(tmp_path), "image", "prune", "--older-than", "2"]) == 0
    assert not (tmp_path / "images" / "derived-dddd").exists()


def test_the_list_keeps_its_columns_for_a_layer_on_a_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A layer on a layer is named ``parent+key+key``: longer than the column was."""
    _entry(tmp_path, "eeee", ["eeee", "base"], 1)
    long = _entry(tmp_path, "ffff", ["ffff", "eeee", "base"], 1)
    manifest = json.loads((long / "manifest.json").read_text())
    manifest.update(name="debian-bookworm+8a9465ecaebc+35062977c732", parent="debian-bookworm+8a9465ecaebc")
    (long / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--cache-dir", str(tmp_path), "image", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("DERIVED IMAGE"))) :][:3]
    assert len(table) == 3
    # Sorted by name, whatever order the directory lists them in: a layer follows its base.
    assert [row.split()[0] for row in table[1:]] == sorted(row.split()[0] for row in table[1:])
    parent_at = table[0].index("PARENT")
    assert all(row[parent_at:].startswith("debian-bookworm") and row[parent_at - 1] == " " for row in table[1:]), table
    size_at = table[0].index("SIZE") + len("SIZE")
    assert all(row[size_at - 2 : size_at] == "MB" for row in table[1:]), table


def test_prune_keeps_the_unsettled_marker_of_a_cached_derived_image_without_a_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its boot never settled, so it has no seed: the marker is all that says so."""
    monkeypatch.setattr(unsettled, "_mine", {})
    layer = _entry(tmp_path, "eeee", ["eeee", "base"], 0)
    manifest = json.loads((layer / "manifest.json").read_text())
    error = BootTimeout(f"{NOT_SETTLED} 300 s (systemd was still starting units: x.service)")
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    current = BuiltImage("debian-bookworm+eeee", "eeee", layer, manifest)
    gone = BuiltImage("debian-bookworm+ffff", "ffff", tmp_path / "images" / "derived-ffff", manifest)
    unsettled.record(seeds / "of-eeee", error, "seed", current)
    unsettled.record(seeds / "of-ffff", error, "seed", gone)
    assert main(["--cache-dir", str(tmp_path), "image", "prune"]) == 0
    assert unsettled.marker(seeds / "of-eeee").exists() and not unsettled.marker(seeds / "of-ffff").exists()
    assert f"removed {unsettled.marker(seeds / 'of-ffff')}" in capsys.readouterr().out


def test_prune_alone_removes_what_nothing_used_for_a_week(tmp_path: Path) -> None:
    recent, old = _entry(tmp_path, "1111", ["1111", "base"], 6), _entry(tmp_path, "2222", ["2222", "base"], 8)
    assert main(["--cache-dir", str(tmp_path), "image", "prune"]) == 0
    assert recent.is_dir() and not old.exists()


def test_prune_keeps_a_derived_image_that_a_saved_snapshot_rests_on(tmp_path: Path) -> None:
    held = _entry(tmp_path, "3333", ["3333", "aaaa", "base"], 30)
    under = _entry(tmp_path, "aaaa", ["aaaa", "base"], 30)  # what the held one rests on
    free = _entry(tmp_path, "4444", ["4444", "base"], 30)
    seeds = {}
    for key in ("3333", "4444"):
        seeds[key] = seed = tmp_path / "seeds" / f"debian-bookworm+{key}-512m1c1n-x"
        seed.mkdir(parents=True)
        parts = {"image": f"debian-bookworm+{key}", "image_key": key, "seed_version": 0}
        (seed / "manifest.json").write_text(json.dumps({"files": {}, "key_parts": parts, "created": 1.0}))
    snap = tmp_path / "snapshots" / "kept"
    snap.mkdir(parents=True)
    rests = {"parent": os.path.relpath(seeds["3333"], snap), "parent_created": 1.0}
    (snap / "manifest.json").write_text(
        json.dumps({"kind": "snapshot", "files": {}, "key_parts": {}, "rests_on": rests, "created": 1.0})
    )
    assert main(["--cache-dir", str(tmp_path), "image", "prune"]) == 0
    assert held.is_dir() and under.is_dir() and seeds["3333"].is_dir()  # the snapshot still forks
    assert not free.exists() and not seeds["4444"].exists()


def test_rm_takes_a_derived_name_or_key_and_removes_what_rests_on_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = _entry(tmp_path, "eeee1111eeee", ["eeee1111eeee", "base"], 0)
    child = _entry(tmp_path, "ffff2222ffff", ["ffff2222ffff", "eeee1111eeee", "base"], 0)
    other = _entry(tmp_path, "9999aaaa9999", ["9999aaaa9999", "base"], 0)
    assert remove_derived(tmp_path, "eeee") == []  # too short to be a key
    assert main(["--cache-dir", str(tmp_path), "image", "rm", "debian-bookworm+eeee1111eeee"]) == 0
    assert not parent.exists() and not child.exists() and other.is_dir()
    assert f"removed {parent}" in capsys.readouterr().out
    assert remove_derived(tmp_path, "9999aaaa") == [other] and not other.exists()


def test_prune_keeps_the_newest_failed_build_logs_of_derived_images(tmp_path: Path) -> None:
    from pytest_bottle.images.cache import KEEP_FAILED_LOGS, prune_logs

    logs = tmp_path / "logs"
    logs.mkdir()
    made = []
    for i in range(KEEP_FAILED_LOGS + 2):
        log = logs / f"derived-abcd1234-failed-{i}.log"
        log.write_text("step 1/1 failed\n")
        os.utime(log, (1000.0 + i, 1000.0 + i))
        made.append(log)
    removed = [p for p, _ in prune_logs(tmp_path)]
    assert sorted(removed) == sorted(made[:2])  # the oldest go, the newest stay
    assert all(p.exists() for p in made[2:])


def test_rm_removes_a_derived_image_and_the_layers_on_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent = _entry(tmp_path, "eeee", ["eeee", "base"], 0)
    child = _entry(tmp_path, "ffff", ["ffff", "eeee", "base"], 0)
    other = _entry(tmp_path, "gggg", ["gggg", "base"], 0)
    assert main(["--cache-dir", str(tmp_path), "image", "rm", "debian-bookworm+eeee"]) == 0
    out = capsys.readouterr().out
    assert f"removed {parent}" in out and f"removed {child}" in out
    assert not parent.exists() and not child.exists() and other.is_dir()
    assert main(["--cache-dir", str(tmp_path), "image", "rm", "debian-bookworm+eeee"]) == 1  # unknown now
    capsys.readouterr()
    # An unknown name lists the derived images rm would take beside the recipes.
    assert main(["--cache-dir", str(tmp_path), "image", "rm", "debian-bookworm+ggg"]) == 1
    assert "debian-trixie-minimal, debian-bookworm+gggg\n" in capsys.readouterr().err


def _parent(cache: Path, name: str, key: str, created: float) -> Path:
    path = cache / "images" / f"{name}-{key}"
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"name": name, "key": key, "created": created}))
    for f in ("rootfs.ext4", "vmlinuz", "initrd.img"):  # a whole entry, as the cache loads one
        (path / f).write_bytes(b"")
    return path


def _on(entry: Path, root: str, parent: str, parent_key: str, parent_created: float) -> Path:
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest.update(root=root, parent=parent, parent_key=parent_key, parent_created=parent_created)
    (entry / "manifest.json").write_text(json.dumps(manifest))
    return entry


def test_layers_whose_parent_is_gone_or_rebuilt_are_stale_and_pruned_even_if_used_today(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _parent(tmp_path, "debian-bookworm", "k1", created=100.0)
    fine = _on(_entry(tmp_path, "5555", ["5555", "k1"], 0), "debian-bookworm", "debian-bookworm", "k1", 100.0)
    rebuilt = _on(_entry(tmp_path, "6666", ["6666", "k1"], 0), "debian-bookworm", "debian-bookworm", "k1", 99.0)
    gone = _on(_entry(tmp_path, "7777", ["7777", "k0"], 0), "debian-bookworm", "debian-bookworm", "k0", 100.0)
    on_layer = _on(_entry(tmp_path, "8888", ["8888", "5555", "k1"], 0), "debian-bookworm", "web", "5555", 0.0)
    stale = {e.key: e.stale for e in list_derived(tmp_path)}
    assert stale == {
        "5555": "",
        "6666": "its parent debian-bookworm was rebuilt",
        "7777": "its parent debian-bookworm is gone",
        "8888": "",  # a derived parent, found as derived-KEY
    }
    assert main(["--cache-dir", str(tmp_path), "image", "list"]) == 0
    assert "(stale: its parent debian-bookworm is gone; bottle image prune)" in capsys.readouterr().out
    removed = prune_derived(tmp_path, 7)
    assert sorted(p for p, _, _ in removed) == [rebuilt, gone]
    assert fine.is_dir() and on_layer.is_dir()
    assert any("its parent debian-bookworm is gone" in why for _, _, why in removed)


def test_image_rm_of_a_recipe_image_removes_what_was_built_on_it(tmp_path: Path) -> None:
    base = _parent(tmp_path, "debian-bookworm", "k1", created=100.0)
    on_it = _on(_entry(tmp_path, "9999", ["9999", "k1"], 0), "debian-bookworm", "debian-bookworm", "k1", 100.0)
    other = _on(_entry(tmp_path, "aaaa", ["aaaa", "t1"], 0), "debian-trixie", "debian-trixie", "t1", 100.0)
    assert main(["--cache-dir", str(tmp_path), "image", "rm", "debian-bookworm"]) == 0
    assert not base.exists() and not on_it.exists() and other.is_dir()


def test_rm_from_takes_a_named_image_whose_layer_was_first_built_unnamed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The layer keeps the name it was first built under: ``rm web`` found
    nothing; with ``--from`` the name is the image's key."""
    from pytest_bottle import Image
    from pytest_bottle.images.image import NAMED

    defs = tmp_path / "defs.py"
    defs.write_text("from pytest_bottle import Image\nImage('debian-bookworm').write('/etc/n', 'n').named('web')\n")
    key = Image("debian-bookworm").write("/etc/n", "n").key
    layer = _entry(tmp_path, key, [key, "base"], 0)  # its manifest says debian-bookworm+KEY
    saved = dict(NAMED)
    try:
        assert main(["--cache-dir", str(tmp_path), "image", "rm", "web"]) == 1
        err = capsys.readouterr().err
        assert "give that file or module with --from FILE|MODULE to remove it" in err and layer.is_dir(), err
        older = _entry(tmp_path, "0ld0ld0ld0ld", ["0ld0ld0ld0ld", "base"], 0)  # an older build, named then
        manifest = json.loads((older / "manifest.json").read_text())
        (older / "manifest.json").write_text(json.dumps({**manifest, "name": "web"}))
        assert main(["--cache-dir", str(tmp_path), "image", "rm", "web", "--from", str(defs)]) == 0
        out = capsys.readouterr().out
        assert f"removed {layer}" in out and f"removed {older}" in out
        assert not layer.exists() and not older.exists()
        NAMED.clear()
        assert main(["--cache-dir", str(tmp_path), "image", "build", "web"]) == 1
        assert "with --from FILE|MODULE to build it" in capsys.readouterr().err
        # an entry name is never looked for in code: the hint said to give the file that names it so
        assert main(["--cache-dir", str(tmp_path), "image", "build", f"derived-{key}"]) == 1
        err = capsys.readouterr().err
        assert f"'derived-{key}' is a cached derived image's entry name; its steps are in your code" in err, err
    finally:
        NAMED.clear()
        NAMED.update(saved)


def test_a_layer_on_a_stale_layer_is_stale_too_and_prune_takes_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The child of a layer whose parent is gone cannot be used either (its
    parent is built again first): it must not keep that layer from prune."""
    _parent(tmp_path, "debian-bookworm", "k1", created=100.0)
    under = _on(_entry(tmp_path, "aaaa", ["aaaa", "k0"], 0), "debian-bookworm", "debian-bookworm", "k0", 100.0)
    child = _on(_entry(tmp_path, "bbbb", ["bbbb", "aaaa", "k0"], 0), "debian-bookworm", "web", "aaaa", 0.0)
    grandchild = _on(
        _entry(tmp_path, "cccc", ["cccc", "bbbb", "aaaa", "k0"], 0), "debian-bookworm", "web2", "bbbb", 0.0
    )
    stale = {e.key: e.stale for e in list_derived(tmp_path)}
    assert stale == {
        "aaaa": "its parent debian-bookworm is gone",
        "bbbb": "the layer it rests on, web, is stale (its parent debian-bookworm is gone)",
        "cccc": "the layer it rests on, web2, is stale "
        "(the layer it rests on, web, is stale (its parent debian-bookworm is gone))",
    }
    assert main(["--cache-dir", str(tmp_path), "image", "list"]) == 0
    assert "(stale: the layer it rests on, web, is stale" in capsys.readouterr().out
    removed = prune_derived(tmp_path, 7)
    assert sorted(p for p, _, _ in removed) == [under, child, grandchild]


def _recipe_entry(cache: Path, name: str, key: str, days_ago: float = 0.0) -> Path:
    path = cache / "images" / f"{name}-{key}"
    path.mkdir(parents=True)
    for f in ("rootfs.ext4", "vmlinuz", "initrd.img"):
        (path / f).write_bytes(b"x")
    created = time.time() - days_ago * 86400
    (path / "manifest.json").write_text(json.dumps({"name": name, "key": key, "created": created}))
    return path


def test_prune_keeps_recipes_it_does_not_know_and_what_is_built_on_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe a conftest.py registers is unknown to the `bottle` command: its
    image, and a layer used a minute ago on it, are not "of an old recipe"."""
    custom = Recipe(name="bookworm-extra", packages=(*BASE_PACKAGES, "nginx"))
    entry = _recipe_entry(tmp_path, custom.name, custom.key())
    layer = _entry(tmp_path, "ffff", ["ffff", custom.key()], 0)
    manifest = json.loads((layer / "manifest.json").read_text())
    created = json.loads((entry / "manifest.json").read_text())["created"]
    manifest.update(parent=custom.name, parent_key=custom.key(), parent_created=created)
    (layer / "manifest.json").write_text(json.dumps(manifest))
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / f"{entry.name}-failed-1.log").write_text("why it failed\n")
    assert main(["--cache-dir", str(tmp_path), "image", "prune"]) == 0
    assert entry.is_dir() and layer.is_dir() and (logs / f"{entry.name}-failed-1.log").is_file()
    assert "pruned 0 entries" in capsys.readouterr().out
    assert main(["--cache-dir", str(tmp_path), "image", "list"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(custom.name)]
    assert len(listed) == 1 and custom.key() in listed[0] and "(not registered here; --from)" in listed[0]
    # Not registered: its newest entry stays; another goes once built more than --older-than days ago.
    older = _recipe_entry(tmp_path, custom.name, "1111111111111111", days_ago=3)
    assert main(["--cache-dir", str(tmp_path), "image", "prune"]) == 0
    assert older.is_dir()
    assert main(["--cache-dir", str(tmp_path), "image", "prune", "--older-than", "2"]) == 0
    assert not older.exists() and entry.is_dir() and layer.is_dir()
    # Registered (as --from does), its old keys go, its current one stays.
    old = _recipe_entry(tmp_path, custom.name, "0123456789abcdef")
    monkeypatch.setitem(RECIPES, custom.name, custom)
    assert main(["--cache-dir", str(tmp_path), "image", "prune"]) == 0
    assert entry.is_dir() and layer.is_dir() and not old.exists()


def test_prune_keeps_the_layer_a_snapshot_rests_on_whatever_the_cache_path_looks_like(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (tmp_path / "proj").mkdir()
    layer = _entry(cache, "abab", ["abab", "base"], 30)
    seed = cache / "seeds" / "web-512m1c1n-abc"
    seed.mkdir(parents=True)
    (seed / "manifest.json").write_text(
        json.dumps({"key_parts": {"image": "web", "image_key": "abab"}, "created": 1.0, "files": {}})
    )
    snap = cache / "snapshots" / "kept-failure"
    snap.mkdir(parents=True)
    rests_on = {"disk_chain": ["../../seeds/web-512m1c1n-abc/disk.qcow2"], "parent": "../../seeds/web-512m1c1n-abc"}
    (snap / "manifest.json").write_text(
        json.dumps({"key_parts": {}, "created": 2.0, "files": {}, "rests_on": {**rests_on, "parent_created": 1.0}})
    )
    assert prune_derived(tmp_path / "proj" / ".." / "cache", 7.0) == []  # `bottle --cache-dir proj/../cache`
    assert layer.is_dir()
    assert [p for p, _, _ in prune_derived(cache, 7.0)] == []
