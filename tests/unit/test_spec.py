from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import pytest_bottle
from pytest_bottle.errors import SpecError
from pytest_bottle.images.cache import BuiltImage
from pytest_bottle.spec import MAX_FORWARDS, BottleSpec, check_host_memory, parse_memory, resolve
from pytest_bottle.usage import UnknownBottleImage, resolve_layers


def test_defaults() -> None:
    spec = resolve([])
    assert spec == BottleSpec()
    assert (spec.image, spec.memory_mb, spec.cpus, spec.network, spec.boot) == (
        "debian-bookworm",
        512,
        1,
        "none",
        "snapshot",
    )


@pytest.mark.parametrize(
    ("value", "mb"),
    [
        ("512M", 512),
        ("1G", 1024),
        ("1g", 1024),
        ("2GiB", 2048),
        (768, 768),
        ("1.5G", 1536),
        ("262144K", 256),
        ("512", 512),
        ("536870912B", 512),
        ("1GB", 1024),  # B alone is bytes (it was read as MiB: 512 TiB)
    ],
)
def test_memory_sizes(value: object, mb: int) -> None:
    assert parse_memory(value) == mb


@pytest.mark.parametrize(
    "value", ["lots", "-1G", "0", 64, True, None, "12X", "\u0661\u0662\u0668", "5_12", "134217727B", "512iB"]
)
def test_bad_memory(value: object) -> None:
    with pytest.raises(ValueError):
        parse_memory(value)


def test_a_size_in_bytes_too_small_says_b_alone_is_bytes() -> None:
    with pytest.raises(ValueError, match=r"'512B' is too little memory \(B alone is bytes\): at least 128M"):
        parse_memory("512B")
    for kilo in ("100MB", "100KB"):
        with pytest.raises(ValueError, match=rf"'{kilo}' is too little memory: at least"):
            parse_memory(kilo)


def test_more_memory_than_the_host_has_is_refused_where_the_vm_runs() -> None:
    host_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    assert parse_memory("4T") == 4 << 20  # a spec may be resolved on another host (an xdist controller)
    check_host_memory(host_mb)  # all of it is the user's call
    with pytest.raises(SpecError, match=rf"^bad memory: {4 << 20}M is more than this host has \({host_mb}M\)$"):
        check_host_memory(4 << 20)
    with pytest.raises(SpecError, match=r"^launch\(\): bad memory: "):
        check_host_memory(4 << 20, "launch()")
    as_given = rf"^bad memory: '4T' \({4 << 20}M\) is more than this host has \({host_mb}M\)$"
    with pytest.raises(SpecError, match=as_given):  # as the user wrote it, and in MiB
        check_host_memory(4 << 20, given="4T")
    with pytest.raises(SpecError, match=rf"^bad memory: {4 << 20}M is more"):  # an int is MiB already
        check_host_memory(4 << 20, given=4 << 20)


def test_precedence_first_layer_wins() -> None:
    spec = resolve(
        [
            ("marker", {"memory": "1G"}),
            ("factory", {"memory": "2G", "cpus": 2}),
            ("command line", {"cpus": "3", "image": None}),
            ("ini file", {"image": "debian-bookworm-minimal", "cpus": "4"}),
        ]
    )
    assert (spec.memory_mb, spec.cpus, spec.image) == (1024, 2, "debian-bookworm-minimal")


def test_error_names_its_source() -> None:
    with pytest.raises(SpecError) as info:
        resolve([("@pytest.mark.bottle on tests/test_x.py::test_y", {"memory": "lots"})])
    assert "tests/test_x.py::test_y" in str(info.value)
    assert "memory" in str(info.value)
    assert info.value.source == "@pytest.mark.bottle on tests/test_x.py::test_y"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cpus", 0),
        ("cpus", "two"),
        ("cpus", "1_0"),  # int() reads 10
        ("cpus", "+2"),
        ("cpus", "\u0662"),  # an Arabic-Indic 2: int() reads it
        ("forward", "\u0668\u0660"),
        ("network", "bridge"),
        ("boot", "warm"),
        ("timeout", -1),
        ("timeout", float("inf")),
        ("timeout", "nan"),
        ("forward", [0]),
        ("forward", "http"),
        ("forward", "80,,443"),
        ("forward", "80,"),
        ("forward", ", 80"),
        ("lan", "bad name!"),
        ("lan", "a\n"),  # `$` matched before a last newline: a segment of its own
        ("accel", "hvf"),
        ("image", ""),
        ("timeout", 10**400),  # past float's range: OverflowError, an INTERNALERROR at collection
        ("memory", "1" + "0" * 310 + "G"),
    ],
)
def test_bad_values(key: str, value: object) -> None:
    with pytest.raises(SpecError, match=key):
        resolve([("somewhere", {key: value})])


