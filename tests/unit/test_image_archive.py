"""The export format's checks: manifests, member names, tampered and truncated files (no VM)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_bottle import ImageImportError
from pytest_bottle.host.locks import reporting_lock
from pytest_bottle.images import archive, pull, transfer
from pytest_bottle.images.archive import ImageRef, Member
from pytest_bottle.images.image import check_pull_template
from pytest_bottle.images.pull import expand
from pytest_bottle.images.transfer import export, import_file

KEY = "0123456789abcdef"
REF = ImageRef(f"debian-bookworm-{KEY}", "recipe", "debian-bookworm", KEY)
FILES = {
    "manifest.json": json.dumps({"name": "debian-bookworm", "key": KEY, "created": 1.5}).encode(),
    "rootfs.ext4": b"\0" * (3 << 20) + b"ext4 data" + b"\0" * 4096,
    "vmlinuz": b"kernel",
    "initrd.img": b"initrd",
}


def _members(files: dict[str, bytes] = FILES) -> list[tuple[Member, bytes]]:
    out = []
    for name, data in files.items():
        m = Member(f"images/{REF.entry}/{name}", len(data), hashlib.sha256(data).hexdigest())
        out.append((m, data))
    return out


def _manifest(**changes: Any) -> dict[str, Any]:
    body = json.loads(archive.make_manifest([REF], [m for m, _ in _members()], {}))
    body.update(changes)
    return dict(body)


def write_export(path: Path, tmp: Path, files: dict[str, bytes] = FILES) -> None:
    """A well-formed export of a fake recipe image (through the real writer)."""
    pairs = []
    for m, data in _members(files):
        src = tmp / m.name.replace("/", "_")
        src.write_bytes(data)
        pairs.append((m, src))
    manifest = archive.make_manifest([REF], [m for m, _ in pairs], {})
    with open(path, "wb") as f:
        archive.write_archive(f, manifest, pairs, lambda line: None)


def raw_export(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    """An export written member by member (for forged ones)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    path.write_bytes(gzip.compress(buf.getvalue()))


def _reg(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def test_roundtrip_keeps_bytes_and_holes(tmp_path: Path) -> None:
    export = tmp_path / "x.tar.gz"
    write_export(export, tmp_path)
    dest = tmp_path / "out"
    dest.mkdir()
    images, members = archive.unpack(export, dest, lambda line: None)
    assert images == [REF] and [m.name.rsplit("/", 1)[1] for m in members] == list(FILES)
    rootfs = dest / "images" / REF.entry / "rootfs.ext4"
    assert rootfs.read_bytes() == FILES["rootfs.ext4"]
    assert rootfs.stat().st_blocks * 512 < 1 << 20  # the zero chunks stayed holes


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "images/../etc/passwd",
        f"images/{REF.entry}/../../x",
        f"images/{REF.entry}/rootfs.ext4/x",
        "images/other-entry/rootfs.ext4",
        f"images/{REF.entry}/.ssh",
        f"images/{REF.entry}/disk.qcow2",  # a recipe image has no layer
        "seeds/x/memory.ram",
        f"images/{REF.entry}//rootfs.ext4",
        "images/.tmp-x/rootfs.ext4",
        "images/ünïcode/rootfs.ext4",
        f"images/{REF.entry}\n/rootfs.ext4",
    ],
)
def test_member_names_must_be_plain_and_known(name: str) -> None:
    with pytest.raises(ImageImportError):
        archive.check_member_name(name, {REF.entry: REF})


