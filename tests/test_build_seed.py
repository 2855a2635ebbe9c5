"""Derived images build on their parent's build seed: a restore of the parent
booted once, not a boot of the parent per build.  Real QEMU, real layers; the
layer's files are read with debugfs from a raw copy of the disk."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest_bottle
from pytest_bottle import Image
from pytest_bottle.images import BuiltImage, ensure_image
from pytest_bottle.store.saved import SavedState, list_seeds
from pytest_bottle.store.seeds import BUILD


def _build_seeds(cache: Path, image: BuiltImage) -> list[SavedState]:
    return [
        s
        for s in list_seeds(cache)
        if s.manifest["key_parts"].get("purpose") == BUILD and s.manifest["key_parts"]["image_key"] == image.key
    ]


def _guest_file(disk: Path, fmt: str, path: str, scratch: Path) -> str | None:
    """``path`` in the ext4 file system on ``disk`` (None if absent), read without booting it."""
    raw = scratch / "disk.raw"
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-O", "raw", "-f", fmt, str(disk), str(raw)], check=True)
        disk = raw
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(disk)], capture_output=True, text=True, check=True)
    raw.unlink(missing_ok=True)
    return None if "File not found" in r.stderr else r.stdout


def test_builds_restore_one_build_seed_and_their_layers_rest_on_the_parent_alone(
    warm_cache: Path, default_image: BuiltImage, tmp_path: Path
) -> None:
    # The shared cache: its build seed of the default image is made by the first build of the run.
    # (tests/test_boot_retry.py makes one in a cache of its own.)
    token = uuid.uuid4().hex
    first = Image("debian-bookworm").write("/etc/first-layer", token)
    second = Image("debian-bookworm").run(f"echo {token} > /etc/second-layer")
    built_first = ensure_image(first, warm_cache)
    (seed,) = _build_seeds(warm_cache, default_image)
    parts = seed.manifest["key_parts"]
    assert (parts["image"], parts["image_key"], parts["memory_mb"], parts["nics"]) == (
        "debian-bookworm",
        default_image.key,
        1024,
        1,
    )
    assert "-1024m1c1n-build-" in seed.path.name
    built_second = ensure_image(second, warm_cache)
    (again,) = _build_seeds(warm_cache, default_image)
    assert again.path == seed.path and again.created == seed.created  # used again, not made again
    for built in (built_first, built_second):  # each build restored it, and booted nothing itself
        log = (built.path / "build.log").read_text()
        assert f"restored the build seed {seed.path.name}\n" in log and "booting it once more" not in log

    for built in (built_first, built_second):
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(built.disk)], capture_output=True, text=True, check=True
            ).stdout
        )
        # the parent's disk, by the relative name a layer has: not the seed's disk
        name = info["backing-filename"]
        assert not os.path.isabs(name) and "seeds" not in name, name
        assert os.path.samefile(built.path / name, default_image.disk)
        assert info["backing-filename-format"] == default_image.disk_format
    assert sorted(p.name for p in built_second.path.iterdir()) == [
        "build.log",
        "disk.qcow2",
        "last-used",
        "manifest.json",
    ]

    # The build seed's boot is in the layer, but none of a clone's identity: the parent's
    # hostname, no SSH host key, no authorized key; and only this layer's own step.
    scratch = tmp_path / "raw"
    scratch.mkdir()
    layer = {
        p: _guest_file(built_second.disk, "qcow2", p, scratch)
        for p in (
            "/etc/second-layer",
            "/etc/first-layer",
            "/etc/hostname",
            "/etc/resolv.conf",
            "/etc/ssh/ssh_host_ed25519_key",
        )
    }
    layer["/root/.ssh/authorized_keys"] = _guest_file(built_second.disk, "qcow2", "/root/.ssh/authorized_keys", scratch)
    parent_hostname = _guest_file(default_image.disk, default_image.disk_format, "/etc/hostname", scratch)
    parent_resolv = _guest_file(default_image.disk, default_image.disk_format, "/etc/resolv.conf", scratch)
    assert layer == {
        "/etc/second-layer": f"{token}\n",
        "/etc/first-layer": None,
        "/etc/hostname": parent_hostname,
        "/etc/resolv.conf": parent_resolv,
        "/etc/ssh/ssh_host_ed25519_key": None,
        "/root/.ssh/authorized_keys": _guest_file(
            default_image.disk, default_image.disk_format, "/root/.ssh/authorized_keys", scratch
        ),
    }

    # The layer works: a bottle of it (restored from its own work seed) has the step's file.
    with pytest_bottle.launch(image=second) as b:
        assert b.read_text("/etc/second-layer").strip() == token