def test_a_built_image_is_its_name_and_a_long_bad_value_is_cut() -> None:
    built = BuiltImage("debian-trixie", "k", Path("/c/images/x"), {"packages": {f"p{i}": "1.0" for i in range(500)}})
    assert resolve([("factory", {"image": built})]).image == "debian-trixie"
    assert "packages" not in repr(built)  # a message that shows one stays readable
    gone = BuiltImage("no-such-image", "k", Path("/c/images/y"), {})
    with pytest.raises(UnknownBottleImage, match="^bottle_factory\\(\\) arguments: unknown image 'no-such-image'"):
        resolve_layers([("bottle_factory() arguments", {"image": gone})])
    with pytest.raises(SpecError) as e:
        resolve([("factory", {"image": [built.manifest]})])
    assert "(a list)" in str(e.value) and len(str(e.value)) < 400


def test_forward_forms() -> None:
    assert resolve([("x", {"forward": 8080})]).forward == (8080,)
    assert resolve([("x", {"forward": [8080, 22, 22]})]).forward == (22, 8080)
    assert resolve([("x", {"forward": "22, 80"})]).forward == (22, 80)
    assert resolve([("x", {"forward": " 443 80\t22 "})]).forward == (22, 80, 443)
    assert resolve([("x", {"forward": ""})]).forward == ()
    assert resolve([("x", {"forward": range(8000, 8003)})]).forward == (8000, 8001, 8002)


def test_too_many_forwards_is_a_spec_error_not_an_oserror_at_start() -> None:
    # 5,000 ports made QEMU's netdev argument too long for execve: a bare E2BIG OSError
    assert len(resolve([("x", {"forward": range(1, 1 + MAX_FORWARDS)})]).forward) == MAX_FORWARDS
    with pytest.raises(SpecError, match=f"forward names {MAX_FORWARDS + 1} ports; a bottle forwards at most"):
        resolve([("x", {"forward": list(range(1, 2 + MAX_FORWARDS))})])
    for huge in (range(1, 2 + MAX_FORWARDS), range(1, 10**12), range(10**30)):  # said at once, no list made
        with pytest.raises(SpecError, match=r"forward names range\(.*\): more than 1024 ports, which is the most"):
            resolve([("x", {"forward": huge})])


def test_restricted_layers_reject_run_wide_keys() -> None:
    with pytest.raises(SpecError, match="cache_dir"):
        resolve([("marker", {"cache_dir": "/tmp/x"})], restricted=1)
    with pytest.raises(SpecError, match="unknown argument 'colour'"):
        resolve([("factory", {"colour": "red"})], restricted=1)
    spec = resolve([("marker", {}), ("command line", {"cache_dir": "/tmp/x"})], restricted=1)
    assert spec.cache_dir == Path("/tmp/x")


def test_spec_is_frozen() -> None:
    spec = resolve([])
    with pytest.raises(AttributeError):
        spec.cpus = 2  # type: ignore[misc]


def test_image_pull_is_run_wide_and_checked() -> None:
    url = "https://images.example.org/{name}-{key}.tar.gz"
    assert resolve([("command line", {"image_pull": url})]).image_pull == url
    assert resolve([]).image_pull is None
    with pytest.raises(SpecError, match="ini file"):
        resolve([("ini file", {"image_pull": "ftp://h/{key}"})])
    with pytest.raises(SpecError, match="placeholders"):
        resolve([("ini file", {"image_pull": "https://h/{version}"})])
    with pytest.raises(SpecError, match="unknown argument"):
        resolve([("@pytest.mark.bottle", {"image_pull": url})], restricted=1)


