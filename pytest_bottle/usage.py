"""What pytest reports as a usage error: the plugin's ``pytest.UsageError``
twins of core errors, the options' names and help, and reading the marker, options and ini into specs.

The core (``spec``, ``errors``) imports without pytest; this module is the
thin layer where its errors become usage errors naming where a value came from.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from .errors import ImageNotFound, LockTimeout, SpecError, UnsafeDirectory
from .host.paths import cache_root
from .images.cache import BuiltImage
from .images.image import known_names
from .spec import PARSERS, BottleSpec, Layer, resolve
from .terminal_text import printable

# option name → (metavar, help); each is --bottle-<name> and ini bottle_<name>.
OPTIONS: dict[str, tuple[str, str]] = {
    "image": ("NAME[,...]", "image for bottle fixtures; a list: each test once per image (default: debian-bookworm)"),
    "accel": ("auto|kvm|tcg", "accelerator; auto proves KVM with a real boot, else TCG (default: auto)"),
    "cache-dir": ("PATH", "images, seeds and keys (default: $XDG_CACHE_HOME/pytest-bottle)"),
    "memory": ("SIZE", "VM memory, e.g. 512M or 1G (default: 512M)"),
    "cpus": ("N", "VM CPUs (default: 1)"),
    "boot": ("snapshot|cold", "restore from a work seed, or boot from scratch (default: snapshot)"),
    "timeout": ("SECONDS", "boot timeout of each VM (default: 300)"),
    "image-pull": (
        "URL",
        "where to pull a missing image from before building it: a URL or path with {name} and {key}, "
        "of a 'bottle image export' file (default: none, build)",
    ),
}
FLAGS: dict[str, str] = {
    "rebuild": "rebuild images and seeds once at the start of this run",
    "keep": "on failure keep the test's VMs running and print how to reach and stop them",
    "save-failed": "on failure save a snapshot of each of the test's VMs in the cache and print how to open it",
}
PRESTART_HELP = (
    "bottles of the current spec to restore ahead in the background, so the next test gets one at once "
    "(default: 1; 0 turns it off)"
)
MARKER_DOC = (
    "bottle(image=, memory=, cpus=, network=, lan=, forward=, boot=, timeout=): "
    "configure the VMs of the bottle fixtures this test uses (pytest-bottle; the marker starts none); "
    "see docs/reference.md"
)


class InvalidBottleArgument(SpecError, pytest.UsageError):  # type: ignore[misc]
    """A bad marker, factory, CLI or ini value (both a SpecError and a UsageError)."""


class UnsafeBottleDirectory(UnsafeDirectory, pytest.UsageError):  # type: ignore[misc]
    """An unsafe or unusable state or cache directory met at start-up (both
    errors: a usage error, not a traceback); ``source`` names the option that
    chose it, if one did."""

    source: str

    def __init__(self, path: str, reason: str, hint: str = "", source: str = "") -> None:
        super().__init__(path, reason, hint)
        _name_source(self, source)

    def _args(self) -> dict[str, Any]:
        return {**super()._args(), "source": self.source}


class BottleLockTimeout(LockTimeout, pytest.UsageError):  # type: ignore[misc]
    """A run-state lock that stayed held at start-up (both errors)."""


class UnknownBottleImage(ImageNotFound, pytest.UsageError):  # type: ignore[misc]
    """An unknown image name given to a marker, factory or option; ``source``
    names where it came from (as ``SpecError`` does), e.g. ``ini file``."""

    def __init__(self, name: str, known: Sequence[str], source: str = "") -> None:
        super().__init__(name, known, source)
        if source.startswith(OPTION_SOURCES):  # what a user who moved the Image into a subdirectory needs to know
            self.message += (
                "; an Image(...).named() name is known to options only from a plugin or a conftest.py pytest"
                " loads before it reads them: the root one, or one in or above a path given on the command line"
                " or in testpaths"
            )
            self.args = (printable(self.message),)


def _name_source(e: UnsafeBottleDirectory, source: str) -> None:
    """``source`` (where the value came from) first in the message, kept for pickling."""
    e.source = source
    if source:
        e.message = f"{source}: {e.message}"
        e.args = (printable(e.message),)


def resolve_layers(layers: list[Layer], restricted: int = 0) -> BottleSpec:
    try:
        spec = resolve(layers, restricted=restricted)
    except SpecError as e:
        raise InvalidBottleArgument(e.message, e.source) from None
    for source, values in layers:
        image = values.get("image")
        name = image.name if isinstance(image, BuiltImage) else image  # the bottle_image fixture's value
        if isinstance(name, str) and name not in known_names():
            raise UnknownBottleImage(name, known_names(), source)
    return spec


def source_of(layers: list[Layer], key: str) -> str:
    """Where ``key`` came from: the first layer that sets it (as ``resolve`` reads them)."""
    return next((where for where, layer in layers if layer.get(key) is not None), "")


def value_of(layers: list[Layer], key: str) -> object:
    """``key`` as the user wrote it, in that layer (None: the default)."""
    return next((layer[key] for _, layer in layers if layer.get(key) is not None), None)


def marker_layer(node: pytest.Item | pytest.Collector) -> list[Layer]:
    """The closest ``bottle`` marker as a layer: the one nearest the test (on the
    function, the decorator nearest ``def``; then its class; then the module)."""
    return closest(marker_layers(node))


def closest(layers: list[Layer]) -> list[Layer]:
    """Of ``marker_layers``, the closest that sets something: a bare mark only marks (``closest_marker``)."""
    return [layer for layer in layers if layer[1]][:1]


def warn_overridden(marker: Sequence[Layer], kwargs: Mapping[str, Any], source: str) -> None:
    """A factory argument that the test's marker sets otherwise is not used (the
    marker comes first): say so, rather than leave a bottle that silently lacks it."""
    for where, values in marker:
        for key in sorted(kwargs.keys() & values.keys()):
            mine, theirs = _meaning(key, kwargs[key]), _meaning(key, values[key])
            if mine is not None and theirs is not None and mine != theirs:
                warnings.warn(
                    f"{source}: {key}={kwargs[key]!r} is not used: {where} sets {key}={values[key]!r}, "
                    "and a marker comes before factory arguments",
                    UserWarning,
                    stacklevel=3,  # the test's call of the factory
                )


def _meaning(key: str, value: object) -> object:
    """What ``value`` sets ``key`` to (``"1G"`` is ``1024``; ports in any order), None
    for "not set" or a bad value (the spec's own error says what is wrong with it)."""
    parse = PARSERS.get(key)
    if value is None or parse is None:
        return None
    try:
        meant = parse[1](value)
    except ValueError:
        return None
    return tuple(sorted(meant)) if isinstance(meant, (list, tuple)) else meant


# The bare ``bottle`` mark the plugin puts on a test that uses a bottle fixture (``-m bottle``).
AUTO_MARK = pytest.StashKey[object]()


def _user_markers(node: pytest.Item | pytest.Collector) -> Iterator[tuple[str, pytest.Mark]]:
    """The ``bottle`` markers on ``node``, closest first, each with where it is; never
    ``AUTO_MARK``'s, which would hide one added later (``append=True``)."""
    auto = node.stash.get(AUTO_MARK, None)
    for owner, mark in node.iter_markers_with_node("bottle"):
        if mark is not auto:
            yield f"@pytest.mark.bottle on {owner.nodeid or owner.name}", mark


def closest_marker(node: pytest.Item | pytest.Collector) -> pytest.Mark | None:
    """The user's ``bottle`` marker nearest the test that sets something: a bare
    ``@pytest.mark.bottle`` only marks a test (``-m bottle``), as the plugin's own does."""
    return next((m for _, m in _user_markers(node) if m.args or m.kwargs), None)


def marker_layers(node: pytest.Item | pytest.Collector) -> list[Layer]:
    """Every ``bottle`` marker that applies to ``node``, closest first, each named
    by the node that holds it (an inherited ``pytestmark`` by its module or class)."""
    layers: list[Layer] = []
    for where, marker in _user_markers(node):
        if marker.args:
            raise InvalidBottleArgument(f"takes keyword arguments only, got {marker.args!r}", where)
        layers.append((where, marker.kwargs))
    return layers


def ini_type(name: str) -> Any:
    """A number may be a TOML number in pytest 9's ``[tool.pytest]`` table, which
    checks types (9.2 takes a union); elsewhere every ini value is a string."""
    if name not in ("memory", "cpus", "timeout", "prestart") or pytest.version_tuple[:2] < (9, 2):
        return None
    return str | int | float if name == "timeout" else str | int


OVERRIDE = "-o on the command line"
OPTION_SOURCES = ("command line", "ini file", OVERRIDE)


def _overridden(config: pytest.Config) -> set[str]:
    """The ini names given with ``-o NAME=...``."""
    return {o.split("=", 1)[0].strip() for o in (config.getoption("override_ini", None) or [])}


def ini_file(config: pytest.Config) -> str:
    """``ini file pyproject.toml``: pytest reads one of several files, and a user may not know which."""
    path = config.inipath
    if path is None:
        return "ini file"
    return f"ini file {path.name if path.parent == config.rootpath else path}"


def ini_source(config: pytest.Config, name: str) -> str:
    """Where the ini value ``name`` came from: ``-o`` on the command line, or the file."""
    return OVERRIDE if name in _overridden(config) else ini_file(config)


def ini_layers(config: pytest.Config, ini: dict[str, Any]) -> list[Layer]:
    """The ini values (``bottle_<key>``) as layers, those given with ``-o`` named so."""
    given = _overridden(config)
    over = {k: v for k, v in ini.items() if v is not None and f"bottle_{k}" in given}
    if not over:
        return [(ini_file(config), ini)]
    return [(OVERRIDE, over), (ini_file(config), {k: v for k, v in ini.items() if k not in over})]


def getini(config: pytest.Config, name: str) -> Any:
    try:
        return config.getini(name)
    # A bad bool (a ValueError before pytest 9.2), a value of the wrong TOML type, or
    # pytest's deprecation of one made an error (-W error): pytest's words name neither.
    except (pytest.UsageError, ValueError, TypeError, pytest.PytestWarning) as e:
        raise InvalidBottleArgument(f"bad {name}: {e}", ini_source(config, name)) from None


def set_value(value: Any) -> Any:
    """An ini value, or None where the file leaves it unset or empty (a TOML 0 is set)."""
    return None if value is None or value == "" or value == [] else value


def prestart(config: pytest.Config) -> int:
    for source, value in (
        ("command line", config.getoption("bottle_prestart")),
        (ini_source(config, "bottle_prestart"), set_value(getini(config, "bottle_prestart"))),
    ):
        if value is None:
            continue
        if not str(value).isdigit() or not 0 <= int(value) <= 8:
            raise InvalidBottleArgument(f"bad prestart: must be an integer from 0 to 8, not {value!r}", source)
        return int(value)
    return 1


def check_cache_dir(layers: list[Layer], path: Path) -> None:
    """A cache dir the command line or ini file chose is made (or checked) now,
    so a bad one stops the run at start-up naming its source; the default waits
    for the first bottle (a run without bottles must not need one)."""
    if source := source_of(layers, "cache_dir"):
        try:
            cache_root(path)
        except UnsafeDirectory as e:
            raise UnsafeBottleDirectory(**e._args(), source=source) from None


def refuse_param(request: pytest.FixtureRequest) -> None:
    """A bottle fixture parametrized indirectly would ignore its parameter: say how to configure it.
    A param a user's fixture of the same name (``params=``) passes down to ours is theirs: left alone."""
    if not hasattr(request, "param"):
        return
    item = getattr(request, "_pyfuncitem", request.node)  # a module_bottle's request.node is the module
    name = request.fixturename
    for mark in item.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        indirect = mark.kwargs.get("indirect", False)
        if name in names and (indirect is True or (isinstance(indirect, (list, tuple)) and name in indirect)):
            raise InvalidBottleArgument(
                f"the {name} fixture takes no parameter (indirect parametrization gave it "
                f"{printable(repr(request.param))[:200]}); give each case a marker instead: "
                'pytest.param(..., marks=pytest.mark.bottle(memory="1G"))',
                f"@pytest.mark.parametrize on {item.nodeid}",
            )