def test_member_name_accepted() -> None:
    name = f"images/{REF.entry}/rootfs.ext4"
    assert archive.check_member_name(name, {REF.entry: REF}) == name


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"format": "tar"}, "not a pytest-bottle image export"),
        ({"version": 99}, "format version"),
        ({"images": []}, "lists no image"),
        ({"images": [dict(REF.to_dict(), entry="../x")]}, "is not"),
        ({"images": [dict(REF.to_dict(), key="NOT-A-KEY")]}, "bad name or key"),
        ({"images": [dict(REF.to_dict(), kind="derived")]}, "a chain is one recipe image"),
        ({"members": [{"name": f"images/{REF.entry}/vmlinuz", "size": -1, "sha256": "0" * 64}]}, "bad size"),
        ({"members": [{"name": f"images/{REF.entry}/vmlinuz", "size": 1 << 50, "sha256": "0" * 64}]}, "bad size"),
        ({"members": [{"name": f"images/{REF.entry}/vmlinuz", "size": 1, "sha256": "xyz"}]}, "bad sha256"),
        ({"members": []}, "lacks manifest.json"),
    ],
)
def test_manifest_checks(changes: dict[str, Any], says: str) -> None:
    with pytest.raises(ImageImportError, match=says):
        archive.parse_manifest(json.dumps(_manifest(**changes)).encode())


def test_manifest_that_is_not_json() -> None:
    with pytest.raises(ImageImportError, match="not JSON"):
        archive.parse_manifest(b"\x00garbage")


