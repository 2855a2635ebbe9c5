"""What a bottle should be, and the one function that decides it.

Values come in layers, first match wins: marker → factory kwargs → CLI → ini
→ default.  Every value is validated where it enters, and an error names the
layer it came from (``@pytest.mark.bottle on tests/x.py::test_y``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from .errors import SpecError
from .host.paths import default_cache_dir
from .images.image import Image, check_pull_template

Network = Literal["none", "nat"]
BootMode = Literal["snapshot", "cold"]
AccelRequest = Literal["auto", "kvm", "tcg"]
NETWORKS: tuple[Network, ...] = ("none", "nat")
BOOTS: tuple[BootMode, ...] = ("snapshot", "cold")
ACCELS: tuple[AccelRequest, ...] = ("auto", "kvm", "tcg")
MIN_MEMORY_MB = 128
MAX_CPUS = 64
_LAN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
# K, M, G, T (KB, KiB: all binary), B for bytes; a bare number is MiB (as QEMU's -m reads it).
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|(B))?\s*$", re.IGNORECASE | re.ASCII)
T = TypeVar("T")
_UNITS = {"": 1 << 20, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DEFAULT_IMAGE = "debian-bookworm"


@dataclass(frozen=True)
class BottleSpec:
    """A fully resolved, validated description of one bottle."""

    image: str | Image = DEFAULT_IMAGE  # a registered name, or a derived image
    memory_mb: int = 512
    cpus: int = 1
    network: Network = "none"
    lan: str | None = None
    forward: tuple[int, ...] = ()
    boot: BootMode = "snapshot"
    timeout: float = 300.0
    accel: AccelRequest = "auto"
    cache_dir: Path = field(default_factory=default_cache_dir)
    image_pull: str | None = None  # URL template of published images, tried before a build


def parse_memory(value: Any) -> int:
    """A size in MiB: an int is MiB; a string may say K, M, G or T (``"1G"``, ``"512MiB"``)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    in_bytes = False
    if isinstance(value, int):
        mb = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        in_bytes = m.group(3) is not None
        try:
            mb = int(float(m.group(1)) * _UNITS[(m.group(2) or m.group(3) or "").upper()]) // (1 << 20)
        except OverflowError:  # "1000...0G": infinite as a float
            raise ValueError(f"not a size: {value!r} is more than any host has") from None
    else:
        raise ValueError(f"not a size: {value!r} (use e.g. 512M or 1G)")
    if mb < MIN_MEMORY_MB:
        unit = " (B alone is bytes)" if in_bytes else ""
        raise ValueError(f"{value!r} is too little memory{unit}: at least {MIN_MEMORY_MB}M is needed to boot")
    return mb


def check_host_memory(memory_mb: int, source: str = "", given: object = None) -> None:
    """Refuse more memory than this host has, where the VM is to run (a spec
    may be resolved on another host: an xdist controller). The guest kernel
    alone would map it (its page structures for 4T are 64G): a boot that
    crawls until its timeout.  ``given``: the value as the user wrote it
    (``"100T"``), which the error shows beside its MiB."""
    host_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    if memory_mb > host_mb:
        asked = f"{given!r} ({memory_mb}M)" if isinstance(given, str) else f"{memory_mb}M"  # an int is MiB
        raise SpecError(f"bad memory: {asked} is more than this host has ({host_mb}M)", source)


def _int_in(lo: int, hi: int, what: str) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{what} must be an integer, not {value!r}")
        # int() also takes "1_0" (10), "+2" and other scripts' digits ("٢"): a typo booted 10 CPUs.
        if isinstance(value, str) and not re.fullmatch(r"\s*[0-9]+\s*", value):
            raise ValueError(f"{what} must be an integer (digits 0-9), not {value!r}")
        n = int(value)
        if not lo <= n <= hi:
            raise ValueError(f"{what} must be between {lo} and {hi}, not {n}")
        return n

    return parse


def _choice(options: tuple[T, ...], what: str) -> Callable[[Any], T]:
    def parse(value: Any) -> T:
        if value not in options:
            raise ValueError(f"{what} must be one of {', '.join(map(repr, options))}, not {value!r}")
        return options[options.index(value)]

    return parse


