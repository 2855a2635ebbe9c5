from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_bottle.errors import ImageNotFound
from pytest_bottle.images.recipes import RECIPES, Recipe, get_recipe
from pytest_bottle.images.sources import host_sources


def test_same_recipe_same_key() -> None:
    a = Recipe(name="x", packages=("python3", "iproute2"))
    b = Recipe(name="x", packages=("python3", "iproute2"))
    assert a.key() == b.key()
    assert len(a.key()) == 16


def test_changed_package_list_changes_key() -> None:
    a = Recipe(name="x", packages=("python3",))
    assert a.key() != dataclasses.replace(a, packages=("python3", "curl")).key()
    assert a.key() != dataclasses.replace(a, suite="trixie").key()
    assert a.key() != dataclasses.replace(a, disk_size="4G").key()


KEY_WITH_CHANGED_AGENT = """
import sys
from pathlib import Path
from pytest_bottle.images import recipes
tmp = Path(sys.argv[1])
for name in recipes.GUEST_FILES:
    (tmp / name).write_text((recipes.GUEST_DIR / name).read_text() + "\\n# changed\\n")
recipes.GUEST_DIR = tmp
print(recipes.Recipe(name="x").key())
"""


def test_key_covers_the_agent(tmp_path: Path) -> None:
    # Patching GUEST_DIR here would change every image key in this process,
    # under a pre-start thread that may be looking one up: a process of its own.
    r = subprocess.run(
        [sys.executable, "-c", KEY_WITH_CHANGED_AGENT, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert len(r.stdout.strip()) == 16 and r.stdout.strip() != Recipe(name="x").key()


def test_unknown_image_lists_known_names() -> None:
    with pytest.raises(ImageNotFound) as info:
        get_recipe("windows-95")
    assert info.value.known == sorted(RECIPES)
    assert "debian-bookworm" in str(info.value)


def test_default_recipe_contents() -> None:
    r = get_recipe("debian-bookworm")
    for pkg in ("linux-image-cloud-amd64", "systemd-sysv", "python3", "openssh-server", "iproute2", "ca-certificates"):
        assert pkg in r.packages
    for mod in ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_console", "virtio_net"):
        assert mod in r.initrd_modules
    assert r.has_sshd and not get_recipe("debian-bookworm-minimal").has_sshd


def test_host_sources_picks_the_suite(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "deb [signed-by=/k.gpg] http://mirror.example.org/debian bookworm main contrib\n"
        "deb http://mirror.example.org/debian trixie main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        textwrap.dedent("""\
        Types: deb
        URIs: http://mirror.example.org/debian-security
        Suites: bookworm-security
        Components: main
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

        Types: deb
        URIs: https://vendor.example.com/apt
        Suites: nodistro
        Components: main
        """)
    )
    text = host_sources("bookworm", tmp_path)
    assert "Suites: bookworm\n" in text and "Signed-By: /k.gpg" in text
    assert "bookworm-security" in text
    assert "trixie" not in text and "vendor.example.com" not in text


@pytest.mark.parametrize("name", ["debian-trixie", "debian-trixie-minimal"])
def test_trixie_recipes_are_their_bookworm_twins_on_debian_13(name: str) -> None:
    trixie, twin = get_recipe(name), get_recipe(name.replace("trixie", "bookworm"))
    assert trixie.suite == "trixie" and twin.suite == "bookworm"
    assert trixie.packages == twin.packages and trixie.masked_units == twin.masked_units
    assert trixie.initrd_modules == twin.initrd_modules and trixie.mirror is None
    assert trixie.has_sshd == twin.has_sshd == (not name.endswith("-minimal"))
    assert "Debian 13" in trixie.description and trixie.key() != twin.key()


@pytest.mark.parametrize(
    ("host", "tail"),
    [
        ("", " trixie /dev/null"),  # the host lists no trixie: mmdebstrap picks its own mirror
        ("Types: deb\nURIs: http://mirror.example.org/debian\nSuites: trixie\n", "/host.sources"),
    ],
)
def test_a_suite_the_host_does_not_list_leaves_the_mirror_to_mmdebstrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, tail: str
) -> None:
    from pytest_bottle.images import builder

    monkeypatch.setattr(builder, "host_sources", lambda suite: host if suite == "trixie" else "")
    argv = builder._mmdebstrap_argv("mmdebstrap", get_recipe("debian-trixie"), tmp_path)
    assert " ".join(argv).endswith(tail), argv
    assert argv[argv.index("trixie") : argv.index("trixie") + 2] == ["trixie", "/dev/null"]


@pytest.mark.parametrize("masked", [(), ("ssh.service",), ("sshd.service",)])
def test_ssh_service_stands_for_the_socket_unless_a_recipe_masks_it(tmp_path: Path, masked: tuple[str, ...]) -> None:
    """A recipe's mask of ssh.service stood as a link to /dev/null in the staging
    tree, and the ssh unit was written through it: into the host's /dev/null."""
    from pytest_bottle.images import guest_files

    null_before = Path("/dev/null").stat()
    recipe = dataclasses.replace(get_recipe("debian-bookworm"), masked_units=masked)
    assert recipe.has_sshd
    guest_files.write_guest_files(recipe, tmp_path)
    units, ours = tmp_path / "etc/systemd/system", tmp_path / "usr/local/lib/systemd/system/ssh.service"
    if masked:
        assert not ours.exists() and Path(f"{units}/{masked[0]}").readlink() == Path("/dev/null")
    else:
        assert "PropagatesStopTo=ssh.socket" in ours.read_text()
        assert (units / "sshd.service").readlink() == (units / "multi-user.target.wants/ssh.service").readlink()
        assert str((units / "sshd.service").readlink()) == "/usr/local/lib/systemd/system/ssh.service"
        assert not (units / "ssh.service").exists()  # /etc is left free: `systemctl mask ssh` works
    after = Path("/dev/null").stat()
    assert (after.st_mode, after.st_size) == (null_before.st_mode, 0)
