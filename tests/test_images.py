"""The image pipeline with real mmdebstrap builds (issue: foundation)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import kill_group, processes_mentioning, run_isolated, wait_until

from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.images import ensure_image, find_image, get_recipe

BROKEN = 'Recipe(name="broken", packages=("linux-image-cloud-amd64", "no-such-package-bottle-test"))'
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from pytest_bottle.images import Recipe, ensure_image, register
    from pytest_bottle.errors import ImageBuildError
    register({recipe})
    stages = []
    try:
        img = ensure_image(sys.argv[1], Path(sys.argv[2]), progress=lambda s, t: stages.append(s))
        print(json.dumps({{"path": str(img.path), "stages": len(stages)}}))
    except ImageBuildError as e:
        print(json.dumps({{"error": str(e), "log_tail": e.log_tail, "log_path": e.log_path}}))
""")


def _script(recipe: str = BROKEN) -> str:
    return SCRIPT.format(recipe=recipe)


def _debugfs(image: Path, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, str(image)], capture_output=True, text=True, check=True).stdout


def test_built_image_has_agent_init_modules_kernel(bottle_image) -> None:  # type: ignore[no-untyped-def]
    m = bottle_image.manifest
    assert m["key"] == get_recipe("debian-bookworm").key() and m["name"] == "debian-bookworm"
    assert bottle_image.kernel.stat().st_size > 1_000_000 and bottle_image.initrd.stat().st_size > 100_000
    assert "linux-image-cloud-amd64" in m["packages"] and "openssh-server" in m["packages"]
    assert m["build_seconds"] > 0 and m["sizes"]["rootfs.ext4"] == bottle_image.rootfs.stat().st_size
    assert "agent.py" in _debugfs(bottle_image.rootfs, "ls /usr/lib/pytest-bottle")
    assert "bottle-agent.service" in _debugfs(bottle_image.rootfs, "ls /etc/systemd/system/sysinit.target.wants")
    kdir = f"/lib/modules/{m['kernel_version']}/kernel/drivers"
    assert "virtio_blk.ko" in _debugfs(bottle_image.rootfs, f"ls {kdir}/block")
    assert "virtio_console.ko" in _debugfs(bottle_image.rootfs, f"ls {kdir}/char")
    assert "policy-rc.d" not in _debugfs(bottle_image.rootfs, "ls /usr/sbin")


def _cpio_names(data: bytes) -> list[str]:
    """Member names of concatenated newc cpio archives (an initramfs)."""
    names, off = [], 0
    while off + 110 <= len(data):
        if data[off : off + 4] == b"\0\0\0\0":  # padding between archives
            off += 4
            continue
        if data[off : off + 6] not in (b"070701", b"070702"):
            break
        head = data[off : off + 110]
        size, name_size = int(head[54:62], 16), int(head[94:102], 16)
        name = data[off + 110 : off + 110 + name_size - 1].decode()
        off = (off + 110 + name_size + 3) & ~3
        off = (off + size + 3) & ~3
        if name != "TRAILER!!!":
            names.append(name)
    rest = data[off:]
    if rest[:2] == b"\x1f\x8b":
        names += _cpio_names(gzip.decompress(rest))
    elif rest[:4] == b"\x28\xb5\x2f\xfd":
        names += _cpio_names(subprocess.run(["zstd", "-dc"], input=rest, capture_output=True, check=True).stdout)
    return names


def test_initrd_carries_the_virtio_modules(bottle_image) -> None:  # type: ignore[no-untyped-def]
    # The initrd QEMU is given, read back: the root disk and the agent's port are
    # virtio, so these must be there before the root file system is.
    names = {Path(n).name for n in _cpio_names(bottle_image.initrd.read_bytes())}
    for mod in ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_console", "virtio_net"):
        assert f"{mod}.ko" in names or f"{mod}.ko.xz" in names or f"{mod}.ko.zst" in names, mod


def test_cached_lookup_is_fast(bottle_image) -> None:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    again = ensure_image("debian-bookworm", bottle_image.path.parent.parent)
    assert again.path == bottle_image.path and time.perf_counter() - started < 0.5


