"""pytest glue for the image matrix: ``--bottle-image a,b`` runs each bottle test once per image.

The list comes from the command line, else the ini file (comma- or
whitespace-separated).  With one image nothing is parametrized and test ids
do not change.  With several, every test whose fixture closure holds a bottle
fixture is parametrized over the images through one session-scoped fixture,
``_bottle_matrix_image``, that all bottle fixtures request:

- the id gets the image name (``test_x[debian-trixie]``);
- session scope, so ``module_bottle`` and ``session_bottle`` are one per image,
  and pytest groups the tests of one image together (one seed warm at a time,
  pre-started spares match the next test);
- a test whose ``bottle`` marker names an ``image`` is left alone: it runs
  once, on that image.

Collection is a pure function of the options, so each xdist worker
parametrizes identically.  Outside a matrix parameter the fixtures use the
first image of the list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest

from .errors import ImageNotFound, SpecError
from .images.image import known_names
from .usage import closest_marker

FIXTURE = "_bottle_matrix_image"
IMAGES = pytest.StashKey[tuple[str, ...]]()
# Set on a test's definition once it is parametrized by image, so the plugin's
# matrix and a conftest's own (``parametrize``) never both apply.
DONE = pytest.StashKey[bool]()


def parse_images(value: object, source: str) -> tuple[str, ...]:
    """``"a,b"``, ``"a b"`` or ``"a\\nb"`` → ``("a", "b")``; each entry checked.

    ``SpecError`` for an empty entry or a repeated one, ``ImageNotFound`` for a
    name no recipe or ``.named()`` image has; both name the entry, and the
    caller passes ``source`` on to the usage error it raises.
    """
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        if any(re.search(r"[,\s]", v.strip()) for v in value):
            raise SpecError(f"bad image list {value!r}: one name per entry", source)
        value = ",".join(value)  # a TOML list (pyproject's ini_options)
    if not isinstance(value, str):
        raise SpecError(f"bad image: must be a name or a list of names, not {value!r}", source)
    images: list[str] = []
    for position, part in enumerate(value.split(","), 1):
        names = part.split()
        if not names:
            raise SpecError(f"bad image list {value!r}: entry {position} is empty", source)
        for name in names:
            if name in images:
                raise SpecError(f"bad image list {value!r}: {name!r} is listed twice", source)
            if name not in known_names():
                raise ImageNotFound(name, known_names())
            images.append(name)
    return tuple(images)


def configure(config: pytest.Config, cli: dict[str, object], ini: dict[str, object], ini_label: str) -> None:
    """Read the list (command line first, then ini), keep it in the config's
    stash, and leave only its first image in ``cli``/``ini`` for everything
    that resolves one spec (report header, sweep, unparametrized fixtures)."""
    for layer, source in ((cli, "command line"), (ini, ini_label)):
        value = layer.get("image")
        if value is None:
            continue
        if isinstance(value, str) and value.strip() and not re.search(r"[,\s]", value.strip()):
            layer["image"] = value.strip()  # whitespace separates names: around one, it is nothing
            break  # one name: the resolver checks it as before
        images = parse_images(value, source)
        layer["image"] = images[0]
        config.stash[IMAGES] = images
        return
    config.stash[IMAGES] = ()


def images(config: pytest.Config, default: str) -> tuple[str, ...]:
    """The run's images; ``(default,)`` when no list was given."""
    return config.stash.get(IMAGES, ()) or (default,)


def parametrize(metafunc: pytest.Metafunc, names: Sequence[str]) -> bool:
    """Run this test once per image of ``names`` (if it uses a bottle and its
    marker names no image); False if it was left alone.  A conftest may call
    it from its own ``pytest_generate_tests`` to put chosen tests on a matrix."""
    if FIXTURE not in metafunc.fixturenames or metafunc.definition.stash.get(DONE, False):
        return False
    marker = metafunc.definition.get_closest_marker("bottle")
    if marker is not None and marker.kwargs.get("image") is not None:
        return False
    metafunc.parametrize(FIXTURE, list(names), ids=list(names), indirect=True, scope="session")
    metafunc.definition.stash[DONE] = True
    return True


@pytest.hookimpl(trylast=True)  # after the marks: the image ends the id
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.config.stash.get(IMAGES, ())
    if len(names) > 1:
        parametrize(metafunc, names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A case whose own marker names an image (``pytest.param(..., marks=
    pytest.mark.bottle(image=...))``, which ``parametrize`` cannot see) runs
    once, on that image: the matrix's other copies of it are deselected. The
    copy kept is the one with that image in its id, else the first."""
    groups: dict[str, list[pytest.Item]] = {}
    for item in items:
        image = _matrix_image(item)
        marker = closest_marker(item)
        if image is not None and marker is not None and marker.kwargs.get("image") is not None:
            case = item.nodeid.removesuffix(f"{image}]")[:-1]  # the image ends the id
            groups.setdefault(case, []).append(item)
    drop: set[int] = set()
    for group in groups.values():
        marker = closest_marker(group[0])
        wanted = marker.kwargs.get("image") if marker is not None else None
        chosen = next((i for i in group if _matrix_image(i) == wanted), group[0])
        drop.update(id(i) for i in group if i is not chosen)
    if drop:
        config.hook.pytest_deselected(items=[i for i in items if id(i) in drop])
        items[:] = [i for i in items if id(i) not in drop]


def _matrix_image(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    image = callspec.params.get(FIXTURE) if callspec is not None else None
    return image if isinstance(image, str) else None


@pytest.fixture(scope="session")
def _bottle_matrix_image(request: pytest.FixtureRequest) -> str | None:
    """This test's image in the matrix; None outside one (the fixtures then use the first image)."""
    return getattr(request, "param", None)
