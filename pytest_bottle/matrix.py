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
from .usage import UnknownBottleImage, closest_marker

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
    that resolves one spec (report header, sweep, unparametrized fixtures).
    An ini list the command line overrides is checked too, and left as its
    first name: every layer's image is checked later, and must be one name."""
    chosen: tuple[str, ...] | None = None
    for layer, source in ((cli, "command line"), (ini, ini_label)):
        value = layer.get("image")
        if value is None:
            continue
        if isinstance(value, str) and value.strip() and not re.search(r"[,\s]", value.strip()):
            images: tuple[str, ...] = (value.strip(),)  # whitespace separates names: around one, it is nothing
        else:
            try:
                images = parse_images(value, source)
            except ImageNotFound as e:
                raise UnknownBottleImage(e.name, e.known, source) from None
        layer["image"] = images[0]  # one name: the resolver checks it as before
        if chosen is None:
            chosen = images
    config.stash[IMAGES] = chosen if chosen is not None and len(chosen) > 1 else ()


def images(config: pytest.Config, default: str) -> tuple[str, ...]:
    """The run's images; ``(default,)`` when no list was given."""
    return config.stash.get(IMAGES, ()) or (default,)


def parametrize(metafunc: pytest.Metafunc, names: str | Sequence[str]) -> bool:
    """Run this test once per image of ``names`` (if it uses a bottle and
    markers do not choose the image of each, see ``pinned``); False if it was left alone.  A conftest may call
    it from its own ``pytest_generate_tests`` to put chosen tests on a matrix;
    ``names`` are checked first (``SpecError``, ``ImageNotFound``)."""
    source = "pytest_bottle.matrix.parametrize()"
    try:  # one string is a list as --bottle-image takes it ("a,b"), not its letters
        names = parse_images(names if isinstance(names, str) else list(names), source)
    except ImageNotFound as e:
        raise ImageNotFound(e.name, e.known, source) from None
    if FIXTURE not in metafunc.fixturenames or metafunc.definition.stash.get(DONE, False):
        return False
    if pinned(metafunc.definition, metafunc.fixturenames):
        return False
    metafunc.parametrize(FIXTURE, list(names), ids=list(names), indirect=True, scope="session")
    metafunc.definition.stash[DONE] = True
    return True


# The fixtures whose image a marker may choose: the test's closest marker, or
# (module_bottle) the module's; the session-wide ones follow the matrix.
_BY_TEST_MARKER = ("bottle", "bottle_factory")
_BY_MODULE_MARKER = ("module_bottle",)


def _marker_image(node: pytest.Item | pytest.Collector | None) -> object:
    marker = closest_marker(node) if node is not None else None
    return marker.kwargs.get("image") if marker is not None else None


def pinned(node: pytest.Item, fixturenames: Sequence[str]) -> object:
    """The image a marker gives every VM fixture the test uses that a marker can
    pin (``bottle`` and ``bottle_factory``: the test's marker; ``module_bottle``:
    the module's), or None when one of them follows the matrix.  A test with only
    session-wide fixtures goes by its own marker."""
    own = _marker_image(node)
    deciders = [f for f in (*_BY_TEST_MARKER, *_BY_MODULE_MARKER) if f in fixturenames]
    module = _marker_image(node.getparent(pytest.Module)) if any(f in _BY_MODULE_MARKER for f in deciders) else None
    images = [module if f in _BY_MODULE_MARKER else own for f in deciders] or [own]
    return images[0] if all(i is not None for i in images) else None


@pytest.hookimpl(trylast=True)  # after the marks: the image ends the id
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.config.stash.get(IMAGES, ())
    if len(names) > 1:
        parametrize(metafunc, names)


@pytest.hookimpl(trylast=True)  # after a conftest's hook, which may add a marker too
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A case whose own marker names an image (``pytest.param(..., marks=
    pytest.mark.bottle(image=...))``, which ``parametrize`` cannot see, or one a
    hook added) runs once, on that image: the matrix's other copies of it are
    deselected. The copy kept is the one with that image in its id, else (an
    image off the list) the first copy left.  So is a case whose hook
    parametrized its ``bottle`` argument directly: no bottle of ours is left in
    it, so it is not auto-marked and runs once (its id keeps the first image)."""
    groups: dict[str, list[tuple[pytest.Item, object]]] = {}
    for item in items:
        image = _matrix_image(item)
        fixturenames = getattr(item, "fixturenames", ())
        if image is not None and FIXTURE not in fixturenames:
            # A hook parametrized its bottle directly, after the matrix copied it: no VM
            # of ours left in it, so it runs once, as the first image's copy.
            wanted: object = _NO_VM
        else:
            wanted = pinned(item, fixturenames) if image is not None else None
        if image is not None and wanted is not None:
            case = item.nodeid.removesuffix(f"{image}]")[:-1]  # the image ends the id
            groups.setdefault(case, []).append((item, wanted))
    drop: set[int] = set()
    names = config.stash.get(IMAGES, ())
    for group in groups.values():
        wanted = group[0][1]
        chosen = next((i for i, _ in group if _matrix_image(i) == wanted), None)
        if chosen is None and (wanted is _NO_VM or wanted not in names):  # the first copy runs it
            chosen = group[0][0]
        # (its own image's copy deselected, by -k say: the case does not run under another id)
        drop.update(id(i) for i, _ in group if i is not chosen)
    if drop:
        config.hook.pytest_deselected(items=[i for i in items if id(i) in drop])
        items[:] = [i for i in items if id(i) not in drop]


_NO_VM = object()


def _matrix_image(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    image = callspec.params.get(FIXTURE) if callspec is not None else None
    return image if isinstance(image, str) else None
