"""A cache CI can carry: export, import (file and HTTP), pull before build, a moved cache.

Frugal with VM time: everything reuses the default image of the warm cache;
the export is made once per module; only the import test and the moved
cache start bottles (the first makes a seed in its new cache, ~1 min).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import pytest_bottle
from pytest_bottle import ImageImportError
from pytest_bottle.images import BuiltImage
from pytest_bottle.images.pull import pull_missing
from pytest_bottle.images.transfer import import_file
from pytest_bottle.store.seeds import list_seeds


def bottle_cli(*args: str, cache: Path, umask: int = -1) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pytest_bottle.cli", "--cache-dir", str(cache), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, umask=umask)


@pytest.fixture(scope="module")
def exported(default_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default image as an export file, named as a pull template would: ``<name>-<key>.tar.gz``."""
    out = tmp_path_factory.mktemp("exports") / f"{default_image.name}-{default_image.key}.tar.gz"
    r = bottle_cli("image", "export", default_image.name, str(out), cache=default_image.path.parent.parent, umask=0o027)
    assert r.returncode == 0, r.stderr
    assert "sha256 " in r.stdout
    # What a plain open would make under the user's umask: a layer may hold secrets its steps wrote.
    assert out.stat().st_mode & 0o777 == 0o640, oct(out.stat().st_mode)
    return out


@pytest.fixture
def empty_cache(tmp_path: Path, warm_cache: Path) -> Path:
    """A new cache directory with nothing but this host's accelerator verdict (no KVM probe again)."""
    cache = tmp_path / "new-cache"
    cache.mkdir(mode=0o700)
    if (warm_cache / "accel.json").exists():
        shutil.copy(warm_cache / "accel.json", cache / "accel.json")
    return cache


def leftovers(cache: Path) -> list[str]:
    images = cache / "images"
    return sorted(p.name for p in images.iterdir()) if images.is_dir() else []


def test_export_import_into_a_new_cache_then_a_bottle_runs(
    exported: Path, default_image: BuiltImage, empty_cache: Path
) -> None:
    r = bottle_cli("image", "import", str(exported), cache=empty_cache)
    assert r.returncode == 0, r.stderr
    assert f"imported {default_image.path.name}" in r.stdout
    entry = empty_cache / "images" / default_image.path.name
    assert json.loads((entry / "manifest.json").read_text())["created"] == default_image.created
    assert (entry / "rootfs.ext4").stat().st_blocks * 512 < default_image.rootfs.stat().st_size  # holes kept
    again = bottle_cli("image", "import", str(exported), cache=empty_cache)
    assert again.returncode == 0 and f"kept {default_image.path.name}" in again.stdout
    with pytest_bottle.launch(cache_dir=empty_cache) as b:
        assert b.exec("true").returncode == 0
    assert leftovers(empty_cache) == [default_image.path.name]


def _content(data: bytes) -> str | None:
    """The sha256 of what a gzip stream decompresses to, or None if it is corrupt."""
    z, h = zlib.decompressobj(wbits=31), hashlib.sha256()
    try:
        for i in range(0, len(data), 1 << 20):
            h.update(z.decompress(data[i : i + (1 << 20)]))
        h.update(z.flush())
    except zlib.error:
        return None
    return h.hexdigest() if z.eof else None


def _really_damaged(data: bytes, where: int) -> bytes:
    """``data`` with one bit flipped at or after ``where`` that changes what it
    decompresses to: a flip in a deflate block's padding bits changes nothing,
    and such a file is rightly imported."""
    good = _content(data)
    for pos in range(where, where + 64):
        flipped = bytearray(data)
        flipped[pos] ^= 0x40
        if _content(bytes(flipped)) != good:
            return bytes(flipped)
    raise AssertionError(f"no bit flip at {where}..{where + 63} changed the export's content")


