"""Shared fixtures for the integration tests."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pytest_bottle
from pytest_bottle import matrix
from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.images import BuiltImage, ensure_image

# -- the suite runs in a random order: no test may lean on another ------------
# (Our own shuffle, not pytest-randomly: that would shuffle every suite run
# with this virtualenv, users' included, and pytest-bottle must not.)
SEED = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--suite-seed", type=int, default=None, help="replay the order of a run (its header shows it)")
    parser.addoption("--suite-in-order", action="store_true", help="run the tests in file order")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_NoVmHalf(), "suite-no-vm-half")
    given = getattr(config, "workerinput", {}).get("suite_seed")  # an xdist worker: the controller's
    seed = given if given is not None else config.getoption("suite_seed")
    config.stash[SEED] = seed if seed is not None else random.randrange(1, 1_000_000)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: every worker shuffles alike, so their collections match."""
    node.workerinput["suite_seed"] = node.config.stash[SEED]


def pytest_report_header(config: pytest.Config) -> str:
    if config.getoption("suite_in_order"):
        return "suite order: as in the files"
    return f"suite order: shuffled, --suite-seed={config.stash[SEED]} replays it"


@pytest.hookimpl(tryfirst=True)  # before pytest groups the tests by their session fixture's parameter (the image)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules in a random order, and in each the classes and the tests; a
    module's (or class's) tests stay together, so its fixtures are set up once."""
    if config.getoption("suite_in_order"):
        return
    rng = random.Random(config.stash[SEED])
    modules: dict[str, dict[str, list[pytest.Item]]] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        parent = item.parent.nodeid if item.parent is not None else module
        modules.setdefault(module, {}).setdefault(parent, []).append(item)
    order = list(modules.values())
    rng.shuffle(order)
    shuffled: list[pytest.Item] = []
    for groups in order:
        parents = list(groups.values())
        rng.shuffle(parents)
        for tests in parents:
            rng.shuffle(tests)
            shuffled += tests
    items[:] = shuffled


class _NoVmHalf:
    """xdist's worksteal hands each of two workers half of the list at first:
    the second half opens with the tests that start no VM (tests/unit, in their
    shuffled order), so that one worker runs them while the other builds the
    default image and seed instead of waiting for their locks.  After pytest's
    own reordering (tests of one image parameter pulled together), which would
    move VM tests ahead of them; at a module's start, keeping modules whole."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if config.getoption("suite_in_order"):
            return
        unit = [item for item in items if item.path.parent.name == "unit"]
        rest = [item for item in items if item.path.parent.name != "unit"]
        cut = min(len(items) // 2, len(rest))
        while 0 < cut < len(rest) and rest[cut - 1].path == rest[cut].path:
            cut -= 1
        items[:] = rest[:cut] + unit + rest[cut:]


@pytest.fixture(scope="session")
def warm_cache() -> Path:
    """The default cache with the default image, the accelerator verdict and
    the default work seed in place.

    Tests with a time bound request it, so a build, a KVM probe or a seed boot
    (minutes on a fresh machine) never falls inside their timed window.
    Cheap when warm (one restore per worker); builds are locked across xdist workers.
    """
    cache = default_cache_dir()
    with pytest_bottle.launch() as b:
        b.check_output(["true"])
    return cache


@pytest.fixture(scope="session")
def warm_seed(warm_cache: Path) -> Callable[..., None]:
    """``warm_seed(**launch_kwargs)``: make sure the seed for that spec exists
    (e.g. ``lan=`` bottles need a seed with two NICs) before a timed window,
    such as a child run that must have its bottles up within a deadline."""
    done: set[str] = set()

    def warm(**kwargs: Any) -> None:
        key = repr(sorted(kwargs.items()))
        if key not in done:
            with pytest_bottle.launch(**kwargs) as b:
                b.check_output(["true"])
            done.add(key)

    return warm


@pytest.fixture(scope="session")
def default_image(warm_cache: Path) -> BuiltImage:
    return ensure_image("debian-bookworm", warm_cache)


@pytest.fixture
def no_spare_starting(request: pytest.FixtureRequest) -> None:
    """Waits until the spares this worker is pre-starting (a background thread
    after any ``bottle`` test) have started or failed.  For tests that change
    the whole process (``BOTTLE_STATE_DIR``, an rlimit, its open descriptors,
    module globals) and take no bottle that would start another spare (a
    ``lan=`` bottle does not): a spare starting meanwhile would write its run
    state into their directory, or inherit their limit."""
    from concurrent.futures import wait

    from pytest_bottle.plugin import STATE

    state = request.config.stash.get(STATE, None)
    if state is not None:
        wait([future for _, future in list(state.manager._spares)])


@pytest.fixture
def private_cache(tmp_path: Path, warm_cache: Path) -> Path:
    """A cache dir of its own (seeds, keys, run dirs) that shares the built images.

    Images are expensive (about 40 s) and read-only once built, so they are
    linked in; everything a test may corrupt or rebuild is private.
    """
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(warm_cache / "images", cache / "images")
    for name in ("accel.json",):
        if (warm_cache / name).exists():
            shutil.copy(warm_cache / name, cache / name)
    return cache


@pytest.fixture
def stop_kept() -> Iterator[list[str]]:
    """Names of bottles a test kept (``--bottle-keep``): stopped afterwards even
    if the test fails, since no sweep removes a kept VM by itself."""
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(
            [sys.executable, "-m", "pytest_bottle.cli", "stop", name], capture_output=True, text=True, timeout=120
        )


# Runtime tests that do not depend on the release: they run on both Debian
# releases (ids end in [debian-bookworm] / [debian-trixie]) unless the run
# names its own image or list (--bottle-image, ini bottle_image).
BOTH_RELEASES = ("debian-bookworm", "debian-trixie")
RELEASE_MODULES = {"test_runtime.py", "test_ssh.py", "test_net.py", "test_seeds.py", "test_agent_channel.py"}
# One representative test of modules that stay on one release (the whole
# module on both would cost minutes): each checks the release it ran on.
RELEASE_TESTS = {
    "test_processes.py::test_many_processes_kill_takes_the_group_and_input_arrives",
    "test_live_snapshots.py::test_forks_have_their_own_identity",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    name = metafunc.definition.path.name
    chosen = name in RELEASE_MODULES or f"{name}::{metafunc.function.__name__}" in RELEASE_TESTS
    if chosen and not (config.getoption("bottle_image") or config.getini("bottle_image")):
        matrix.parametrize(metafunc, BOTH_RELEASES)
