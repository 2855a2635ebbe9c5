"""Where the ``bottle`` command finds the images a user's code names:
``--from FILE|MODULE``, or else the ``conftest.py`` files a ``pytest`` run
started in the current directory reads before it collects anything (so
``bottle image build web`` finds a ``.named("web")`` where pytest does)."""

from __future__ import annotations

import configparser
import contextlib
import functools
import importlib
import importlib.util
import os
import re
import runpy
import sys
import tomllib
import traceback
from collections.abc import Generator, Iterator
from pathlib import Path
from types import TracebackType

from .errors import BottleError, SpecError, error_line
from .images import RECIPES
from .images.image import NAMED, register_provided


def load_images(source: str, label: str = "", *, plugin: bool = False) -> None:
    """Run a Python file (``path.py``) or import a module (``pkg.images``)
    that defines images: what it names with ``.named()``, and what its
    ``pytest_bottle_images()`` returns, become buildable by name.  The
    modules its ``pytest_plugins`` names are imported too, as pytest does
    (those it can find: pytest's own plugins are names only pytest knows).
    ``label`` is how errors name it (``--from SOURCE`` by default); a
    ``plugin`` module is imported from ``sys.path`` as it is."""
    label = label or f"--from {source}"
    is_file = source.endswith(".py") or os.sep in source
    if is_file and not os.path.isfile(source):
        raise SpecError(f"{label}: no such file")
    if not plugin:
        _pythonpath()
    if not is_file and not plugin:
        sys.path.insert(0, os.getcwd())
    try:
        with stdout_to_stderr():
            namespace = _run_file(os.path.abspath(source)) if is_file else vars(importlib.import_module(source))
            hook = namespace.get("pytest_bottle_images")
            provided = hook() if callable(hook) else None
            if isinstance(provided, Iterator):  # a generator's body runs as it is read: here
                provided = list(provided)
        plugins = namespace.get("pytest_plugins", ())
    except BaseException as e:  # pytest.skip() at module level or sys.exit() too: its code stopped
        if isinstance(e, KeyboardInterrupt):
            raise
        no = e.name if isinstance(e, ModuleNotFoundError) and not is_file else None
        if no is not None and (source == no or source.startswith(no + ".")):  # not one it imports
            raise SpecError(f"{label}: no module named {no!r} (give a .py file or an importable module)") from None
        # The user's code failed (a BottleError of an Image step it makes too):
        # its own frames say where; ours would only bury them, and a bare
        # traceback would exit 1, like `bottle run`'s command.
        sys.stderr.write("".join(traceback.format_exception(type(e), e, _their_frames(e.__traceback__))))
        raise SpecError(f"{label}: loading it raised {type(e).__name__} (its traceback is above)") from None
    if callable(hook):  # what it returned is checked as under pytest
        register_provided(provided, f"pytest_bottle_images() in {source}")
    for module in [plugins] if isinstance(plugins, str) else plugins if isinstance(plugins, (list, tuple)) else ():
        if isinstance(module, str) and module not in sys.modules and _findable(module):
            load_images(module, f"{label}: pytest_plugins {module!r}", plugin=True)


@contextlib.contextmanager
def stdout_to_stderr() -> Generator[None, None, None]:
    """What the user's code prints, from Python or a child process, goes to
    stderr: the command's stdout is a key, a path or a guest command's output.
    (``cli.main`` has made sure fds 1 and 2 and ``sys.stdout``/``sys.stderr`` exist.)"""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _findable(module: str) -> bool:
    """Whether ``module`` can be imported as named: pytest's own plugins
    (``pytester``) are names only pytest resolves, and hold no images."""
    try:
        with stdout_to_stderr():  # a parent package's __init__ runs
            return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
    except Exception:  # its package's __init__ raised: importing it says so, with its traceback
        return True


def _pythonpath() -> None:
    """The ``pythonpath`` of the pytest config that a run here would use, on
    ``sys.path`` first, as pytest puts it before it imports a conftest."""
    try:
        here = Path.cwd()
    except OSError:  # the working directory was removed
        return
    _add_pythonpath(here)


@functools.cache  # once per directory, not once per file loaded
def _add_pythonpath(here: Path) -> None:
    for entry in reversed(find_setup(here)[1]):
        if str(entry) not in sys.path:
            sys.path.insert(0, str(entry))


# How commands also name a cached derived image: its entry, or a key prefix.
CACHE_REFERENCE = re.compile(r"derived-.*|[0-9a-f]{8,16}")


def find_images(name: str | None, source: str | None) -> list[Path]:
    """Load the images a command's ``name`` may be: the ``--from`` ``source``;
    without one, for a ``name`` not known yet, the ``conftest.py`` files a
    ``pytest`` started here would (``initial_conftests``; each as
    ``load_images`` loads a file), in pytest's order until one names it.
    Returns the conftest files that loaded.  One that fails is reported on
    stderr and skipped: a name only it held is then unknown, which the
    caller reports."""
    if source:
        load_images(source)
        return []
    if name is None or name in RECIPES or name in NAMED or CACHE_REFERENCE.fullmatch(name):
        return []
    try:
        here = Path.cwd()
    except OSError:  # the working directory was removed: nothing to read
        return []
    read = []
    for path in initial_conftests(here):
        try:
            load_images(str(path), os.path.relpath(path, here))
        except BottleError as e:
            print(f"{error_line(e)} (skipped it, looking for {name!r})", file=sys.stderr)
            continue
        read.append(path)
        if name in RECIPES or name in NAMED:  # a conftest may register() a Recipe too
            break
    return read


