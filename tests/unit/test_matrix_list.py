"""The image list of ``--bottle-image`` / ini ``bottle_image`` (pure parsing)."""

from __future__ import annotations

import pickle

import pytest

from pytest_bottle.errors import ImageNotFound, SpecError
from pytest_bottle.matrix import parse_images
from pytest_bottle.plugin import UnknownBottleImage


@pytest.mark.parametrize(
    "value",
    [
        "debian-bookworm,debian-trixie",
        "debian-bookworm, debian-trixie",
        "debian-bookworm debian-trixie",
        "\n  debian-bookworm\n  debian-trixie\n",
    ],
)
def test_commas_or_whitespace_separate_entries(value: str) -> None:
    assert parse_images(value, "command line") == ("debian-bookworm", "debian-trixie")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("debian-bookworm,,debian-trixie", "entry 2 is empty"),
        (",debian-trixie", "entry 1 is empty"),
        ("debian-trixie, ", "entry 2 is empty"),
        ("debian-trixie,debian-trixie", "'debian-trixie' is listed twice"),
        ("debian-trixie debian-bookworm debian-trixie", "'debian-trixie' is listed twice"),
    ],
)
def test_bad_entries_are_named_with_the_layer(value: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_images(value, "ini file")
    assert info.value.source == "ini file" and message in str(info.value)
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


def test_an_unknown_entry_is_named_and_the_known_listed() -> None:
    with pytest.raises(ImageNotFound) as info:
        parse_images("debian-trixie,debian-sid", "command line")
    assert info.value.name == "debian-sid" and "debian-trixie" in info.value.known


def test_a_toml_list_is_taken_and_anything_else_not_a_string_is_refused() -> None:
    assert parse_images(["debian-trixie", "debian-bookworm"], "ini file") == ("debian-trixie", "debian-bookworm")
    for bad in ([], [3], [""], ["debian-trixie,debian-bookworm"], 3, None):
        with pytest.raises(SpecError, match="a name or a list of names|one name per entry"):
            parse_images(bad, "ini file")


def test_the_usage_error_names_the_layer_and_survives_pickling() -> None:
    # What the plugin raises for an unknown entry: an ImageNotFound (name, known) and a usage error with its source.
    err = UnknownBottleImage("debian-sid", ["debian-trixie"], "ini file")
    assert isinstance(err, ImageNotFound) and isinstance(err, pytest.UsageError)
    assert str(err).startswith(
        "ini file: unknown image 'debian-sid'; known images: debian-trixie; an Image(...).named()"
    )
    assert str(UnknownBottleImage("x", ["a"], "@pytest.mark.bottle")).endswith("known images: a")  # a marker: no hint
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), vars(back), str(back)) == (UnknownBottleImage, vars(err), str(err))
    assert str(UnknownBottleImage("x", [])) == "unknown image 'x'; known images: (none)"