def test_a_bad_value_under_a_higher_layer_is_still_an_error() -> None:
    """Every layer is parsed: the one that wins, and those it overrides."""
    layers: list[tuple[str, dict[str, object]]] = [("marker", {"cpus": 1}), ("factory", {"cpus": "lots"})]
    with pytest.raises(SpecError) as info:
        resolve(layers)
    assert (info.value.source, info.value.message) == (
        "factory",
        "bad cpus: cpus must be an integer (digits 0-9), not 'lots'",
    )
    assert resolve([("marker", {"cpus": 2}), ("factory", {"cpus": 3})]).cpus == 2


WITHOUT_PYTEST = """
import sys, pytest_bottle
try:
    pytest_bottle.launch(cpus=0)
except pytest_bottle.SpecError as e:
    print(type(e).__name__, "pytest" in sys.modules, e)
try:
    pytest_bottle.launch(image="no-such-image", cache_dir=sys.argv[1])
except pytest_bottle.ImageNotFound as e:
    print(type(e).__name__, "pytest" in sys.modules, e)
"""


def test_a_bad_launch_argument_is_a_usage_error_under_pytest_and_a_spec_error_without(tmp_path: Path) -> None:
    # As a marker's or factory's: nothing starts, and a test expects one error wherever it wrote the value.
    with pytest.raises(pytest.UsageError, match=r"^launch\(\): bad cpus: ") as refused:
        pytest_bottle.launch(cpus=0)
    assert isinstance(refused.value, SpecError)
    with pytest.raises(pytest.UsageError, match=r"^launch\(\): detached must be True or False"):
        pytest_bottle.launch(detached="yes")
    with pytest.raises(pytest.UsageError, match=r"^launch\(\): snapshot must be a Snapshot"):
        pytest_bottle.launch(snapshot="prepared")
    script = [sys.executable, "-c", WITHOUT_PYTEST, str(tmp_path)]
    out = subprocess.run(script, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("SpecError False launch(): bad cpus: "), out
    # An unknown image says where the name came from, as a bad value does.
    assert out[1].startswith("ImageNotFound False launch(): unknown image 'no-such-image'; known images: "), out


def test_an_unknown_argument_lists_all_its_entry_point_takes() -> None:
    """``launch()`` takes ``snapshot`` and ``detached`` too, and the factories
    ``snapshot``: the list left them out."""
    with pytest.raises(SpecError, match=r"'bogus'; valid arguments: image, .*, image_pull, snapshot, detached$"):
        pytest_bottle.launch(bogus=1)
    for factory in ("bottle_factory() arguments", "session_bottle_factory() arguments"):
        with pytest.raises(SpecError, match=r"'bogus'; valid arguments: image, .*, timeout, snapshot$"):
            resolve([(factory, {"bogus": 1})], restricted=1)
    with pytest.raises(SpecError, match=r"'bogus'; valid arguments: image, .*, timeout$"):
        resolve([("@pytest.mark.bottle", {"bogus": 1})], restricted=1)


MARKER = [("@pytest.mark.bottle on t.py::test_x", {"forward": [443, 80], "memory": "1G", "timeout": None, "lan": ""})]


@pytest.mark.parametrize(
    "given",
    [
        {"forward": [80, 443], "memory": 1024},  # the same meaning, another form
        {"forward": "80,443", "memory": "1024M"},
        {"timeout": 60},  # the marker's None sets nothing: 60 is used
        {"memory": None, "forward": None},  # None: not set here either
        {"lan": None, "cpus": 2},  # "" and None are both no LAN; cpus is the factory's alone
        {"memory": "lots"},  # a bad value: its spec error says so, not this warning
    ],
)
def test_a_factory_argument_the_marker_does_not_override_says_nothing(given: dict[str, object]) -> None:
    from pytest_bottle.usage import warn_overridden

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_overridden(MARKER, given, "bottle_factory()")


def test_a_factory_argument_the_marker_overrides_is_named() -> None:
    from pytest_bottle.usage import warn_overridden

    with pytest.warns(UserWarning) as got:
        warn_overridden(MARKER, {"forward": 80, "memory": "2G", "cpus": 2}, "bottle_factory()")
    assert [str(w.message) for w in got] == [
        f"bottle_factory(): forward=80 is not used: {MARKER[0][0]} sets forward=[443, 80], "
        "and a marker comes before factory arguments",
        f"bottle_factory(): memory='2G' is not used: {MARKER[0][0]} sets memory='1G', "
        "and a marker comes before factory arguments",
    ]
