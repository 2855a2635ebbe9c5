"""pytest glue: options, the ``bottle`` marker, fixtures, the startup sweep (usage errors and
reading the options: ``usage``; report sections: ``reports``;
the sweep per host and the hosts that ran bottles: ``workers``).

Everything else lives in the core (``manager``, ``launch``, ``spec``...),
which imports without pytest.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import matrix, workers
from .bottle import Bottle
from .errors import BottleError, LockTimeout, SpecError, UnsafeDirectory
from .host import signals
from .images import BuiltImage, ensure_image
from .images.image import register_provided
from .lifecycle.manager import BottleManager
from .live_progress import LiveProgress
from .reports import CLOSED, BottleReports, failed, keep_message
from .save_failed import SaveFailed
from .snapshot import FORK_KEYS, Snapshot, check_fork_args
from .spec import BOTTLE_KEYS, BottleSpec, Layer, check_host_memory
from .timeout_pause import TimeoutPause
from .usage import (
    AUTO_MARK,
    FLAGS,
    MARKER_DOC,
    OPTIONS,
    PRESTART_HELP,
    check_cache_dir,
    closest,
    getini,
    ini_layers,
    ini_source,
    ini_type,
    marker_layer,
    marker_layers,
    prestart,
    refuse_param,
    resolve_layers,
    set_value,
    source_of,
    value_of,
    warn_overridden,
)

# The usage errors are documented as pytest_bottle.plugin.<name>: re-exported.
from .usage import BottleLockTimeout as BottleLockTimeout
from .usage import InvalidBottleArgument as InvalidBottleArgument
from .usage import UnknownBottleImage as UnknownBottleImage
from .usage import UnsafeBottleDirectory as UnsafeBottleDirectory
from .vmm import accel as accel_mod

log = logging.getLogger(__name__)


@dataclass
class _State:
    config: pytest.Config
    cli: dict[str, Any]
    ini: list[Layer]  # the ini file, and -o on the command line (``ini_layers``)
    run_start: float
    rebuild: bool
    keep: bool
    manager: BottleManager
    reports: BottleReports

    def spec(self, *first: Layer, image: str | None = None, here: bool = True) -> BottleSpec:
        """Marker / factory layers (``first``, restricted to per-bottle keys), then CLI and ini;
        ``image``: the test's image in the matrix, in place of the command line's list.
        ``here``: its VMs run on this host (a worker's), which must have the memory."""
        cli = self.cli if image is None else {**self.cli, "image": image}
        layers = [*first, ("command line", cli), *self.ini]
        spec = resolve_layers(layers, restricted=len(first))
        if here:
            try:
                check_host_memory(spec.memory_mb, given=value_of(layers, "memory"))
            except SpecError as e:
                raise InvalidBottleArgument(e.message, source_of(layers, "memory") or "the default") from None
        return spec

    def marker(self, node: pytest.Item) -> list[Layer]:
        """The test's closest marker as a layer, after checking every marker on
        it: one a hook or fixture added after collection was not checked there."""
        layers = marker_layers(node)
        for layer in layers:  # the closest too: a fork reads only its forward= and timeout=
            self.spec(layer, here=False)
        return closest(layers)

    @property
    def rebuild_before(self) -> float | None:
        return self.run_start if self.rebuild else None


STATE = pytest.StashKey[_State]()
PROGRESS = pytest.StashKey[LiveProgress]()
BAD_MARKER = pytest.StashKey[pytest.UsageError]()
SIGNALS = pytest.StashKey[Callable[[], None]]()  # puts back the handlers of SIGTERM and SIGHUP


def _fixture_state(request: pytest.FixtureRequest) -> _State:
    refuse_param(request)
    return _state(request.config)


def _state(config: pytest.Config) -> _State:
    return config.stash[STATE]


# -- options and configuration ------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bottle", "pytest-bottle: real VMs as fixtures")
    for name, (metavar, text) in OPTIONS.items():
        dest = "bottle_" + name.replace("-", "_")
        group.addoption(f"--bottle-{name}", dest=dest, metavar=metavar, default=None, help=text)
        parser.addini(dest, text, type=ini_type(name), default=None)
    for name, text in FLAGS.items():
        dest = "bottle_" + name.replace("-", "_")
        group.addoption(f"--bottle-{name}", dest=dest, action="store_true", default=None, help=text)
        parser.addini(dest, text, type="bool", default=False)
    group.addoption("--bottle-prestart", dest="bottle_prestart", metavar="N", default=None, help=PRESTART_HELP)
    parser.addini("bottle_prestart", PRESTART_HELP, type=ini_type("prestart"), default=None)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def _register_images(config: pytest.Config) -> None:
    """Images plugins and conftests return from ``pytest_bottle_images``: named, so options find them."""
    try:
        provided_all = config.hook.pytest_bottle_images()  # its Image(...) steps are checked as they are made
    except BottleError as e:  # SpecError, ImageNotFound: a usage error, not an INTERNALERROR
        raise InvalidBottleArgument(str(e), "pytest_bottle_images()") from None
    for provided in provided_all:
        try:
            register_provided(provided)
        except SpecError as e:
            raise InvalidBottleArgument(e.message, "pytest_bottle_images()") from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_DOC)
    if config.option.help:  # the help must show, even with a bad bottle_* setting to mend; no sweep either
        return
    _register_images(config)
    config.stash[PROGRESS] = live = LiveProgress(config)
    config.pluginmanager.register(live, "bottle-progress")
    # pytest-timeout (loaded under any name, or not at all): first-use work is not a test's time
    config.pluginmanager.register(TimeoutPause(config, live.reporter), "bottle-timeout-pause")
    keys = {name.replace("-", "_"): "bottle_" + name.replace("-", "_") for name in OPTIONS}
    cli = {k: config.getoption(dest) for k, dest in keys.items()}
    ini = {k: set_value(getini(config, dest)) for k, dest in keys.items()}
    if ini["cache_dir"] and config.inipath and not Path(str(ini["cache_dir"])).expanduser().is_absolute():
        ini["cache_dir"] = str(config.inipath.parent / str(ini["cache_dir"]))  # relative to the ini file
    pull = ini["image_pull"]
    if pull and config.inipath and "://" not in str(pull) and not Path(str(pull)).expanduser().is_absolute():
        ini["image_pull"] = str(config.inipath.parent / str(pull))  # a path: relative to the ini file too
    try:  # an image list: kept for the matrix, its first image stays in cli/ini
        matrix.configure(config, cli, ini, ini_source(config, "bottle_image"))
    except SpecError as e:  # an unknown name is an UnknownBottleImage naming its layer
        raise InvalidBottleArgument(e.message, e.source) from None
    config.pluginmanager.register(matrix, "bottle-matrix")
    options = [("command line", cli), *ini_layers(config, ini)]
    first = resolve_layers(options)  # fail fast on a bad option
    check_cache_dir(options, first.cache_dir)

    def flag(name: str) -> bool:
        value = config.getoption(f"bottle_{name}")
        return bool(getini(config, f"bottle_{name}")) if value is None else bool(value)

    ahead = prestart(config)

    try:  # once per run and host, before the first bottle: sweep this host (see workers.py)
        run_start = workers.start(config, first.cache_dir, lambda: config.stash[STATE].manager.handed_out)
    except UnsafeDirectory as e:
        raise UnsafeBottleDirectory(**e._args()) from None
    except LockTimeout as e:
        raise BottleLockTimeout(**e._args()) from None
    manager = BottleManager(
        rebuild_before=run_start if flag("rebuild") else None, keep_failed=flag("keep"), prestart=ahead
    )
    reports = BottleReports(manager, flag("keep"))
    state = _State(config, cli, options[1:], run_start, flag("rebuild"), flag("keep"), manager, reports)
    config.stash[STATE] = state
    config.pluginmanager.register(reports, "bottle-reports")
    if flag("save_failed"):
        config.pluginmanager.register(SaveFailed(state.manager), "bottle-save-failed")
    # Like Ctrl-C, so fixture finalizers stop every VM (an xdist controller's workers' too);
    # SIGHUP: a closed terminal or ssh session. One ignored (nohup) stays ignored.
    controller = not hasattr(config, "workerinput")
    config.stash[SIGNALS] = signals.unwind_on(
        signal.SIGTERM, signal.SIGHUP, pass_on=workers.pass_on_to_workers if controller else None
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if STATE in config.stash:
        config.stash[STATE].manager.close_all()
    if PROGRESS in config.stash:
        config.stash[PROGRESS].close()
    if SIGNALS in config.stash:
        config.stash[SIGNALS]()


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = _state(config)
    spec = state.spec(here=False)  # the controller's: workers may run elsewhere
    verdict = accel_mod.cached_verdict(spec.cache_dir) if spec.accel != "tcg" else None
    # one line: a failed probe's reason may quote all of QEMU's assertion
    reason = "" if verdict is None else verdict.reason
    reason = reason if len(reason) <= 100 else f"{reason[:100]}…; bottle doctor says all"
    if spec.accel == "kvm":
        # as accel.decide judges it: the device first, then the stored probe
        why = accel_mod.kvm_usable() or (reason if verdict is not None and verdict.accel != "kvm" else None)
        accel = "kvm (requested)" if why is None else f"kvm (requested, but {why}: each bottle fails to start)"
    elif spec.accel == "tcg":
        accel = "tcg (requested)"
    elif verdict is not None:
        accel = f"{verdict.accel} ({reason})"
    elif (why := accel_mod.kvm_usable()) is not None:
        accel = f"tcg ({why})"
    else:
        accel = "auto (KVM is probed by a test boot at the first bottle)"
    images = matrix.images(config, str(spec.image))
    return [f"bottle: image{'s' * (len(images) > 1)} {', '.join(images)}, accel {accel}, cache {spec.cache_dir}"]


@pytest.hookimpl(tryfirst=True)  # before conftests' own: they may look for the bottle mark
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = _state(config)
    on_worker = hasattr(config, "workerinput")
    checked: set[tuple[str, int]] = set()  # a module's pytestmark: checked once, not per test
    for item in items:
        try:
            layers = marker_layers(item)
            for where, kwargs in layers:  # all of them: one stacked or inherited is not skipped unchecked
                if (where, id(kwargs)) not in checked:  # the marks outlive the loop: ids stay theirs
                    state.spec((where, kwargs), here=False)  # a bad marker stops the run before anything boots
                    # (memory the host lacks fails the test at setup: it may be skipped or deselected)
                    checked.add((where, id(kwargs)))
        except pytest.UsageError as e:
            if not on_worker:
                raise
            # xdist turns a worker's usage error at collection into an INTERNALERROR
            # that hides it: the test fails at setup with it instead.
            item.stash[BAD_MARKER] = e
            continue
        # Every bottle fixture of ours requests the matrix's: a "bottle" argument that
        # parametrize gives, or a user's own fixture of one of our names, does not.
        if not layers and matrix.FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker("bottle")
            item.stash[AUTO_MARK] = item.own_markers[-1]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if BAD_MARKER in item.stash:  # the message is all: a traceback would show this line of ours
        e = item.stash[BAD_MARKER]
        pytest.fail(f"{type(e).__name__}: {e}", pytrace=False)


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="session")
def _bottle_matrix_image(request: pytest.FixtureRequest) -> str | None:
    """This test's image in the matrix (``matrix`` parametrizes it); None outside one."""
    return getattr(request, "param", None)