def _image(value: Any) -> str | Image:
    from .images.cache import BuiltImage  # the cache's modules are not needed to check a spec otherwise

    if isinstance(value, Image):
        return value
    if isinstance(value, BuiltImage):  # the ``bottle_image`` fixture's value: the image it was built for
        return value.name
    if not isinstance(value, str) or not value:
        raise ValueError(f"image must be a non-empty name or an Image, not {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... (a {type(value).__name__})"


def _lan(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _LAN_RE.fullmatch(value):
        raise ValueError(f"lan must be a name of letters, digits, '.', '_' or '-' (max 32), not {value!r}")
    return value


MAX_FORWARDS = 1024


def _forward(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        parts = value.split(",")
        if len(parts) > 1 and not all(p.strip() for p in parts):  # "80,,443": a port left out?
            raise ValueError(f"forward has an empty item between commas: {value!r}")
        items: list[Any] = value.replace(",", " ").split()
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, (list, tuple, set, frozenset, range)):
        if isinstance(value, range) and value[MAX_FORWARDS:]:  # before a list of 10**12 (its len may overflow)
            raise ValueError(
                f"forward names {value!r}: more than {MAX_FORWARDS} ports, which is the most a bottle forwards"
            )
        items = list(value)
    else:
        raise ValueError(f"forward must be a port or a list of ports, not {value!r}")
    port = _int_in(1, 65535, "a forwarded port")
    ports = sorted({port(v) for v in items})
    if len(ports) > MAX_FORWARDS:  # all go in one QEMU argument, which the kernel caps at 128 KiB
        raise ValueError(f"forward names {len(ports)} ports; a bottle forwards at most {MAX_FORWARDS}")
    return tuple(ports)


def _timeout(value: Any) -> float:
    try:
        t = float(value)
    except OverflowError:  # an int past float's range: not finite either
        t = float("inf")
    except (TypeError, ValueError):
        raise ValueError(f"timeout must be a number of seconds, not {value!r}") from None
    if isinstance(value, bool) or not 0 < t < 1e9:  # also rejects inf and nan
        raise ValueError(f"timeout must be a positive, finite number of seconds (below 1e9), not {value!r}")
    return t


def _path(value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"cache_dir must be a path, not {value!r}")
    return Path(os.path.abspath(os.path.expanduser(str(value))))  # "sub/../x" as x, like a shell


# key users write → (BottleSpec field, parser)
PARSERS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "image": ("image", _image),
    "memory": ("memory_mb", parse_memory),
    "cpus": ("cpus", _int_in(1, MAX_CPUS, "cpus")),
    "network": ("network", _choice(NETWORKS, "network")),
    "lan": ("lan", _lan),
    "forward": ("forward", _forward),
    "boot": ("boot", _choice(BOOTS, "boot")),
    "timeout": ("timeout", _timeout),
    "accel": ("accel", _choice(ACCELS, "accel")),
    "cache_dir": ("cache_dir", _path),
    "image_pull": ("image_pull", check_pull_template),
}
# Keys a marker or factory may set; accel, cache_dir and image_pull are run-wide (CLI/ini/launch).
BOTTLE_KEYS = ("image", "memory", "cpus", "network", "lan", "forward", "boot", "timeout")


Layer = tuple[str, Mapping[str, Any]]

# What an entry point takes besides a spec's keys (taken off before its layer
# is resolved), for the list an unknown argument's error gives.
TAKEN_BESIDES = {
    "launch()": ("snapshot", "detached"),
    "bottle_factory() arguments": ("snapshot",),
    "session_bottle_factory() arguments": ("snapshot",),
}


def resolve(layers: Sequence[Layer], restricted: int = 0) -> BottleSpec:
    """Merge ``layers`` (highest precedence first) into a validated spec; the
    values of every layer are checked, also those a higher layer overrides.

    Each layer is ``(where it came from, {key: value})``; a value of None in a
    layer means "not set here".  The first ``restricted`` layers (markers,
    factory arguments) may only set per-bottle keys: a marker does not choose
    the cache directory.
    """
    for i, (source, values) in enumerate(layers):
        keys = BOTTLE_KEYS if i < restricted else tuple(PARSERS)
        for key in values:
            if key not in keys:
                valid = ", ".join((*keys, *TAKEN_BESIDES.get(source, ())))
                raise SpecError(f"unknown argument {key!r}; valid arguments: {valid}", source)
    kwargs: dict[str, Any] = {}
    for key, (attr, parse) in PARSERS.items():
        for source, values in layers:  # every layer: a bad value a higher one hides is still an error
            if values.get(key) is not None:
                try:
                    parsed = parse(values[key])
                except ValueError as e:
                    raise SpecError(f"bad {key}: {e}", source) from None
                kwargs.setdefault(attr, parsed)
    return BottleSpec(**kwargs)