def test_tampered_and_truncated_exports_are_refused(exported: Path, tmp_path: Path, empty_cache: Path) -> None:
    data = exported.read_bytes()
    tampered = tmp_path / "tampered.tar.gz"
    tampered.write_bytes(_really_damaged(data, len(data) // 3))  # inside the rootfs member's compressed bytes
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    for bad in (tampered, truncated):
        with pytest.raises(ImageImportError, match="damaged|truncated|sha256|ends before"):
            import_file(bad, empty_cache)
        assert leftovers(empty_cache) == []
        r = bottle_cli("image", "import", str(bad), cache=empty_cache)
        assert r.returncode == 1 and "ImageImportError" in r.stderr, r.stderr
        assert leftovers(empty_cache) == []
    assert not list((empty_cache / "locks").glob("image-import-*"))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server(exported: Path) -> Iterator[str]:
    """http.server on 127.0.0.1 serving the export's directory; yields its base URL."""
    handler = functools.partial(_Quiet, directory=str(exported.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_pull_from_http_via_the_ini_template(
    pytester: pytest.Pytester, http_server: str, default_image: BuiltImage, empty_cache: Path
) -> None:
    pytester.makeini(
        f"[pytest]\nbottle_cache_dir = {empty_cache}\nbottle_image_pull = {http_server}/{{name}}-{{key}}.tar.gz\n"
    )
    pytester.makepyfile(f"""
        def test_pulled(bottle_image):
            assert bottle_image.key == "{default_image.key}"
            assert str(bottle_image.path).startswith("{empty_cache}")
            assert (bottle_image.path / "build.log").is_file()
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=1)
    assert "downloading http://127.0.0.1" in result.stdout.str() + result.stderr.str()
    assert "building image" not in result.stdout.str() + result.stderr.str()
    assert leftovers(empty_cache) == [default_image.path.name]


def test_pull_refuses_another_key_and_a_missing_file(http_server: str, exported: Path, empty_cache: Path) -> None:
    wrong = "f" * 16
    os.link(exported, exported.parent / f"debian-bookworm-{wrong}.tar.gz")  # the URL of another key, our bytes
    try:
        template = http_server + "/{name}-{key}.tar.gz"
        why = pull_missing(template, "debian-bookworm", wrong, empty_cache, lambda: False)
        assert "not used" in why and wrong in why, why
        assert leftovers(empty_cache) == []
        why = pull_missing(http_server + "/nothing/{key}", "debian-bookworm", wrong, empty_cache, lambda: False)
        assert "HTTP 404" in why, why
    finally:
        (exported.parent / f"debian-bookworm-{wrong}.tar.gz").unlink()


def test_a_moved_cache_keeps_working(default_image: BuiltImage, warm_cache: Path, tmp_path: Path) -> None:
    """cp -a the image, its seeds and the keys, rename the copy, and start a
    bottle from the new place: its seed is reused and nothing names the old one."""
    first = tmp_path / "restored-here"
    (first / "images").mkdir(parents=True)
    (first / "seeds").mkdir()
    first.chmod(0o700)
    subprocess.run(["cp", "-a", str(default_image.path), str(first / "images")], check=True)
    seeds = [s for s in list_seeds(warm_cache) if s.manifest["key_parts"]["image_key"] == default_image.key]
    for seed in seeds:
        subprocess.run(["cp", "-a", str(seed.path), str(first / "seeds")], check=True)
    for name in ("keys", "accel.json"):
        if (warm_cache / name).exists():
            subprocess.run(["cp", "-a", str(warm_cache / name), str(first)], check=True)
    with pytest_bottle.launch(cache_dir=first) as b:  # the seed is there: a restore, not a new seed
        assert b.exec("true").returncode == 0
    made = sorted(p.name for p in (first / "seeds").iterdir() if p.is_dir())
    moved = tmp_path / "moved-there"
    first.rename(moved)
    with pytest_bottle.launch(cache_dir=moved) as b:
        assert b.exec("true").returncode == 0
        qemu = psutil.Process(b.pid)
        seen = [*qemu.cmdline(), *(f.path for f in qemu.open_files())]
        seen += [m.path for m in qemu.memory_maps()]
        assert not [p for p in seen if str(first) in p]
    assert sorted(p.name for p in (moved / "seeds").iterdir() if p.is_dir()) == made  # no seed made again
    texts = [p.read_text(errors="replace") for p in moved.rglob("*.json")]
    assert not [t for t in texts if str(first) in t]


def test_bad_export_and_import_arguments_are_refused_before_any_work(
    default_image: BuiltImage, exported: Path, tmp_path: Path, empty_cache: Path
) -> None:
    """A directory as the export file was found after the whole export, as a
    traceback; a missing directory was a traceback at once; a symlink (to
    /dev/null here) or a FIFO was replaced by the export's file; a malformed
    --sha256 or --key was found after reading the whole file."""
    cache = default_image.path.parent.parent
    (tmp_path / "adir").mkdir()
    (tmp_path / "alink").symlink_to("/dev/null")
    os.mkfifo(tmp_path / "afifo")
    cases = [
        (("image", "export", default_image.name, str(tmp_path / "adir")), cache,
         f"bottle: SpecError: export: {tmp_path / 'adir'} is a directory; give the file to write"),
        (("image", "export", default_image.name, str(tmp_path / "nodir" / "x.tar.gz")), cache,
         f"bottle: SpecError: export: cannot write {tmp_path / 'nodir' / 'x.tar.gz'}: {tmp_path / 'nodir'} is not"),
        (("image", "export", default_image.name, str(tmp_path / "alink")), cache,
         f"bottle: SpecError: export: {tmp_path / 'alink'} is a symlink; the export replaces it whole"),
        (("image", "export", default_image.name, str(tmp_path / "afifo")), cache,
         f"bottle: SpecError: export: {tmp_path / 'afifo'} is not a regular file; the export replaces it whole"),
        (("image", "import", str(tmp_path / "adir")), empty_cache,
         f"bottle: ImageImportError: cannot import {tmp_path / 'adir'}: it is a directory, not an export file"),
        (("image", "import", str(tmp_path / "afifo")), empty_cache,
         f"bottle: ImageImportError: cannot import {tmp_path / 'afifo'}: it is not a regular file (a FIFO, a device)"),
        (("image", "import", str(exported), "--key", "debian-bookworm"), empty_cache,
         "bottle: SpecError: import: --key must be an image key, 16 hex digits (as image list shows it), not 'debian-"),
        (("image", "import", str(exported), "--sha256", "00"), empty_cache,
         "bottle: SpecError: import: --sha256 must be 64 hex digits (as export printed it), not '00'"),
    ]  # fmt: skip
    for args, where, expected in cases:
        r = bottle_cli(*args, cache=where)
        assert r.returncode == 1 and r.stderr.startswith(expected), (args, r.stderr)
        assert "Traceback" not in r.stderr and "exporting" not in r.stdout + r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afifo", "alink", "new-cache"] and not list(
        (tmp_path / "adir").iterdir()
    )
    assert leftovers(empty_cache) == []
