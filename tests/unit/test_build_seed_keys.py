"""A build seed (what derived images build on) beside bottle seeds: its own key,
name and place among an image's seeds (pure: no machine is started)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pytest_bottle.images.cache import BuiltImage
from pytest_bottle.store.gc import stale_seeds
from pytest_bottle.store.seeds import BUILD, key_parts, seed_dir


def _image(cache: Path) -> BuiltImage:
    path = cache / "images" / "img-k1"
    path.mkdir(parents=True)
    (path / "rootfs.ext4").write_bytes(b"")
    return BuiltImage("img", "k1", path, {"created": 5.0, "disk": "rootfs.ext4"})


def _seed(cache: Path, parts: dict[str, Any], created: float) -> Path:
    path = seed_dir(cache, parts)
    path.mkdir(parents=True)
    manifest = {"files": {}, "key_parts": parts, "created": created, "kind": "seed", "rests_on": {"disk_chain": []}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_a_build_seed_has_a_key_and_a_name_of_its_own(tmp_path: Path) -> None:
    image = _image(tmp_path)
    bottle, build = key_parts(image, "tcg", 1024, 1, 1), key_parts(image, "tcg", 1024, 1, 1, purpose=BUILD)
    assert "purpose" not in bottle  # a bottle seed's key is what it was before build seeds
    assert {k: v for k, v in build.items() if k != "purpose"} == bottle and build["purpose"] == "build"
    assert seed_dir(tmp_path, bottle).name.startswith("img-1024m1c1n-")
    assert seed_dir(tmp_path, build).name.startswith("img-1024m1c1n-build-")
    assert seed_dir(tmp_path, bottle) != seed_dir(tmp_path, build)


def test_a_build_seed_and_a_bottle_seed_of_one_shape_do_not_supersede_each_other(tmp_path: Path) -> None:
    image = _image(tmp_path)
    build = _seed(tmp_path, key_parts(image, "tcg", 1024, 1, 1, purpose=BUILD), created=1.0)
    bottle = _seed(tmp_path, key_parts(image, "tcg", 1024, 1, 1), created=2.0)
    assert stale_seeds(tmp_path, {"img": image}) == []
    # two of one kind: the older one goes, as before
    older = _seed(tmp_path, key_parts(image, "tcg", 1024, 1, 1, {"resolv_conf": "x"}), created=0.5)
    assert [(s.path, why) for s, why in stale_seeds(tmp_path, {"img": image})] == [
        (older, f"superseded by {bottle.name}")
    ]
    assert build.is_dir()