def _flip_inside_member(export: Path, member: str) -> None:
    """Flip one byte of ``member``'s data, keeping a valid gzip stream."""
    tar_bytes = bytearray(gzip.decompress(export.read_bytes()))
    with tarfile.open(fileobj=io.BytesIO(bytes(tar_bytes))) as tar:
        info = tar.getmember(member)
    tar_bytes[info.offset_data + info.size // 2] ^= 0x01
    export.write_bytes(gzip.compress(bytes(tar_bytes)))


def _nothing_left(cache: Path) -> None:
    images = cache / "images"
    assert not images.exists() or list(images.iterdir()) == [], list(images.iterdir())


def test_import_of_a_fake_image_and_refusals_leave_nothing(tmp_path: Path) -> None:
    export = tmp_path / "x.tar.gz"
    write_export(export, tmp_path)
    cache = tmp_path / "cache"
    done = import_file(export, cache)
    assert [(d.ref.entry, d.action) for d in done] == [(REF.entry, "imported")]
    assert (cache / "images" / REF.entry / "rootfs.ext4").read_bytes() == FILES["rootfs.ext4"]
    assert [d.action for d in import_file(export, cache)] == ["kept"]
    assert [p.name for p in (cache / "images").iterdir()] == [REF.entry]  # no temp dir left

    tampered = tmp_path / "tampered.tar.gz"
    tampered.write_bytes(export.read_bytes())
    _flip_inside_member(tampered, f"images/{REF.entry}/rootfs.ext4")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(export.read_bytes()[: export.stat().st_size // 2])
    empty = tmp_path / "empty"
    for bad, says in ((tampered, "does not match its sha256"), (truncated, "truncated|ends before|damaged")):
        with pytest.raises(ImageImportError, match=says):
            import_file(bad, empty)
        _nothing_left(empty)
    with pytest.raises(ImageImportError, match="key"):
        import_file(export, empty, want_key="f" * 16)
    _nothing_left(empty)


def test_forged_members_are_refused(tmp_path: Path) -> None:
    manifest = json.dumps(_manifest()).encode()
    good = [(_reg(m.name), data) for m, data in _members()]
    link = tarfile.TarInfo(f"images/{REF.entry}/vmlinuz")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    cases = {
        "not first": [*good[:1], (_reg(archive.MANIFEST), manifest), *good[1:]],
        "symlink": [(_reg(archive.MANIFEST), manifest), *good[:2], (link, b""), *good[3:]],
        "extra": [(_reg(archive.MANIFEST), manifest), *good, (_reg("../../evil"), b"x")],
        "reordered": [(_reg(archive.MANIFEST), manifest), good[1], good[0], *good[2:]],
    }
    for what, members in cases.items():
        path = tmp_path / f"{what.replace(' ', '-')}.tar.gz"
        raw_export(path, members)
        with pytest.raises(ImageImportError):
            import_file(path, tmp_path / "cache")
        _nothing_left(tmp_path / "cache")


def test_an_image_manifest_that_disagrees_is_refused(tmp_path: Path) -> None:
    files = dict(FILES, **{"manifest.json": json.dumps({"name": "other", "key": KEY}).encode()})
    export = tmp_path / "x.tar.gz"
    write_export(export, tmp_path, files)
    with pytest.raises(ImageImportError, match="its manifest names"):
        import_file(export, tmp_path / "cache")
    _nothing_left(tmp_path / "cache")


def test_pull_templates() -> None:
    assert check_pull_template("https://h/{name}-{key}.tar.gz")
    assert check_pull_template("/srv/images/{key}.tar.gz")
    for bad in ("ftp://h/x", "https://h/{nam}", "", 3):
        with pytest.raises(ValueError):
            check_pull_template(bad)
    assert expand("http://h/{name}/{key}.tgz", "debian-bookworm+abc", KEY) == f"http://h/debian-bookworm+abc/{KEY}.tgz"
    assert expand("http://h/{name}", "a b", KEY) == "http://h/a%20b"


def _fake_cache(root: Path, backing: str | None = None, fmt: str = "raw", rootfs_on: str | None = None) -> str:
    """A cache with a fake recipe image and a derived layer on it (a real
    qcow2 naming ``backing`` in format ``fmt``, by default its parent's
    rootfs); ``rootfs_on``: the recipe's rootfs.ext4 is instead a qcow2 on
    that host file.  Returns the layer's entry."""
    base = root / "images" / REF.entry
    base.mkdir(parents=True)
    for name, data in FILES.items():
        (base / name).write_bytes(data)
    if rootfs_on is not None:
        (base / "rootfs.ext4").unlink()
        argv = ["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", rootfs_on]
        subprocess.run([*argv, str(base / "rootfs.ext4"), "4M"], check=True)
    layer_key = "fedcba9876543210"
    layer = root / "images" / f"derived-{layer_key}"
    layer.mkdir()
    backing = backing or f"../{REF.entry}/rootfs.ext4"
    subprocess.run(
        ["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", fmt, "-b", backing, str(layer / "disk.qcow2"), "4M"],
        check=True,
        cwd=layer,
    )
    manifest = {
        "kind": "derived",
        "name": "web",
        "key": layer_key,
        "parent": "debian-bookworm",
        "parent_key": KEY,
        "parent_created": 1.5,
        "created": 2.5,
        "chain": [layer_key, KEY],
    }
    (layer / "manifest.json").write_text(json.dumps(manifest))
    return layer.name


def test_a_derived_image_travels_with_its_parent(tmp_path: Path) -> None:
    entry = _fake_cache(tmp_path / "a")
    refs, _ = export("web", tmp_path / "web.tar.gz", tmp_path / "a")
    assert [r.entry for r in refs] == [REF.entry, entry]
    done = import_file(tmp_path / "web.tar.gz", tmp_path / "b")
    assert [(d.ref.entry, d.action) for d in done] == [(REF.entry, "imported"), (entry, "imported")]
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(tmp_path / "b" / "images" / entry / "disk.qcow2")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["backing-filename"] == f"../{REF.entry}/rootfs.ext4"


@pytest.mark.parametrize("backing", ["/etc/hostname", f"../../../{REF.entry}/rootfs.ext4"])
def test_a_layer_resting_on_anything_but_its_parent_is_refused(tmp_path: Path, backing: str) -> None:
    _fake_cache(tmp_path / "a", backing)
    export("web", tmp_path / "web.tar.gz", tmp_path / "a")
    with pytest.raises(ImageImportError, match="must be a layer on"):
        import_file(tmp_path / "web.tar.gz", tmp_path / "b")
    _nothing_left(tmp_path / "b")


def test_a_recipe_disk_that_is_a_qcow2_on_a_host_file_is_refused(tmp_path: Path) -> None:
    """rootfs.ext4 a qcow2 on /etc/hostname, the layer on it naming it qcow2: refused."""
    _fake_cache(tmp_path / "a", fmt="qcow2", rootfs_on="/etc/hostname")
    export("web", tmp_path / "web.tar.gz", tmp_path / "a")
    with pytest.raises(ImageImportError, match="not raw"):
        import_file(tmp_path / "web.tar.gz", tmp_path / "b")
    _nothing_left(tmp_path / "b")


def test_a_layer_naming_its_raw_parent_as_qcow2_is_refused(tmp_path: Path) -> None:
    _fake_cache(tmp_path / "a", fmt="qcow2")
    export("web", tmp_path / "web.tar.gz", tmp_path / "a")
    with pytest.raises(ImageImportError, match="format"):
        import_file(tmp_path / "web.tar.gz", tmp_path / "b")
    _nothing_left(tmp_path / "b")


def _bomb(path: Path, kind: bytes, size: int) -> None:
    """A small gzip whose first tar header is a pax header (or GNU long name)
    claiming ``size`` bytes of body, all zeros."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = kind, size
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = [z.compress(info.tobuf(tarfile.USTAR_FORMAT))]
    for _ in range(size >> 20):
        out.append(z.compress(bytes(1 << 20)))
    out.append(z.flush())
    path.write_bytes(b"".join(out))


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_a_huge_tar_header_is_refused_without_reading_it(tmp_path: Path, kind: bytes) -> None:
    bomb = tmp_path / "bomb.tar.gz"
    _bomb(bomb, kind, 64 << 20)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ImageImportError) as e:
            import_file(bomb, tmp_path / "cache")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # the 64 MiB body was never read
    assert "tar header" in e.value.reason
    _nothing_left(tmp_path / "cache")


def test_a_chain_of_thousands_of_tar_extension_headers_is_refused(tmp_path: Path) -> None:
    """tarfile follows such a chain by recursion: 10 KB of gzip that would
    end every run pulling from its URL with a RecursionError."""
    link = tarfile.TarInfo("././@LongLink")
    link.type, link.size = tarfile.GNUTYPE_LONGNAME, 10
    body = (link.tobuf(tarfile.USTAR_FORMAT) + b"aaaaaaaaa\0".ljust(512, b"\0")) * 5000
    last = tarfile.TarInfo("bottle-export.json")
    forged = tmp_path / "chain.tar.gz"
    forged.write_bytes(gzip.compress(body + last.tobuf(tarfile.USTAR_FORMAT) + bytes(1024)))
    with pytest.raises(ImageImportError) as e:
        import_file(forged, tmp_path / "cache")
    assert "damaged, truncated or forged (RecursionError" in e.value.reason
    _nothing_left(tmp_path / "cache")


def test_sha256_is_checked_on_the_bytes_unpacked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local file swapped for another valid export after it was opened for
    the checksum: the import must still be refused."""
    good = tmp_path / "x.tar.gz"
    write_export(good, tmp_path)
    sha = archive.file_sha256(good)
    other = tmp_path / "other.tar.gz"
    (tmp_path / "o").mkdir()
    write_export(other, tmp_path / "o", dict(FILES, vmlinuz=b"another kernel"))
    real = import_file

    def swapped(path: Path, *args: Any, **kw: Any) -> Any:
        os.replace(other, path)  # after any check of the old bytes, before the import opens it
        return real(path, *args, **kw)

    monkeypatch.setattr(pull, "import_file", swapped)
    with pytest.raises(ImageImportError, match="sha256"):
        pull.import_source(str(good), tmp_path / "cache", sha256=sha)
    _nothing_left(tmp_path / "cache")
    monkeypatch.undo()
    write_export(good, tmp_path)
    assert [d.action for d in pull.import_source(str(good), tmp_path / "cache", sha256=sha.upper())] == ["imported"]


def test_no_replace_rechecks_under_the_entry_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another build of the entry committed after the first check but before
    the entry lock: a pull (replace=False) keeps it and publishes nothing."""
    export_file = tmp_path / "x.tar.gz"
    write_export(export_file, tmp_path)
    cache = tmp_path / "cache"
    final = cache / "images" / REF.entry
    theirs = json.dumps({"name": REF.name, "key": KEY, "created": 9.5})
    real = reporting_lock

    @contextlib.contextmanager
    def racing(lock: Path, what: str) -> Iterator[None]:
        if lock.name.endswith(REF.entry) or REF.entry in lock.name:
            final.mkdir(parents=True, exist_ok=True)
            (final / "manifest.json").write_text(theirs)
        with real(lock, what):
            yield

    monkeypatch.setattr(transfer, "reporting_lock", racing)
    with pytest.raises(ImageImportError, match="another build"):
        import_file(export_file, cache, replace=False)
    assert (final / "manifest.json").read_text() == theirs
    assert sorted(p.name for p in (cache / "images").iterdir()) == [REF.entry]


def test_imported_files_are_private(tmp_path: Path) -> None:
    export_file = tmp_path / "x.tar.gz"
    write_export(export_file, tmp_path)
    import_file(export_file, tmp_path / "cache")
    entry = tmp_path / "cache" / "images" / REF.entry
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in entry.iterdir()} == {0o600}


def test_too_little_free_space_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export_file = tmp_path / "x.tar.gz"
    write_export(export_file, tmp_path)
    monkeypatch.setattr(archive, "MIN_FREE", 1 << 62)
    with pytest.raises(ImageImportError, match="free"):
        import_file(export_file, tmp_path / "cache")
    _nothing_left(tmp_path / "cache")


def test_members_adding_up_to_too_much_are_refused() -> None:
    big = [
        {"name": f"images/{REF.entry}/{f}", "size": 40 << 30, "sha256": "0" * 64} for f in archive.REQUIRED["recipe"]
    ]
    with pytest.raises(ImageImportError, match="add up"):
        archive.parse_manifest(json.dumps(_manifest(members=big)).encode())


def test_a_recipe_image_named_like_a_derived_one_is_refused() -> None:
    ref = archive.entry_name("recipe", "derived", KEY)
    images = [dict(REF.to_dict(), name="derived", entry=ref)]
    with pytest.raises(ImageImportError, match="may not be named"):
        archive.parse_manifest(json.dumps(_manifest(images=images)).encode())


@pytest.mark.parametrize(
    "change",
    [{"created": "yesterday"}, {"created": float("nan")}, {"chain": ["fedcba9876543210"]}, {"parent_created": None}],
)
def test_a_layer_manifest_that_does_not_add_up_is_refused(tmp_path: Path, change: dict[str, Any]) -> None:
    entry = _fake_cache(tmp_path / "a")
    path = tmp_path / "a" / "images" / entry / "manifest.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **change)))
    export("web", tmp_path / "web.tar.gz", tmp_path / "a")
    with pytest.raises(ImageImportError, match="created|built on"):
        import_file(tmp_path / "web.tar.gz", tmp_path / "b")
    _nothing_left(tmp_path / "b")


def test_export_does_not_follow_a_planted_temp_name(tmp_path: Path) -> None:
    _fake_cache(tmp_path / "a")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "web.tar.gz"
    (tmp_path / f".{out.name}.tmp-{os.getpid()}").symlink_to(victim)
    export("web", out, tmp_path / "a")
    assert victim.read_text() == "precious"
    assert [d.ref.entry for d in import_file(out, tmp_path / "b")][-1].startswith("derived-")


@pytest.mark.parametrize("size", ["-1", "0", "lots"])
def test_import_refuses_a_max_size_below_one_mb(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_bottle.cli import main

    with pytest.raises(SystemExit) as e:
        main(["image", "import", "/nonexistent.bottle", "--max-size", size])
    assert e.value.code == 2 and "a whole number of MB, at least 1" in capsys.readouterr().err


def test_an_unknown_image_to_export_lists_the_derived_names_it_takes(tmp_path: Path) -> None:
    from pytest_bottle.errors import ImageNotFound

    layer = tmp_path / "images" / "derived-0123456789abcdef"
    layer.mkdir(parents=True)
    (layer / "manifest.json").write_text(json.dumps({"name": "web-for-export", "key": "0123456789abcdef"}))
    assert transfer.find_entry("web-for-export", tmp_path) == layer  # taken by its shown name...
    with pytest.raises(ImageNotFound) as e:
        transfer.find_entry("web-for-exprot", tmp_path)
    assert "web-for-export" in e.value.known and "debian-bookworm" in e.value.known  # ...so listed as one