@pytest.fixture
def _bottle_group(request: pytest.FixtureRequest, _bottle_matrix_image: str | None) -> Iterator[str]:
    """The test's bottles (fixture and factory) share a group: one teardown, one LAN scope."""
    state = _state(request.config)
    key = request.node.nodeid
    yield key
    request.node.stash[CLOSED] = state.manager.bottles(key)  # for a teardown failure's report
    for b in state.manager.close_group(key, keep=state.keep and failed(request.node)):
        request.node.user_properties.append(("bottle_kept" if b.kept else "bottle_not_kept", keep_message(b, key)))


@pytest.fixture
def bottle(request: pytest.FixtureRequest, _bottle_group: str, _bottle_matrix_image: str | None) -> Bottle:
    """A fresh VM configured by the test's ``bottle`` marker."""
    state = _fixture_state(request)
    spec = state.spec(*state.marker(request.node), image=_bottle_matrix_image)
    return state.manager.start(spec, _bottle_group)


@pytest.fixture
def bottle_factory(
    request: pytest.FixtureRequest, _bottle_group: str, _bottle_matrix_image: str | None
) -> Iterator[Callable[..., Bottle]]:
    """``bottle_factory(**kwargs) -> Bottle``; everything it made is torn down after the test."""
    state = _fixture_state(request)
    state.marker(request.node)  # checked now: a bad one is an error of the test's setup
    ended = False

    def factory(**kwargs: Any) -> Bottle:
        if ended:  # kept past its test: what it made would live on, in no test's teardown
            raise BottleError(
                f"bottle_factory of {_bottle_group} was called after that test ended "
                "(session_bottle_factory makes bottles that outlive a test)"
            )
        marker = state.marker(request.node)  # again: a later fixture or the test itself may add one
        fork = kwargs.get("snapshot") is not None  # a fork takes only forward= and timeout= from a marker
        warn_overridden(marker, {k: v for k, v in kwargs.items() if k in FORK_KEYS or not fork}, "bottle_factory()")
        if fork:
            return _fork(state, kwargs, "bottle_factory() arguments", _bottle_group, marker)
        kwargs.pop("snapshot", None)
        spec = state.spec(*marker, ("bottle_factory() arguments", kwargs), image=_bottle_matrix_image)
        return state.manager.start(spec, _bottle_group)

    yield factory
    ended = True


