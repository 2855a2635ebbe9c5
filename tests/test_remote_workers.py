"""xdist workers on another host (``--tx ssh=``), against a second host simulated
on this machine (tests/simhost.py: its own network, mount and UTS namespaces,
a private /run, its own cache, sshd).

One test in three phases, since they share the simulated host and its seed
(about 40 s to make) and must run in order:

1. a run with a worker on each host: both run bottles, and the summary names both;
2. ``kill -9`` of the remote worker while its bottle runs; the next run on that
   host sweeps it (QEMU gone, run record, run dir and leases removed);
3. nothing is left on either host, and the namespace, veth pair and sshd go.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import kill_group, processes_mentioning, wait_until
from simhost import HOSTNAME, SimHost, missing

from pytest_bottle.host.paths import state_dir
from pytest_bottle.images import BuiltImage

pytestmark = pytest.mark.slow

CHILD_TESTS = """
import json, os, socket, time
from pathlib import Path

import pytest

from pytest_bottle.host.hosts import host_identity

OUT = Path(__file__).resolve().parent.parent / "out"  # the filesystem is shared


def record(name, bottle, worker_id):
    rec = {"worker": worker_id, "host": socket.gethostname(), "host_id": host_identity().id,
           "bottle": bottle.name, "qemu": bottle.pid, "pid": os.getpid()}
    (OUT / (name + ".tmp")).write_text(json.dumps(rec))
    (OUT / (name + ".tmp")).replace(OUT / name)  # whole: the test reads it as soon as it exists


@pytest.mark.parametrize("i", range(4))
def test_where(bottle, i, worker_id):
    assert bottle.check_output(["cat", "/etc/hostname"]).strip() == bottle.name
    record(f"where-{i}.json", bottle, worker_id)


def test_hold(bottle, worker_id):
    record("hold.json", bottle, worker_id)
    time.sleep(600)  # killed before that