# A derived image's recipe is in the user's code; its cache entry keeps only the name it was first built under.
NEEDS_FROM = (
    "bottle: if {name!r} is an image your code names with .named(){where}, give that file or module with "
    "--from FILE|MODULE to {what} (a cached layer is listed under the name it was first built with)"
)


def needs_from(name: str, what: str, read: list[Path]) -> str:
    """The hint printed before an ``ImageNotFound`` of a name given without ``--from``."""
    if what == "build it" and re.fullmatch(r"derived-[0-9a-f]{8,}", name):  # never looked for in conftest.py
        return (
            f"bottle: {name!r} is a cached derived image's entry name; its steps are in your code, so it is "
            "built by the name your code gives it with .named(), with --from FILE|MODULE if needed"
        )
    where = f" outside {', '.join(os.path.relpath(p) for p in read)}" if read else ""
    return NEEDS_FROM.format(name=name, where=where, what=what)


def _their_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` from the first frame that is neither ours nor the import system's."""
    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not (name.startswith(ours) or name.startswith("<frozen ")):
            break
        tb = tb.tb_next
    return tb


def _run_file(path: str) -> dict[str, object]:
    """Run ``path`` as pytest imports a conftest (its default "prepend" mode):
    the first directory above it without an ``__init__.py`` goes first on
    ``sys.path``, and a file inside a package is imported by its dotted name,
    so its imports (``from images_def import X``, ``from tests.images_def
    import X``, ``from .images_def import X``) work as they do under pytest."""
    base, parts = os.path.dirname(path), [os.path.splitext(os.path.basename(path))[0]]
    while os.path.isfile(os.path.join(base, "__init__.py")):
        base, package = os.path.split(base)
        parts.insert(0, package)
    sys.path.insert(0, base)
    if len(parts) == 1:
        return runpy.run_path(path, run_name="__bottle_images__")
    return vars(importlib.import_module(".".join(parts)))


# pytest's config files, in the order it tries them in each directory (the
# .toml ones from pytest 9), and the table or section that makes one count
# (None: the file alone does, even empty).
CONFIG_FILES = (
    ("pytest.toml", None),
    (".pytest.toml", None),
    ("pytest.ini", None),
    (".pytest.ini", None),
    ("pyproject.toml", "tool.pytest"),
    ("tox.ini", "pytest"),
    ("setup.cfg", "tool:pytest"),
)


def _config(path: Path, section: str | None) -> dict[str, object] | None:
    """The pytest settings in ``path``, or None if it holds no pytest config."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(errors="replace")
        if path.suffix == ".toml":
            doc = tomllib.loads(text)
            tool = doc.get("tool", {})
            table = doc.get("pytest", {}) if section is None else tool.get("pytest") if isinstance(tool, dict) else None
            if not isinstance(table, dict) or (section is not None and not table):
                return {} if section is None else None
            ini = table.get("ini_options")
            return ini if isinstance(ini, dict) else table
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.read_string(text)
        name = section or "pytest"
        return dict(parser[name]) if parser.has_section(name) else {} if section is None else None
    except (OSError, ValueError, configparser.Error):  # pytest would stop on it; here it is only unread
        return {} if section is None else None


def find_setup(start: Path) -> tuple[Path, list[Path]]:
    """pytest's rootdir for a run with no arguments in ``start``, and the
    ``pythonpath`` entries of its config file: the first directory (``start``
    or above) with a pytest config file; else the first with a
    ``pyproject.toml``, then with a ``setup.py``; else ``start``."""
    ancestors = (start, *start.parents)
    pyproject = None
    for d in ancestors:
        for name, section in CONFIG_FILES:
            cfg = _config(d / name, section)
            if cfg is not None:
                value = cfg.get("pythonpath", [])
                entries = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
                return d, [d / e for e in entries if isinstance(e, str)]
        if pyproject is None and (d / "pyproject.toml").is_file():
            pyproject = d
    if pyproject is not None:
        return pyproject, []
    return next((d for d in ancestors if (d / "setup.py").is_file()), start), []


def initial_conftests(start: Path) -> list[Path]:
    """The ``conftest.py`` files pytest imports at its start in ``start``
    (without arguments or ``testpaths``): from the rootdir down to ``start``,
    then in ``start``'s ``test*`` subdirectories (in name order; pytest takes
    them in directory order); outermost first."""
    start = start.absolute()
    top = find_setup(start)[0]
    chain = [start, *start.parents]
    if top in chain:
        chain = chain[: chain.index(top) + 1]
    found = [d / "conftest.py" for d in reversed(chain)]
    found += [d / "conftest.py" for d in sorted(start.glob("test*")) if d.is_dir()]
    return [p for p in found if p.is_file()]