def test_missing_host_tool_names_its_package(tmp_path: Path) -> None:
    # Itself, not an ImageBuildError around it, and not taken for the image's failure: asked
    # again (the program installed meanwhile, say), the process looks again.
    code = (
        "from pathlib import Path; from pytest_bottle import HostDependencyError\n"
        "from pytest_bottle.images import ensure_image\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        ensure_image('debian-bookworm', Path(%r))\n"
        "    except HostDependencyError as e:\n"
        "        print(type(e).__name__, e)\n"
        "ensure_image('debian-bookworm', Path(%r))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code % (str(tmp_path), str(tmp_path))],
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH="/nonexistent"),
    )
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == ["HostDependencyError missing on this host"] * 2
    assert "mmdebstrap" in r.stdout and "ImageBuildError" not in r.stdout + r.stderr
    assert "HostDependencyError" in r.stderr and "mmdebstrap" in r.stderr and "apt-get install mmdebstrap" in r.stderr
    assert not (tmp_path / "images").exists() or not any(
        p.name.startswith("debian") for p in (tmp_path / "images").iterdir()
    )
    # PATH is process-wide: changed only in a process of its own (no pre-start thread there).
    code = (
        "import os; os.environ['PATH'] = '/nonexistent'\n"
        "from pytest_bottle.host.deps import require\n"
        "from pytest_bottle.errors import HostDependencyError\n"
        "try:\n    require('qemu-img')\nexcept HostDependencyError as e:\n    print(e)"
    )
    assert "qemu-utils" in run_isolated(code).stdout


def test_failing_build_raises_with_log_tail_and_leaves_nothing(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _script(), "broken", str(tmp_path)], capture_output=True, text=True)
    out = json.loads(r.stdout)
    assert "no-such-package-bottle-test" in out["log_tail"]
    assert "building image 'broken' failed" in out["error"]
    assert Path(out["log_path"]).is_file() and Path(out["log_path"]).parent == tmp_path / "logs"
    images = tmp_path / "images"
    assert [p.name for p in images.iterdir()] == [] if images.exists() else True
    assert not _mounts_under(tmp_path)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(path))]


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen[str]]]:
    """Children started in a session of their own; killed with all they started
    when the test ends, passed or not (a build left running holds mounts and CPU)."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        kill_group(proc)


def test_killed_build_counts_as_not_built_and_the_next_request_builds(
    tmp_path: Path, reap: list[subprocess.Popen[str]]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _script(), "broken", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    reap.append(proc)

    def building() -> bool:
        assert proc.poll() is None, proc.communicate()
        logs = list((tmp_path / "images").glob(".tmp-broken-*/build.log"))
        return bool(logs) and bool(processes_mentioning(str(tmp_path), "mmdebstrap"))

    wait_until(building, 120, "mmdebstrap running for the broken build")
    kill_group(proc)
    assert any((tmp_path / "images").glob(".tmp-broken-*"))  # a half-written build...
    code = "from pytest_bottle.images import Recipe, register, find_image; from pathlib import Path; "
    code += f"register({BROKEN}); print(find_image('broken', Path({str(tmp_path)!r})))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "None"  # ...is not an image
    r = subprocess.run([sys.executable, "-c", _script(), "broken", str(tmp_path)], capture_output=True, text=True)
    assert "no-such-package-bottle-test" in json.loads(r.stdout)["log_tail"]  # it really built again
    assert not any((tmp_path / "images").glob(".tmp-*")) and not _mounts_under(tmp_path)


@pytest.mark.slow
def test_two_processes_build_once_and_share(tmp_path: Path, reap: list[subprocess.Popen[str]]) -> None:
    minimal = "Recipe(name='debian-bookworm-minimal')"  # already registered; re-registering is harmless
    script = _script(minimal).replace("register(Recipe(name='debian-bookworm-minimal'))", "")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, "debian-bookworm-minimal", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    reap.extend(procs)
    outs = [json.loads(p.communicate(timeout=900)[0]) for p in procs]
    assert outs[0]["path"] == outs[1]["path"]
    assert sorted(o["stages"] > 0 for o in outs) == [False, True], outs  # exactly one of them built
    assert find_image("debian-bookworm-minimal", tmp_path) is not None
    assert ensure_image("debian-bookworm-minimal", tmp_path).path == Path(outs[0]["path"])
    assert str(default_cache_dir()) not in outs[0]["path"]
