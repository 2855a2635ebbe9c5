"""Derived images as values: a start image plus steps, keyed by what they put in.

``Image("debian-bookworm").install("nginx-light").run("systemctl enable nginx")``
is a frozen, hashable value; every step returns a new ``Image``.  Mistakes in
a step (a missing copy source, a bad mode, a relative guest path, a name that
is not a Debian package) raise ``SpecError`` when the step is made, and an
unknown start name raises ``ImageNotFound``: never at boot.

Decisions users see:

- A relative ``src`` of ``.copy`` is resolved against the directory of the
  Python file that called ``.copy()`` (a conftest.py can say
  ``.copy("site", "/srv/site")``); from an interactive session, against the
  current directory.
- A symlink given as ``src`` is followed; symlinks inside a copied directory
  are copied as symlinks, and their target text (not what they point at) is
  part of the key.
- The key hashes the parent's key, the steps and the bytes and modes of every
  copied file, not the host path they were read from: the same tree copied
  from another checkout is the same image.
- Layers: the steps chained on one image make one layer, built in one boot.
  ``Image(other)`` (or a step on a ``.named()`` image) starts a new layer on
  ``other``'s built disk, so ``other`` is built once and reused; plain
  ``other.run(...)`` instead makes one flat image with all the steps.
- An unnamed image shows as ``<parent>+<first 12 characters of its key>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Literal

from ..arguments import GuestPath, check_env, check_timeout, guest_path, names_a_dir, names_no_file, raw_path
from ..errors import ImageNotFound, SpecError
from ..results import shell_line, to_argv
from .copied import check_exclude, tree_digest
from .recipes import RECIPES

# Bump when the derived builder's output changes for the same steps.
# 2: .copy of a file to a dst ending in / puts it inside that directory, as Bottle.put does
# 3: what the steps leave in /var/tmp is kept
# 4: an sshd the steps installed is set up as the root images' (manifest "sshd")
DERIVED_VERSION = 4

# apt-get install's forms: name, name:arch, then =version or /release.
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+|/[A-Za-z0-9.+~_-]+)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")

# Images named by ``Image.named`` (recipes live in ``recipes.RECIPES``).
NAMED: dict[str, Image] = {}


@dataclass(frozen=True)
class Install:
    packages: tuple[str, ...]
    kind: Literal["install"] = "install"

    def describe(self) -> str:
        return "apt-get install " + " ".join(self.packages)

    def key_data(self) -> object:
        return {"install": list(self.packages)}


@dataclass(frozen=True)
class Copy:
    src: Path = field(compare=False)  # where it was read: not part of what the image is
    dst: str
    digest: str  # of the bytes, modes and link targets under src
    exclude: tuple[str, ...] = ()  # names or glob patterns of entries left out
    kind: Literal["copy"] = "copy"

    def describe(self) -> str:
        left_out = f" (excluding {', '.join(self.exclude)})" if self.exclude else ""
        return f"copy {self.src} -> {self.dst}{left_out}"

    def key_data(self) -> object:
        data: dict[str, object] = {"copy": self.dst, "digest": self.digest}
        if self.exclude:  # only then: the keys of copies without it stay what they were
            data["exclude"] = list(self.exclude)
        return data


@dataclass(frozen=True)
class Write:
    path: str
    data: bytes
    mode: int | None
    kind: Literal["write"] = "write"

    def describe(self) -> str:
        mode = f" (mode {self.mode:o})" if self.mode is not None else ""
        return f"write {self.path}{mode}"

    def key_data(self) -> object:
        return {"write": self.path, "sha256": hashlib.sha256(self.data).hexdigest(), "mode": self.mode}


@dataclass(frozen=True)
class Run:
    command: str
    env: tuple[tuple[str, str], ...] = ()
    timeout: float | None = None
    kind: Literal["run"] = "run"

    def describe(self) -> str:  # in progress lines and errors: a long script is cut
        shown = (
            self.command if len(self.command) <= 200 else f"{self.command[:200]}... ({len(self.command)} characters)"
        )
        return f"run {shown}"

    def key_data(self) -> object:
        # The timeout changes nothing in the result: not part of the key.
        return {"run": self.command, "env": [list(kv) for kv in self.env]}


Step = Install | Copy | Write | Run


@dataclass(frozen=True)
class Image:
    """A derived image: ``start`` (a registered image name or another
    ``Image``) with ``steps`` applied in order; ``name`` once ``.named()``."""

    start: str | Image
    steps: tuple[Step, ...] = ()
    name: str | None = None
    pull_url: str | None = field(default=None, compare=False)  # see pull_from(); not part of the key

    def __post_init__(self) -> None:
        if isinstance(self.start, str):
            if self.start not in RECIPES and self.start not in NAMED:
                raise ImageNotFound(self.start, known_names())
        elif not isinstance(self.start, Image):
            raise SpecError(f"an Image starts from an image name or another Image, not {self.start!r}")

    # -- steps --------------------------------------------------------------

    def install(self, *packages: str | Iterable[str]) -> Image:
        """Install Debian packages of the image's suite (apt-get, no recommends):
        names as arguments or in a list (``install("curl", "jq")``,
        ``install(["curl", "jq"])``), each as apt-get takes it (``pkg``,
        ``pkg:arch``, ``pkg=version``, ``pkg/release``)."""
        names: list[object] = []
        for p in packages:
            names.extend([p] if isinstance(p, str) else _names(p))
        if not names:
            raise SpecError("install() needs at least one package name")
        for name in names:
            if not isinstance(name, str) or not _PACKAGE_RE.fullmatch(name):
                raise SpecError(
                    f"install(): {name!r} is not a Debian package name (pkg, pkg:arch, pkg=version or pkg/release)"
                )
        return self._then(Install(tuple(str(n) for n in names)))

    def copy(self, src: str | os.PathLike[str], dst: GuestPath, *, exclude: Iterable[str] = ()) -> Image:
        """Copy a host file or directory (its contents) to guest ``dst``, modes
        kept.  A relative ``src`` is relative to the calling file's directory.
        ``exclude``: names or glob patterns (``".git"``, ``"*.log"``) of entries
        of the directory left out, at any depth, with their contents."""
        if not isinstance(src, (str, os.PathLike)):
            raise SpecError(f"copy(): the source must be a str or a path object, not {src!r}")
        if os.fspath(src) == "":  # Path("") is the current directory
            raise SpecError("copy(): the source is an empty path")
        patterns = check_exclude(exclude)
        path = Path(src)
        if not path.is_absolute():
            path = _caller_dir() / path
        if not path.exists():
            raise SpecError(f"copy(): the source {str(path)!r} does not exist")
        if names_a_dir(os.fspath(src)) and not path.is_dir():  # as put() and cp take "f/"
            raise SpecError(f"copy(): the source {os.fspath(src)!r} ends with '/' but is not a directory")
        return self._then(Copy(path, _guest_path(dst, "copy"), tree_digest(path, patterns), patterns))

    def write(self, path: GuestPath, content: str | bytes, mode: int | None = None) -> Image:
        """Write ``content`` (str as UTF-8, or bytes) to guest ``path``."""
        if isinstance(content, str):
            try:
                data = content.encode()
            except UnicodeEncodeError as e:  # a lone surrogate (os.fsdecode's of a byte): bytes say which
                raise SpecError(f"write(): content is not UTF-8 text ({e.reason} at {e.start}); pass bytes") from None
        elif isinstance(content, (bytes, bytearray, memoryview)):
            data = bytes(content)
        else:
            raise SpecError(f"write(): content must be str or bytes, not {type(content).__name__}")
        if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777):
            raise SpecError(f"write(): mode must be an int from 0 to 0o7777, not {mode!r}")
        where = _guest_path(path, "write")
        if names_no_file(where):  # as Bottle.write_bytes refuses it
            raise SpecError(f"write(): the guest path must name a file, not end with '/', '.' or '..': {path!r}")
        return self._then(Write(where, data, mode))

    def run(
        self, command: str | Iterable[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None
    ) -> Image:
        """Run ``command`` as root, a str with ``/bin/sh -c``, a list as that argv
        (as ``exec`` takes them); a non-zero exit fails the build."""
        if isinstance(command, Iterable) and not isinstance(command, (str, bytes, bytearray)):
            try:  # the same shell command line: the key of `run("a b")` and `run(["a", "b"])` is one
                command = shell_line(to_argv(list(command)))
            except (SpecError, TypeError) as e:
                raise SpecError(f"run(): {e.message if isinstance(e, SpecError) else e}") from None
        if not isinstance(command, str) or not command.strip() or "\0" in command:
            raise SpecError(f"run(): the command must be a non-empty str without NUL, not {command!r}")
        try:
            pairs = tuple(sorted(check_env(env).items()))  # exec's rules: no NUL, no '=' in a name
            check_timeout(timeout)  # nan or inf once passed, to fail the build with an agent error
        except SpecError as e:
            raise SpecError(f"run(): {e}") from None
        return self._then(Run(command, pairs, None if timeout is None else float(timeout)))

    def named(self, name: str) -> Image:
        """This image under ``name``, registered so ``--bottle-image name`` finds it."""
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise SpecError(
                f"named(): {name!r} is not a valid image name "
                "(1 to 64 letters, digits, '.', '_', '+', '-', starting with a letter or digit)"
            )
        if name in RECIPES:
            raise SpecError(f"named(): {name!r} is the name of a built-in image")
        image = replace(self, name=name)
        known = NAMED.get(name)
        if known is not None and known.key != image.key:
            raise SpecError(f"named(): another image is already named {name!r} (with other steps)")
        NAMED.setdefault(name, image)
        return NAMED[name]

    def pull_from(self, url: str) -> Image:
        """This image, pulled from ``url`` when it is not cached, before it is
        built: an ``http(s)://`` or ``file://`` URL or a path of a ``bottle
        image export`` file, ``{name}`` and ``{key}`` filled in.  A file that
        does not hold this image's key is not used (it is built instead)."""
        try:
            image = replace(self, pull_url=check_pull_template(url))
        except ValueError as e:
            raise SpecError(f"pull_from(): {e}") from None
        if self.name is not None and NAMED.get(self.name) is not None and NAMED[self.name].key == self.key:
            NAMED[self.name] = image
        return image

    def _then(self, step: Step) -> Image:
        # A step on a named image derives from it; the new one has no name yet.
        if self.name is not None:
            return Image(self, (step,))
        return Image(self.start, (*self.steps, step))

    # -- identity -----------------------------------------------------------

    @property
    def parent(self) -> str | Image:
        """What the steps run on: a recipe name, or an image (resolved from a name)."""
        if isinstance(self.start, str) and self.start in NAMED:
            return NAMED[self.start]
        return self.start

    @cached_property
    def key(self) -> str:
        parent = self.parent
        parent_key = RECIPES[parent].key() if isinstance(parent, str) else parent.key
        if not self.steps:
            return parent_key  # an alias: the same image
        h = hashlib.sha256(f"derived={DERIVED_VERSION}\0parent={parent_key}\0".encode())
        h.update(json.dumps([s.key_data() for s in self.steps], sort_keys=True).encode())
        return h.hexdigest()[:16]

    @property
    def display_name(self) -> str:
        """``name``, else ``<parent>+<key12>`` (an alias shows as its parent)."""
        if self.name is not None:
            return self.name
        parent = self.parent
        parent_name = parent if isinstance(parent, str) else parent.display_name
        return f"{parent_name}+{self.key[:12]}" if self.steps else parent_name

    def resolved(self) -> str | Image:
        """The recipe name or the image with steps this one is (aliases followed)."""
        image: str | Image = self
        while isinstance(image, Image) and not image.steps:
            image = image.parent
        return image

    def root(self) -> str:
        """The recipe at the bottom of the chain: its kernel boots this image."""
        parent = self.parent
        return parent if isinstance(parent, str) else parent.root()

    def __repr__(self) -> str:
        return f"Image({self.display_name!r}, steps={len(self.steps)})"