def _fork(state: _State, kwargs: dict[str, Any], source: str, group: str, marker: Sequence[Layer] = ()) -> Bottle:
    """A fork of ``kwargs["snapshot"]``: the other arguments may only be forward= and timeout=.
    The test's ``marker`` gives those two as well, first (its other keys come from the snapshot)."""
    rest = dict(kwargs)
    snap = rest.pop("snapshot")
    try:
        if not isinstance(snap, Snapshot):
            raise SpecError(f"snapshot must be a Snapshot (from bottle.snapshot()), not {snap!r}", source)
        overrides = check_fork_args(rest, source, snap, BOTTLE_KEYS)
        for where, values in marker:
            overrides |= check_fork_args({k: v for k, v in values.items() if k in FORK_KEYS}, where)
    except SpecError as e:
        raise InvalidBottleArgument(e.message, e.source) from None
    return state.manager.fork(snap, overrides, group)


@pytest.fixture(scope="module")
def module_bottle(request: pytest.FixtureRequest, _bottle_matrix_image: str | None) -> Iterator[Bottle]:
    """One VM shared by the tests of a module (configured by the module's ``pytestmark``); one per image."""
    state = _fixture_state(request)
    key = f"module:{request.node.nodeid}" + (f"[{_bottle_matrix_image}]" if _bottle_matrix_image else "")
    spec = state.spec(*marker_layer(request.node), image=_bottle_matrix_image)
    yield state.manager.start(spec, key, spare=False)
    state.manager.close_group(key)