"""


@pytest.fixture
def second_host(tmp_path: Path, default_image: BuiltImage) -> Iterator[SimHost]:
    if why := missing():
        pytest.skip(why)
    # An empty cache would build the image (1-2 min) before the seed: it gets
    # this machine's built image (hard links: read-only once built) and the
    # accelerator verdict (the same machine), so only the seed is made there.
    cache_home = tmp_path / "sim-cache"
    images = cache_home / "pytest-bottle" / "images"
    images.mkdir(parents=True)
    shutil.copytree(default_image.path, images / default_image.path.name, copy_function=os.link)
    verdict = default_image.path.parent.parent / "accel.json"
    if verdict.exists():
        shutil.copy(verdict, cache_home / "pytest-bottle" / "accel.json")
    host = SimHost(tmp_path / "sim", cache_home)
    try:
        yield host.start()
    finally:
        host.close()


class Child:
    """pytest runs of the child suite (``suite/``), in their own process group."""

    def __init__(self, root: Path, host: SimHost, local_cache_home: Path) -> None:
        self.root = root
        self.host = host
        (root / "suite").mkdir(parents=True)
        (root / "suite" / "test_child.py").write_text(CHILD_TESTS)
        (root / "out").mkdir()
        # testpaths: both workers collect suite/ from the rootdir (the remote one's chdir).
        (root / "pytest.ini").write_text("[pytest]\ntestpaths = suite\n")
        self.env = {**os.environ, "XDG_CACHE_HOME": str(local_cache_home), "PYTHONDONTWRITEBYTECODE": "1"}
        self.procs: list[subprocess.Popen[str]] = []

    def argv(self, *args: str, local: bool = True) -> list[str]:
        tx = ["--tx", self.host.tx(sys.executable, self.root)] + (["--tx", "popen"] if local else [])
        tx += ["--dist", "load"]  # --tx alone does not distribute
        return [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", *tx, *args]

    def start(self, *args: str, local: bool = True) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            self.argv(*args, local=local),
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def run(self, *args: str, local: bool = True, timeout: float = 600) -> tuple[int, str]:
        p = self.start(*args, local=local)
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out

    def out(self, name: str) -> dict[str, object]:
        return json.loads((self.root / "out" / name).read_text())  # type: ignore[no-any-return]

    def close(self) -> None:
        for p in self.procs:  # our children's process groups, should a phase have failed
            kill_group(p)


@pytest.fixture
def child(tmp_path: Path, second_host: SimHost, warm_cache: Path) -> Iterator[Child]:
    c = Child(tmp_path / "child", second_host, warm_cache.parent)
    try:
        yield c
    finally:
        c.close()


def _alive(pid: int, name: str) -> bool:
    """Whether ``pid`` is still the QEMU of bottle ``name``."""
    try:
        return any(name in arg for arg in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def _leases(host: SimHost) -> str:
    path = host.path("/run/pytest-bottle/leases.json")
    return path.read_text() if path.exists() else ""


def test_a_second_host_runs_bottles_is_swept_after_kill_9_and_left_clean(
    child: Child, second_host: SimHost, tmp_path: Path
) -> None:
    sim = second_host
    here = os.uname().nodename

    # 1. One worker on each host (gw0 remote, gw1 local); each records where its bottles ran.
    began = time.monotonic()
    rc, out = child.run("-k", "where")
    first_run = time.monotonic() - began
    assert rc == 0, out
    runs = [child.out(f"where-{i}.json") for i in range(4)]
    hosts = {str(r["worker"]): str(r["host"]) for r in runs}
    assert hosts == {"gw0": HOSTNAME, "gw1": here}, (hosts, out)
    ids = {str(r["host"]): str(r["host_id"]) for r in runs}
    assert ids[HOSTNAME] != ids[here]
    line = next(x for x in out.splitlines() if x.startswith("bottles ran on: "))
    assert HOSTNAME in line and here in line and "gw0: " in line and "gw1: " in line, line
    assert f"{here} (gw1: " in line and "the controller's host" in line, line
    # The simulated host made its own seed in its own cache, and swept itself once (gw0).
    assert any((sim.cache_home / "pytest-bottle" / "seeds").iterdir())
    swept = json.loads(sim.path("/run/pytest-bottle/host-runs.json").read_text())
    assert [r["by"] for r in swept.values()] == ["gw0"], swept
    names = [str(r["bottle"]) for r in runs]

    # 2. kill -9 of the remote worker while its bottle runs.
    hold = child.start("-k", "hold", "--max-worker-restart=0", local=False)
    deadline = time.monotonic() + 300
    while not (child.root / "out" / "hold.json").exists():
        assert hold.poll() is None and time.monotonic() < deadline, hold.communicate()[0]
        time.sleep(0.2)
    held = child.out("hold.json")
    name, qemu, worker = str(held["bottle"]), int(str(held["qemu"])), int(str(held["pid"]))
    assert held["host"] == HOSTNAME
    record = sim.path(f"/run/pytest-bottle/vms/{name}.json")
    assert record.exists() and name in _leases(sim)
    run_dir = Path(json.loads(record.read_text())["run_dir"])
    assert run_dir.is_relative_to(sim.cache_home)  # the host's own cache, not the controller's
    os.kill(worker, signal.SIGKILL)  # the worker is a process of our child run
    hold_out, _ = hold.communicate(timeout=120)
    assert hold.returncode != 0, hold_out
    assert "bottles ran on: unknown (gw0: went down without a report)" in hold_out, hold_out
    assert record.exists(), "only a sweep may remove a killed worker's record"
    rc, out = child.run("-k", "where and 0", local=False)  # the next run on that host sweeps it
    assert rc == 0, out
    # ...and the controller's summary says so, for that host.
    said = re.search(rf"the startup sweep of {HOSTNAME} \(by gw0\) removed what dead runs left: swept (\d+) VM", out)
    assert said is not None and int(said[1]) >= 1, out
    assert not _alive(qemu, name)
    assert not record.exists() and not run_dir.exists() and name not in _leases(sim)
    swept = json.loads(sim.path("/run/pytest-bottle/host-runs.json").read_text())
    assert [r["by"] for r in swept.values()] == ["gw0"] * 3, swept  # the runs of phases 1 and 2, and this one
    names += [name, str(child.out("where-0.json")["bottle"])]

    # 3. Nothing left on either host, then nothing of the simulated host at all.
    assert not [p.name for p in sim.path("/run/pytest-bottle/vms").iterdir()]
    assert not [r for r in names if (state_dir() / "vms" / f"{r}.json").exists()]
    qemus = [p.pid for n in names for p in processes_mentioning(n)]
    assert not qemus, f"QEMU of our bottles still running: {qemus}"
    assert not processes_mentioning(str(sim.cache_home)), "a QEMU of the simulated host is left"
    wait_until(lambda: not sim.descendants(), 15, "the sessions below the simulated host's sshd to end")
    sshd = sim.sshd
    assert sshd is not None
    sim.close()
    assert sshd.poll() is not None and not sim.netns_exists() and not sim.link_exists()
    print(f"\n{line}\nfirst run (seed on the simulated host included): {first_run:.1f} s")