def check_pull_template(value: object) -> str:
    """A pull template: an http(s):// or file:// URL or a path, with only
    the placeholders ``{name}`` and ``{key}``."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"a pull URL must be a non-empty str, not {value!r}")
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in ("http", "https", "file", ""):
        raise ValueError(f"a pull URL must be http(s)://, file:// or a path, not {value!r}")
    unknown = sorted(set(re.findall(r"\{([^}]*)\}", value)) - {"name", "key"})
    if unknown:
        raise ValueError(f"a pull URL knows the placeholders {{name}} and {{key}}, not {unknown}")
    return value


def register_provided(provided: object, source: str = "") -> None:
    """Register what a ``pytest_bottle_images()`` hook returned: named Images
    (``SpecError`` from ``source`` for anything else)."""
    items = () if provided is None else provided
    if isinstance(items, (str, bytes, bytearray, Mapping, Image)) or not isinstance(items, Iterable):
        # not a character (or a key) at a time
        raise SpecError(f"must return a list of named Images (Image(...).named(NAME)), got {provided!r}", source)
    for image in items:
        if not isinstance(image, Image) or image.name is None:
            raise SpecError(f"must return named Images (Image(...).named(NAME)), got {image!r}", source)
        try:
            image.named(image.name)  # registers it (again: the same steps are fine)
        except SpecError as e:
            raise SpecError(e.message, source) from None


def known_names() -> list[str]:
    return sorted(set(RECIPES) | set(NAMED))


def _names(packages: object) -> list[object]:
    """A list (or other iterable) given to ``install()`` in place of names."""
    if isinstance(packages, (bytes, Mapping)) or not isinstance(packages, Iterable):
        return [packages]  # refused by name below
    return list(packages)


def lookup(name: str) -> str | Image:
    """A registered name: the recipe's name, or the named image."""
    if name in RECIPES:
        return name
    if name in NAMED:
        return NAMED[name]
    raise ImageNotFound(name, known_names())


def _guest_path(path: GuestPath, what: str) -> str:
    """``arguments.guest_path``'s check, but as given: ``.copy``'s trailing ``/`` means inside."""
    guest_path(path, f"{what}(): the guest path")
    return str(raw_path(path))


def _caller_dir() -> Path:
    """The directory of the file that called the public step method."""
    frame = sys._getframe(2)  # _caller_dir <- Image.copy <- the caller
    filename = frame.f_code.co_filename
    if filename.startswith("<") or not os.path.isfile(filename):
        return Path.cwd()
    return Path(filename).resolve().parent


def count_steps(image: Image) -> str:
    """``1 step``, ``3 steps``: how progress lines name a build's size."""
    return f"{len(image.steps)} step{'' if len(image.steps) == 1 else 's'}"