@pytest.fixture(scope="session")
def session_bottle(request: pytest.FixtureRequest, _bottle_matrix_image: str | None) -> Iterator[Bottle]:
    """One VM shared by the whole session (configured by options and ini); one per image."""
    state = _fixture_state(request)
    key = "session:bottle" + (f"[{_bottle_matrix_image}]" if _bottle_matrix_image else "")
    yield state.manager.start(state.spec(image=_bottle_matrix_image), key, spare=False)
    state.manager.close_group(key)


@pytest.fixture(scope="session")
def session_bottle_factory(
    request: pytest.FixtureRequest, _bottle_matrix_image: str | None
) -> Iterator[Callable[..., Bottle]]:
    """A factory whose VMs (and LANs) live until the end of the session (one factory per image)."""
    state = _fixture_state(request)
    key = "session:factory" + (f"[{_bottle_matrix_image}]" if _bottle_matrix_image else "")

    def factory(**kwargs: Any) -> Bottle:
        if kwargs.get("snapshot") is not None:
            made = _fork(state, kwargs, "session_bottle_factory() arguments", key)
        else:
            kwargs.pop("snapshot", None)
            spec = state.spec(("session_bottle_factory() arguments", kwargs), image=_bottle_matrix_image)
            made = state.manager.start(spec, key, spare=False)
        state.reports.made_now(made)  # a failure of the test that made it shows its console
        return made

    yield factory
    state.manager.close_group(key)


@pytest.fixture(scope="session")
def bottle_image(request: pytest.FixtureRequest, _bottle_matrix_image: str | None) -> BuiltImage:
    """The built, cached image for ``--bottle-image`` (built once per run, even under xdist);
    in a matrix, the image of the test's parameter."""
    state = _fixture_state(request)
    spec = state.spec(image=_bottle_matrix_image)
    return ensure_image(
        spec.image, spec.cache_dir, rebuild_before=state.rebuild_before, pull=spec.image_pull, accel=spec.accel
    )
