"""Cache entries and saved states on real files: publish whole or not at all,
crashed builders, concurrent committers, removal, locks (no VM)."""

from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from pytest_bottle.store import entries, saved
from pytest_bottle.store.saved import RestsOn, SavedState, StateCorrupt

FORK = multiprocessing.get_context("fork")
PAYLOAD = 64 * 1024


def _fill(d: Path, tag: str) -> None:
    """An entry's content, written slowly enough that a reader could catch it half done."""
    for i in range(4):
        (d / f"part{i}").write_bytes(tag.encode() * (PAYLOAD // len(tag)))
        time.sleep(0.001)
    (d / "manifest.json").write_text(json.dumps({"tag": tag}))


def _complete(d: Path) -> bool:
    """Whole and from one writer, or (gone meanwhile) nothing to judge.  The
    directory is opened once, as a reader holding an entry would."""
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True
    try:

        def read(name: str) -> bytes:
            with open(name, "rb", opener=lambda n, flags: os.open(n, flags, dir_fd=fd)) as f:
                return f.read()

        tag = json.loads(read("manifest.json"))["tag"]
        return all(read(f"part{i}") == tag.encode() * (PAYLOAD // len(tag)) for i in range(4))
    except FileNotFoundError:
        return True  # removed while we read (put aside, then deleted)
    finally:
        os.close(fd)


def test_an_entry_appears_only_when_committed(tmp_path: Path) -> None:
    final = tmp_path / "images" / "deb-abc"
    with entries.building(final) as tmp:
        assert tmp.parent == final.parent and tmp.name == f".tmp-deb-abc-{os.getpid()}"
        _fill(tmp, "one")
        assert entries.list_entries(final.parent) == [] and not final.exists()
        entries.commit(tmp, final)
    assert entries.list_entries(final.parent) == [final] and _complete(final)
    assert sorted(p.name for p in final.parent.iterdir()) == ["deb-abc"]


def _dirty_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache that are not on disk yet (the
    kernel's own flag, read through our mapping: /proc/self/pagemap gives
    each page's frame, /proc/kpageflags its flags)."""
    page = mmap.PAGESIZE
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        for at in range(0, size, page):
            m[at]  # mapped, so that pagemap knows its frame
        ino = os.stat(path).st_ino
        with open("/proc/self/maps") as maps:
            starts = [
                int(ln.split("-")[0], 16) for ln in maps if ln.split()[4] == str(ino) and ln.split()[3] != "00:00"
            ]
        assert len(starts) == 1, "our mapping of the file"
        n = (size + page - 1) // page
        with open("/proc/self/pagemap", "rb") as pm:
            pm.seek(starts[0] // page * 8)
            frames = [e & ((1 << 55) - 1) for e in struct.unpack(f"{n}Q", pm.read(n * 8)) if e >> 63]
        assert len(frames) == n, "every page of the file is in memory"
        dirty = 0
        with open("/proc/kpageflags", "rb") as kf:
            for pfn in frames:
                kf.seek(pfn * 8)
                dirty += struct.unpack("Q", kf.read(8))[0] >> 4 & 1  # KPF_DIRTY
        return dirty


def _page_flags_readable(where: Path) -> bool:
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(where)], capture_output=True, text=True).stdout.strip()
    return os.geteuid() == 0 and os.access("/proc/kpageflags", os.R_OK) and fs not in ("tmpfs", "ramfs")


def test_a_durable_commit_is_on_disk_before_it_is_published(tmp_path: Path) -> None:
    if not _page_flags_readable(tmp_path):
        pytest.skip("page flags need root and a disk-backed file system")
    final = tmp_path / "seeds" / "deb-abc"
    final.parent.mkdir()
    with entries.building(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "memory.ram").write_bytes(os.urandom(4 << 20))
        if _dirty_pages(tmp / "sub" / "memory.ram") == 0:  # the kernel wrote it back by itself already
            pytest.skip("nothing left to flush: the test would prove nothing")
        entries.commit(tmp, final)
    assert _dirty_pages(final / "sub" / "memory.ram") == 0


def test_a_failed_build_leaves_the_old_entry_and_no_tmp(tmp_path: Path) -> None:
    final = tmp_path / "deb-abc"
    with entries.building(final) as tmp:
        _fill(tmp, "old")
        entries.commit(tmp, final)
    with pytest.raises(RuntimeError), entries.building(final) as tmp:
        _fill(tmp, "new")
        raise RuntimeError("build failed")
    assert json.loads((final / "manifest.json").read_text()) == {"tag": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["deb-abc"]


def test_commit_replaces_and_leaves_nothing_aside(tmp_path: Path) -> None:
    final = tmp_path / "deb-abc"
    for tag in ("first", "second"):
        with entries.building(final) as tmp:
            _fill(tmp, tag)
            entries.commit(tmp, final)
    assert json.loads((final / "manifest.json").read_text()) == {"tag": "second"}
    assert [p.name for p in tmp_path.iterdir()] == ["deb-abc"]


def _crash_while_building(final: Path) -> None:
    tmp = entries.tmp_path(final)
    tmp.mkdir(parents=True)
    (tmp / "part0").write_bytes(b"half")
    os._exit(9)  # killed mid-build: no cleanup runs


def test_a_crashed_build_is_invisible_and_cleaned_by_the_next_builder(tmp_path: Path) -> None:
    final = tmp_path / "deb-abc"
    p = FORK.Process(target=_crash_while_building, args=(final,))
    p.start()
    p.join()
    assert p.exitcode == 9
    (left,) = tmp_path.iterdir()
    assert left.name == f".tmp-deb-abc-{p.pid}" and entries.is_tmp(left)
    assert entries.entry_of(left.name) == "deb-abc"
    assert entries.list_entries(tmp_path) == []
    with entries.flock(tmp_path / "deb-abc.lock") as held, entries.building(final) as tmp:
        assert held and not left.exists()  # the dead build's directory went first
        _fill(tmp, "fresh")
        entries.commit(tmp, final)
    assert _complete(final) and not left.exists()


@pytest.mark.parametrize(
    ("name", "entry"),
    [(".tmp-a-b-12", "a-b"), (".tmp-a-old-12", "a"), (".tmp-x-9f-discard-3", "x-9f"), (".tmp-s-prune-7", "s")],
)
def test_entry_of(name: str, entry: str) -> None:
    assert entries.entry_of(name) == entry


def _commit_many(final: Path, tag: str, rounds: int, locked: bool) -> None:
    for _ in range(rounds):
        if locked:
            with entries.flock(final.with_name(final.name + ".lock")), entries.building(final) as tmp:
                _fill(tmp, tag)
                entries.commit(tmp, final)
        else:  # each builder its own tmp name (another pid): only the commit is shared
            tmp = entries.tmp_path(final)
            tmp.mkdir()
            _fill(tmp, tag)
            entries.commit(tmp, final)


def _watch(final: Path, stop: float) -> None:
    while time.monotonic() < stop:
        if final.exists() and not _complete(final):
            os._exit(3)
    os._exit(0)


@pytest.mark.parametrize("locked", [True, False], ids=["under-lock", "lock-free"])
def test_two_processes_committing_one_entry(tmp_path: Path, locked: bool) -> None:
    """Whatever a reader sees under the entry's name is one writer's whole entry."""
    final = tmp_path / "seed-1"
    writers = [FORK.Process(target=_commit_many, args=(final, tag, 15, locked)) for tag in ("ab", "xyz")]
    watcher = FORK.Process(target=_watch, args=(final, time.monotonic() + 60))
    watcher.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    if watcher.is_alive():
        watcher.kill()
    watcher.join()
    assert watcher.exitcode in (0, -9), "a reader saw a half-written entry"
    assert _complete(final)
    assert {p.name for p in tmp_path.iterdir()} <= {"seed-1", "seed-1.lock"}


def test_remove_takes_it_away_once(tmp_path: Path) -> None:
    final = tmp_path / "deb-abc"
    with entries.building(final) as tmp:
        _fill(tmp, "x")
        entries.commit(tmp, final)
    assert entries.remove(final, "rm") is True
    assert entries.remove(final, "rm") is False
    assert list(tmp_path.iterdir()) == []


def _hold(
    lock: Path, shared: bool, ready: multiprocessing.synchronize.Event, done: multiprocessing.synchronize.Event
) -> None:
    with entries.flock(lock, shared=shared):
        ready.set()
        done.wait(60)


def test_flock_between_processes(tmp_path: Path) -> None:
    lock = tmp_path / "e.lock"
    ready, done = FORK.Event(), FORK.Event()
    p = FORK.Process(target=_hold, args=(lock, True, ready, done))
    p.start()
    assert ready.wait(10)
    with entries.flock(lock, shared=True, wait=False) as held:
        assert held  # shared locks coexist (clones starting from one seed)
    with entries.flock(lock, wait=False) as held:
        assert not held  # a pruner gives up at once
    done.set()
    p.join()
    with entries.flock(lock, wait=False) as held:
        assert held


# -- saved states, made without a VM -----------------------------------------------


def _capture(tmp: Path) -> dict[str, object]:
    (tmp / "disk.qcow2").write_bytes(b"disk" * 1000)
    (tmp / "memory.state").write_bytes(b"state")
    with open(tmp / "memory.ram", "wb") as f:  # sparse, like guest RAM after --dig-holes
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"ram")
    (tmp / "qemu.log").write_text("scratch")
    return {"kind": "seed", "nic_names": ["eth0"]}


def _make(root: Path, name: str = "deb-512m1c1n-0123") -> SavedState:
    final = root / name
    final.parent.mkdir(parents=True, exist_ok=True)
    rests_on = RestsOn.image_layer([root.parent / "images" / "deb" / "rootfs.ext4"], final)
    return saved.create(final, _capture, {"image": "deb", "nics": 1}, rests_on)


def test_create_publishes_a_verified_state(tmp_path: Path) -> None:
    state = _make(tmp_path / "seeds")
    assert saved.list_states(tmp_path / "seeds") == [state]
    assert (state.nic_count, state.nic_names, state.kind) == (1, ("eth0",), "seed")
    assert not (state.path / "qemu.log").exists()
    assert state.rests_on == RestsOn(("../../images/deb/rootfs.ext4",))
    assert set(state.manifest["files"]) == set(saved.STATE_FILES)
    saved.verify(state)
    with saved.in_use(state):
        pass


def test_a_changed_file_is_corrupt_and_discarded_with_a_warning(tmp_path: Path) -> None:
    state = _make(tmp_path / "seeds")
    with open(state.memory, "r+b") as f:
        f.write(b"STATE")  # same size, other bytes: only the checksum can tell
    with pytest.raises(StateCorrupt, match="memory.state does not match its checksum"):
        saved.verify(state)
    with pytest.warns(UserWarning, match="discarded seed"):
        saved.discard(state, "bad")
    assert saved.list_states(tmp_path / "seeds") == []


def test_discard_leaves_a_state_made_again_meanwhile(tmp_path: Path) -> None:
    old = _make(tmp_path / "seeds")
    new = _make(tmp_path / "seeds")
    assert new.created != old.created
    saved.discard(old, "found bad before it was made again")
    assert saved.list_states(tmp_path / "seeds") == [new]


def test_a_state_on_a_state_records_its_chain_relative(tmp_path: Path) -> None:
    seed = _make(tmp_path / "seeds")
    entry = tmp_path / "snapshots" / "s1"
    r = RestsOn.on_state(seed, entry)
    assert r.disk_chain == ("../../seeds/deb-512m1c1n-0123/disk.qcow2", "../../images/deb/rootfs.ext4")
    assert r.parent == "../../seeds/deb-512m1c1n-0123" and r.parent_created == seed.created
    assert [os.path.normpath(entry / p) for p in r.disk_chain] == [
        str(seed.disk),
        str(tmp_path / "images" / "deb" / "rootfs.ext4"),
    ]


def test_a_link_count_change_hashes_only_that_file_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _make(tmp_path / "seeds")
    os.link(state.disk, tmp_path / "source-layer")  # as a snapshot's disk is its source's frozen layer
    (tmp_path / "source-layer").unlink()  # the source closed: the disk's ctime changed
    hashed: list[str] = []
    real = saved.digest

    def digest(p: Path) -> str:
        hashed.append(p.name)
        return real(p)

    monkeypatch.setattr(saved, "digest", digest)
    saved.verify(state)
    assert hashed == ["disk.qcow2"]
    with open(state.disk, "r+b") as f:  # a real change is still found
        f.write(b"X")
    with pytest.raises(StateCorrupt, match="disk.qcow2 does not match"):
        saved.verify(state)
