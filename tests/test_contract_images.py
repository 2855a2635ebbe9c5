"""Image builds under xdist and by `bottle image build --rebuild`, `Recipe` fields,
and a seed whose save fails (issue 12).

The build here is real but small: a recipe of just a kernel and python3
(about 20 s), in a cache of the test's own.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import pytest_bottle
from pytest_bottle import BootError
from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.host.runstate import RunRecord
from pytest_bottle.images import ensure_image
from pytest_bottle.images.sources import host_sources

CACHE = default_cache_dir()


def _host_mirror() -> str | None:
    found = re.search(r"^URIs: (\S+)", host_sources("bookworm"), re.M)
    return found.group(1) if found else None


TINY = """\
from pytest_bottle.images import Recipe, register

register(Recipe(
    name="contract-tiny",
    packages=("linux-image-cloud-amd64", "python3"),
    disk_size="1G",
    mirror={mirror!r},
    masked_units=("getty@tty1.service", "contract-nothing.service"),
    extra_files=(("/etc/contract/extra.conf", "answer=42\\n"),),
))
"""

WHICH_BUILD = """
import json, os, time
from pathlib import Path

def test_image(bottle_image):
    line = {"worker": os.environ.get("PYTEST_XDIST_WORKER"), "created": bottle_image.created,
            "path": str(bottle_image.path)}
    with open(Path(__file__).with_name("builds.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\\n")
"""


def _debugfs(image: Path, cmd: str) -> str:
    r = subprocess.run(["debugfs", "-R", cmd, str(image)], capture_output=True, text=True, check=True)
    return r.stdout


@pytest.mark.slow
def test_one_image_build_per_run_under_xdist_recipe_fields_and_cli_rebuild(pytester: pytest.Pytester) -> None:
    mirror = _host_mirror()
    if mirror is None:
        pytest.skip("the host's apt sources name no bookworm mirror")
    cache = pytester.path / "a cache" / "with spaces"  # empty: the image must be built (its hooks run under it)
    pytester.makeconftest(TINY.format(mirror=mirror))
    pytester.makepyfile(test_build=WHICH_BUILD)
    started = time.time()
    result = pytester.runpytest_subprocess(
        f"--bottle-cache-dir={cache}",
        "--bottle-image=contract-tiny",
        "--bottle-rebuild",  # once per run, even so
        "-n",
        "2",
        "--dist",
        "each",
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=2)
    lines = [json.loads(line) for line in (pytester.path / "builds.jsonl").read_text().splitlines()]
    assert {line["worker"] for line in lines} == {"gw0", "gw1"}
    (created,) = {line["created"] for line in lines}  # both workers got the same build...
    (path,) = {line["path"] for line in lines}
    assert created > started  # ...made during this run
    assert [p.name for p in (cache / "images").iterdir()] == [Path(path).name]  # and no other

    rootfs = Path(path) / "rootfs.ext4"
    # Recipe.mirror: mmdebstrap was given that mirror, not the host's sources file.
    argv = (Path(path) / "build.log").read_text().splitlines()[0]
    assert argv.endswith(f" bookworm /dev/null {mirror}") and "host.sources" not in argv, argv
    # Recipe.extra_files
    assert _debugfs(rootfs, "cat /etc/contract/extra.conf") == "answer=42\n"
    # Recipe.masked_units: exactly these are masked (linked to /dev/null), not the default list.
    units = _debugfs(rootfs, "ls -l /etc/systemd/system")
    for unit in ("getty@tty1.service", "contract-nothing.service"):
        assert 'Fast link dest: "/dev/null"' in _debugfs(rootfs, f"stat /etc/systemd/system/{unit}"), unit
    assert "systemd-timesyncd.service" not in units and "ssh.service" not in units
    _cli_rebuild_builds_again_and_drops_its_seeds(cache, mirror, Path(path), created)


def _seed_entry(path: Path, image: str) -> None:
    """A seed of ``image`` as the cache lists it (manifest only: nothing boots from it here)."""
    path.mkdir(parents=True)
    parts = {"image": image, "image_key": "0" * 16, "accel": "tcg", "memory_mb": 512, "cpus": 1, "nics": 1}
    (path / "manifest.json").write_text(json.dumps({"key_parts": parts, "files": {}, "created": time.time()}))


def _cli_rebuild_builds_again_and_drops_its_seeds(cache: Path, mirror: str, path: Path, created: float) -> None:
    """``bottle image build NAME --rebuild`` on the entry the run built: a real second build."""
    _seed_entry(cache / "seeds" / "tiny-seed", "contract-tiny")
    _seed_entry(cache / "seeds" / "other-seed", "debian-bookworm")
    script = (
        TINY.format(mirror=mirror) + "import sys\nfrom pytest_bottle.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, "-c", script, f"--cache-dir={cache}", "image", "build", "contract-tiny", "--rebuild"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert all(re.match(r"\[ *\d+\.\ds\] \S", line) for line in lines[:-1]) and len(lines) > 5, lines
    assert re.fullmatch(
        rf"contract-tiny \w{{16}}: {re.escape(str(path))} \(built in [\d.]+s, log {re.escape(str(path))}/build\.log\)",
        lines[-1],
    )
    assert json.loads((path / "manifest.json").read_text())["created"] > created  # built again, in place
    assert not (cache / "seeds" / "tiny-seed").exists()  # its seeds are gone...
    assert (cache / "seeds" / "other-seed").is_dir()  # ...and only its own


@pytest.fixture
def own_cache(tmp_path: Path) -> Path:
    """An empty cache sharing only the built images (so that it has no seed)."""
    ensure_image("debian-bookworm", CACHE)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "images").symlink_to(CACHE / "images")
    if (CACHE / "accel.json").exists():
        shutil.copy(CACHE / "accel.json", cache / "accel.json")
    return cache


def _qemus_using(cache: Path) -> list[int]:
    """QEMU processes of this cache (not, say, a spare bottle pre-started for another test)."""
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "qemu-system-x86_64" and str(cache) in " ".join(p.info["cmdline"] or ()):
            found.append(p.pid)
    return found


@pytest.mark.slow
def test_a_seed_whose_state_cannot_be_saved_is_a_boot_error(own_cache: Path) -> None:
    seeds = own_cache / "seeds"
    stop = threading.Event()

    def block_the_state_file() -> None:
        # Once the seed's QEMU runs, put a directory where its memory state goes.
        while not stop.is_set():
            for argv in seeds.glob(".tmp-*/qemu.argv"):  # the seed's machine runs in its own dir
                (argv.parent / "memory.state").mkdir()
                return
            time.sleep(0.05)

    blocker = threading.Thread(target=block_the_state_file, daemon=True)
    blocker.start()
    try:
        with pytest.raises(BootError) as info:
            pytest_bottle.launch(cache_dir=own_cache)
    finally:
        stop.set()
        blocker.join()
    assert "saving the VM state failed" in info.value.reason, info.value
    # Nothing is left: no seed (whole or half), no QEMU, no run directory or record.
    assert list(seeds.iterdir()) == [p for p in seeds.iterdir() if p.suffix == ".lock"]
    assert not _qemus_using(own_cache)
    assert not list((own_cache / "run").iterdir())
    assert not [r for r in RunRecord.load_all() if r.run_dir.startswith(str(own_cache))]
