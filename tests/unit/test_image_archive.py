"""The export format's checks: manifests, member names, tampered and truncated files (no VM)."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from pytest_bottle import ImageImportError
from pytest_bottle.images import archive
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
        m = Member(f"images/{REF.entry}/{name}", len(data), archive.hashlib.sha256(data).hexdigest())
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


def _fake_cache(root: Path, backing: str | None = None) -> str:
    """A cache with a fake recipe image and a derived layer on it (a real
    qcow2 naming ``backing``, by default its parent's rootfs); returns the layer's entry."""
    base = root / "images" / REF.entry
    base.mkdir(parents=True)
    for name, data in FILES.items():
        (base / name).write_bytes(data)
    layer_key = "fedcba9876543210"
    layer = root / "images" / f"derived-{layer_key}"
    layer.mkdir()
    backing = backing or f"../{REF.entry}/rootfs.ext4"
    subprocess.run(
        ["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", backing, str(layer / "disk.qcow2"), "4M"],
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
