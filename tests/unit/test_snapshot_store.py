"""Snapshots in the cache without a VM: fake seed and snapshot entries
(manifests only) for pruning, the sweep and ``bottle snapshot``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPError

from pytest_bottle import snapshot, snapshot_cli
from pytest_bottle.cli import main
from pytest_bottle.errors import BootError, SnapshotError, SnapshotGone
from pytest_bottle.host.runstate import MARKER, owner_identity, write_marker
from pytest_bottle.host.sweep import SweepReport, _sweep_snapshots
from pytest_bottle.images.cache import entry_dir as cache_entry_dir
from pytest_bottle.images.recipes import get_recipe
from pytest_bottle.lifecycle import launch
from pytest_bottle.snapshot import Snapshot, close_snapshot_scope, open_snapshot_scope, resolve_saved_snapshot
from pytest_bottle.store import snapshots
from pytest_bottle.store.gc import prune_seeds, seeds_under_snapshots
from pytest_bottle.store.saved import STATE_FILES, entry_lock, load, lock_path
from pytest_bottle.store.snapshots import seed_of
from pytest_bottle.vmm.accel import qemu_version
from pytest_bottle.vmm.machine import QemuMachine


def entry(path: Path, **manifest: Any) -> Path:
    path.mkdir(parents=True)
    base = {"files": {}, "key_parts": {"image": "img", "seed_version": 0}, "created": 1.0}
    (path / "manifest.json").write_text(json.dumps({**base, **manifest}))
    return path


def snapshot_on(cache: Path, name: str, seed: Path, created: float = 1.0, **extra: Any) -> Path:
    rests = {"parent": os.path.relpath(seed, cache / "snapshots" / name), "parent_created": created}
    return entry(cache / "snapshots" / name, kind="snapshot", rests_on=rests, **extra)


def test_a_seed_under_a_snapshot_is_not_pruned_until_the_snapshot_goes(tmp_path: Path) -> None:
    held, free = entry(tmp_path / "seeds" / "img-a"), entry(tmp_path / "seeds" / "img-b")
    snap = snapshot_on(tmp_path, "kept-one", held)
    assert seeds_under_snapshots(tmp_path) == {held: "kept-one"}
    removed = prune_seeds(tmp_path, {})  # both stale: their image is gone
    assert [r.path for r in removed] == [free]
    assert held.is_dir() and not free.exists()
    seed = load(snap)
    assert seed is not None
    (snap / "manifest.json").unlink()  # the snapshot removed: a later prune frees the seed
    os.rmdir(snap)
    assert [r.path for r in prune_seeds(tmp_path, {})] == [held]


def test_a_seed_made_again_or_an_image_rebuilt_under_it_is_named(tmp_path: Path) -> None:
    image = tmp_path / "images" / "img-key"
    image.mkdir(parents=True)
    (image / "manifest.json").write_text(json.dumps({"created": 5.0}))
    chain = {"disk_chain": [os.path.relpath(image / "rootfs.ext4", tmp_path / "seeds" / "s")]}
    seed = entry(tmp_path / "seeds" / "s", created=2.0, rests_on=chain, key_parts={"image_built": 5.0})
    ok, again = snapshot_on(tmp_path, "ok", seed, 2.0), snapshot_on(tmp_path, "again", seed, 1.0)
    state = load(ok)
    assert state is not None and seed_of(state).path == seed
    state = load(again)
    assert state is not None
    with pytest.raises(SnapshotError, match="again: the seed it was taken from was made again"):
        seed_of(state)
    (image / "manifest.json").write_text(json.dumps({"created": 6.0}))  # rebuilt
    state = load(ok)
    assert state is not None
    with pytest.raises(SnapshotError, match="ok: the seed it was taken from rests on an image that was rebuilt"):
        seed_of(state)


def with_files(path: Path) -> Path:
    for f in STATE_FILES:
        (path / f).write_bytes(b"x")
    return path


class Held(Exception):
    pass


def test_a_fork_holds_the_seed_and_the_snapshot_while_qemu_opens_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = with_files(entry(tmp_path / "seeds" / "s"))
    snap = with_files(snapshot_on(tmp_path, "snap", seed))
    state = load(snap)
    assert state is not None
    boot = launch._Boot.__new__(launch._Boot)
    monkeypatch.setattr(launch, "restore_from", lambda cfg, st: cfg)

    def run(cfg: object) -> None:
        for held in (seed, snap):  # a pruner's try: both are held shared
            with entry_lock(held, wait=False) as free:
                assert not free, f"{held.name} is not held while QEMU opens it"
        raise Held

    monkeypatch.setattr(boot, "_run", run)
    with pytest.raises(Held):
        boot._fork(object(), state)  # type: ignore[arg-type]


def test_a_snapshot_removed_while_a_fork_starts_is_gone(tmp_path: Path) -> None:
    seed = with_files(entry(tmp_path / "seeds" / "s"))
    snap = snapshot_on(tmp_path, "snap", seed)  # its files removed: what a fork that waited finds
    state = load(snap)
    assert state is not None
    boot = launch._Boot.__new__(launch._Boot)
    with pytest.raises(SnapshotGone, match="snap: it was removed while a fork started"):
        boot._fork(object(), state)  # type: ignore[arg-type]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_the_disk_is_linked_only_when_its_backing_name_finds_the_seed_from_the_entry(tmp_path: Path) -> None:
    seed = entry(tmp_path / "seeds" / "s")
    qemu_img("create", "-q", "-f", "qcow2", str(seed / "disk.qcow2"), "16M")
    state = load(seed)
    assert state is not None
    for depth, linked in ((("run", "b1"), True), (("run", "deeper", "b2"), False)):
        frozen = tmp_path.joinpath(*depth, "disk.qcow2")
        frozen.parent.mkdir(parents=True)
        rel = os.path.relpath(seed / "disk.qcow2", frozen.parent)
        qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", rel, str(frozen), "16M")
        out = tmp_path / "snapshots" / f".tmp-{depth[-1]}"
        out.mkdir(parents=True)
        snapshots._take_disk(None, frozen, state, state, out)  # type: ignore[arg-type]
        assert os.path.samefile(out / "disk.qcow2", frozen) == linked
        assert snapshots._same_file(snapshots._backing(out / "disk.qcow2"), seed / "disk.qcow2")


class FakeQMP:
    """Answers QMP commands from a script: a list of replies per command."""

    name = "btl-fake"

    def __init__(self, **replies: list[Any]) -> None:
        self.replies = replies
        self.sent: list[str] = []

    def cmd(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        self.sent.append(command)
        answers = self.replies.get(command.replace("-", "_"), [{}])
        reply = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(reply, Exception):
            raise reply
        return reply


def fake_machine(qmp: FakeQMP) -> QemuMachine:
    m = QemuMachine.__new__(QemuMachine)
    m.qmp = qmp  # type: ignore[assignment]
    m.stop = lambda grace=2.0: qmp.sent.append("stopped")  # type: ignore[method-assign]
    return m


def test_after_a_failed_pause_the_source_waits_for_the_state_cancels_it_and_runs_on() -> None:
    qmp = FakeQMP(
        query_migrate=[{"status": "active"}, {"status": "cancelling"}, {"status": "cancelled"}],
        query_status=[{"status": "running"}],
    )
    fake_machine(qmp).resume()
    assert qmp.sent == ["query-migrate", "migrate_cancel", "query-migrate", "query-migrate", "cont", "query-status"]


def test_a_source_that_does_not_run_on_is_stopped_and_named() -> None:
    qmp = FakeQMP(query_migrate=[{"status": "completed"}], query_status=[{"status": "paused"}])
    with pytest.raises(
        BootError, match=r"bottle b1 could not run on after the pause \(.*status paused\)\); it was stopped"
    ):
        snapshots._resume(fake_machine(qmp), "b1")
    assert qmp.sent[-1] == "stopped"


def test_a_qmp_error_during_a_snapshot_is_a_snapshot_error(tmp_path: Path) -> None:
    seed = with_files(entry(tmp_path / "seeds" / "s"))
    state = load(seed)
    assert state is not None
    qmp = FakeQMP(query_block=[QMPError("the device went away")])
    m = fake_machine(qmp)
    m.snapshot_lock = threading.Lock()
    m.top_disk = tmp_path / "run" / "b1" / "disk.qcow2"
    src = snapshots.Source("b1", m, tmp_path / "run" / "b1", state, (), {})
    final = tmp_path / "snapshots" / "snap1"
    with pytest.raises(SnapshotError, match="snap1: taking it from bottle b1 failed: QMPError: the device went away"):
        snapshots.take(src, final, kept=False)
    assert list((tmp_path / "snapshots").iterdir()) == []


def owned(path: Path, pid: int | None = None, text: str | None = None) -> Path:
    """An owner marker in ``path``: this process's, a dead one's (``pid``) or unreadable (``text``)."""
    write_marker(path, *owner_identity())
    if pid is not None:
        marker = json.loads((path / MARKER).read_text())
        (path / MARKER).write_text(json.dumps({**marker, "pid": pid}))
    if text is not None:
        (path / MARKER).write_text(text)
    return path


DEAD_PID = 4_000_000  # above pid_max: never alive


def cache_with_every_state(cache: Path) -> dict[str, Path]:
    seed = entry(cache / "seeds" / "s", key_parts={"qemu": qemu_version(), "image": "img"})
    gone = cache / "seeds" / "gone"
    snaps = {
        "kept": snapshot_on(cache, "kept", seed, kept=True),
        "session": owned(snapshot_on(cache, "session", seed)),
        "orphaned": owned(snapshot_on(cache, "orphaned", seed), pid=DEAD_PID),
        "unknown": owned(snapshot_on(cache, "unknown", seed), text="{not json"),
        "stale": snapshot_on(cache, "stale", gone, kept=True),
    }
    for p in snaps.values():
        lock_path(p).touch()
    return snaps


def test_snapshot_states_and_what_the_sweep_removes(tmp_path: Path) -> None:
    snaps = cache_with_every_state(tmp_path)
    for want, path in snaps.items():
        state = load(path)
        assert state is not None and snapshot_cli._state_of(state) == want
    report = SweepReport()
    _sweep_snapshots(tmp_path / "snapshots", report)
    assert report.paths == [str(snaps["orphaned"])]
    assert not snaps["orphaned"].exists() and not lock_path(snaps["orphaned"]).exists()
    assert not list((tmp_path / "snapshots").glob(".tmp-*")), "put aside and deleted"
    assert [s.split(":")[0] for s in report.skipped] == [str(snaps["unknown"])]
    assert all(snaps[k].is_dir() for k in ("kept", "session", "unknown", "stale"))


def test_the_sweep_leaves_an_orphaned_snapshot_a_fork_is_opening(tmp_path: Path) -> None:
    snaps = cache_with_every_state(tmp_path)
    with entry_lock(snaps["orphaned"], shared=True):
        report = SweepReport()
        _sweep_snapshots(tmp_path / "snapshots", report)
    assert report.paths == [] and snaps["orphaned"].is_dir()


def test_prune_removes_orphaned_stale_and_kept_but_not_a_live_sessions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snaps = cache_with_every_state(tmp_path)
    seed = tmp_path / "seeds" / "s"
    snaps["new-kept"] = snapshot_on(tmp_path, "new-kept", seed, kept=True)
    manifest = json.loads((snaps["new-kept"] / "manifest.json").read_text())
    (snaps["new-kept"] / "manifest.json").write_text(json.dumps({**manifest, "created": time.time()}))
    assert main(["--cache-dir", str(tmp_path), "snapshot", "prune", "--older-than", "1"]) == 0
    assert {k for k, p in snaps.items() if p.exists()} == {"new-kept", "session", "unknown"}
    out = capsys.readouterr().out
    assert "orphaned" in out and "stale" in out and "pruned 3 snapshot(s)" in out


def test_rm_reports_each_bad_name_and_removes_the_others(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snaps = cache_with_every_state(tmp_path)
    assert main(["--cache-dir", str(tmp_path), "snapshot", "rm", "../x", "kept", "nope", "stale"]) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0].startswith("bottle: SnapshotError: snapshot ../x: a snapshot name is"), err
    assert (
        lines[1] == "bottle: SnapshotGone: snapshot nope: there is no snapshot of that name (see bottle snapshot list)"
    )
    assert not snaps["kept"].exists() and not snaps["stale"].exists()


def fake_snapshot(cache: Path, name: str, owner_pid: int | None = None) -> Snapshot:
    snap = Snapshot.__new__(Snapshot)
    snap.name, snap.path, snap._removed = name, entry(cache / "snapshots" / name), False
    snap.owner_pid = os.getpid() if owner_pid is None else owner_pid
    return snap


def test_a_session_inside_a_session_removes_only_its_own_snapshots(tmp_path: Path) -> None:
    outer = open_snapshot_scope()
    try:
        mine = fake_snapshot(tmp_path, "outer")
        snapshot._scopes[-1][mine.name] = mine  # as take_snapshot registers it
        inner = open_snapshot_scope()  # a pytester session in a test of the outer one
        theirs = fake_snapshot(tmp_path, "inner")
        childs = fake_snapshot(tmp_path, "child", owner_pid=DEAD_PID)  # made by a forked child
        snapshot._scopes[-1].update({theirs.name: theirs, childs.name: childs})
        close_snapshot_scope(inner)
        assert not theirs.path.exists() and mine.path.is_dir() and childs.path.is_dir()
        assert snapshot._scopes[-1] is outer
    finally:
        close_snapshot_scope(outer)
    assert not mine.path.exists()


def test_a_saved_snapshot_of_a_derived_image_opens_by_its_key(tmp_path: Path) -> None:
    base = cache_entry_dir(tmp_path, get_recipe("debian-bookworm"))
    base.mkdir(parents=True)
    for f in ("rootfs.ext4", "vmlinuz", "initrd.img"):
        (base / f).touch()
    base_key = get_recipe("debian-bookworm").key()
    (base / "manifest.json").write_text(json.dumps({"name": "debian-bookworm", "key": base_key, "created": 3.0}))
    parent = ("debian-bookworm", base_key, 3.0)
    for key in ("k1", "k2"):
        d = tmp_path / "images" / f"derived-{key}"
        d.mkdir()
        (d / "disk.qcow2").touch()
        m = {"name": f"debian-bookworm+{key}", "key": key, "parent": parent[0], "parent_key": parent[1]}
        (d / "manifest.json").write_text(json.dumps({**m, "parent_created": parent[2], "created": 4.0}))
        parent = (m["name"], key, 4.0)
    spec: dict[str, object] = {
        "image": None,
        "memory_mb": 512,
        "cpus": 1,
        "network": "none",
        "forward": [],
        "timeout": 60,
    }
    seed = entry(tmp_path / "seeds" / "s")
    snapshot_on(tmp_path, "saved", seed, spec=spec, image_name="debian-bookworm+k2", image_key="k2")
    snap = resolve_saved_snapshot(tmp_path, "saved")
    assert snap.image.key == "k2" and snap.image.root is not None and snap.image.root.key == base_key
    assert resolve_saved_snapshot(str(tmp_path), "saved").image.key == "k2"  # a str: it was a TypeError
    assert snap.spec.image == "debian-bookworm+k2" and snap.image.kernel == base / "vmlinuz"
    m1 = json.loads((tmp_path / "images" / "derived-k1" / "manifest.json").read_text())
    (tmp_path / "images" / "derived-k1" / "manifest.json").write_text(json.dumps({**m1, "created": 5.0}))
    with pytest.raises(SnapshotError, match=r"saved: its image debian-bookworm\+k2 \(k2\) is no longer in the cache"):
        resolve_saved_snapshot(tmp_path, "saved")


def test_removing_a_gone_snapshot_leaves_no_lock_file(tmp_path: Path) -> None:
    from pytest_bottle.store import snapshots
    from pytest_bottle.store.saved import lock_path

    path = tmp_path / "snapshots" / "btl-1234-abcd"
    path.parent.mkdir()
    assert snapshots.remove(path) is False and not list(path.parent.iterdir())  # no lock made for nothing
    lock_path(path).touch()  # remade by a fork that lost the race with an earlier remove()
    assert snapshots.remove(path) is False and not list(path.parent.iterdir())


def test_a_seed_of_another_cpu_model_or_kernel_line_is_outdated(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pytest_bottle.store.gc import outdated
    from pytest_bottle.store.seeds import SEED_VERSION
    from pytest_bottle.vmm.qemu import cpu_model, kernel_args

    image = SimpleNamespace(key="k", manifest={"created": 5.0})
    current = {
        "seed_version": SEED_VERSION, "image": "img", "image_key": "k", "image_built": 5.0, "qemu": qemu_version(),
        "accel": "tcg", "cpu": cpu_model("tcg"), "kernel_args": " ".join(kernel_args("tcg")),
    }  # fmt: skip
    for name, parts, why in [
        ("now", current, None),
        ("cpu", {**current, "cpu": "max,la57=off,svm=off,vmx=off"}, "made for CPU model max,la57=off,svm=off,vmx=off"),
        ("args", {**current, "kernel_args": "console=ttyS0"}, "made with an older kernel command line"),
    ]:
        state = load(entry(tmp_path / "seeds" / name, key_parts=parts))
        assert state is not None
        assert outdated(state, image) == why, name  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "exited", "why"),
    [
        (TimeoutError("QEMU of btl-fake did not answer 'stop' within 60 s"), "", "QEMU of btl-fake did not answer"),
        (QMPError("Disconnected"), "QEMU exited with -9", "QEMU exited with -9"),  # gone mid-save: why it went
    ],
)
def test_a_save_qemu_fails_at_or_does_not_answer_is_a_boot_error(error: Exception, exited: str, why: str) -> None:
    """Not a bare TimeoutError or QMPError out of a seed's making (neither is a BottleError)."""
    m = fake_machine(FakeQMP(stop=[error]))
    m.exit_reason = lambda: exited  # type: ignore[method-assign]
    with pytest.raises(BootError, match=rf"^bottle btl-fake failed to boot: saving the VM state failed: {why}"):
        m.save_state(Path("/nonexistent/memory.state"))


def test_seeds_of_another_cached_key_of_the_same_name_are_not_pruned(tmp_path: Path) -> None:
    """Two checkouts (or plugin versions) share a cache, each with its own "web":
    making one's seed must not remove the other's while its image is cached."""
    from pytest_bottle.images.cache import BuiltImage
    from pytest_bottle.store.seeds import key_parts, seed_dir

    def layer(key: str, created: float) -> BuiltImage:
        path = tmp_path / "images" / f"derived-{key}"
        path.mkdir(parents=True)
        manifest = {"kind": "derived", "name": "web", "key": key, "created": created}
        (path / "manifest.json").write_text(json.dumps(manifest))
        (path / "last-used").touch()
        return BuiltImage("web", key, path, manifest)

    def seed(image: BuiltImage, created: float) -> Path:
        parts = key_parts(image, "tcg", 512, 1, 1, {})
        path = seed_dir(tmp_path, parts)
        path.mkdir(parents=True)
        (path / "manifest.json").write_text(json.dumps({"key_parts": parts, "created": created, "files": {}}))
        return path

    a, b = layer("a" * 16, 1.0), layer("b" * 16, 2.0)
    seed_a, seed_b = seed(a, 10.0), seed(b, 11.0)
    assert prune_seeds(tmp_path, {"web": b}, only="web") == []  # what making b's seed prunes
    assert prune_seeds(tmp_path, {"web": a}, only="web") == []  # ... and a's
    shutil.rmtree(a.path)  # a's image pruned: its seed goes with it
    assert [r.path for r in prune_seeds(tmp_path, {"web": b}, only="web")] == [seed_a]
    assert seed_b.is_dir()
    # An edited image: the old layer is cached still, but not used for a day. Its seed goes.
    c = layer("c" * 16, 3.0)
    seed_c = seed(c, 12.0)
    day_ago = time.time() - 86400 - 60
    os.utime(b.path / "last-used", (day_ago, day_ago))
    assert [r.path for r in prune_seeds(tmp_path, {"web": c}, only="web")] == [seed_b]
    assert seed_c.is_dir()
    # Two seeds of one key and shape: the older is superseded, as before.
    again = seed_dir(tmp_path, {**json.loads((seed_c / "manifest.json").read_text())["key_parts"], "baked": "other"})
    shutil.copytree(seed_c, again)
    manifest = json.loads((again / "manifest.json").read_text())
    (again / "manifest.json").write_text(json.dumps({**manifest, "created": 13.0}))
    assert [(r.path, r.why) for r in prune_seeds(tmp_path, {"web": c}, only="web")] == [
        (seed_c, f"superseded by {again.name}")
    ]


def test_seeds_of_another_recipe_key_in_use_stay_and_prune_keeps_the_seeds_of_what_it_keeps(tmp_path: Path) -> None:
    """Two plugin versions (two recipe keys of one name) share a cache; and
    `bottle image prune` keeps the seeds of every entry it keeps."""
    from pytest_bottle.images.cache import BuiltImage
    from pytest_bottle.store.seeds import key_parts, seed_dir

    def entry(key: str, created: float) -> BuiltImage:
        path = tmp_path / "images" / f"custom-{key}"
        path.mkdir(parents=True)
        manifest = {"name": "custom", "key": key, "created": created}
        (path / "manifest.json").write_text(json.dumps(manifest))
        (path / "last-used").touch()
        return BuiltImage("custom", key, path, manifest)

    def seed(image: BuiltImage) -> Path:
        parts = key_parts(image, "tcg", 512, 1, 1, {})
        path = seed_dir(tmp_path, parts)
        path.mkdir(parents=True)
        (path / "manifest.json").write_text(json.dumps({"key_parts": parts, "created": 5.0, "files": {}}))
        return path

    old, new = entry("1" * 16, 1.0), entry("2" * 16, 2.0)
    seed_old, seed_new = seed(old), seed(new)
    assert prune_seeds(tmp_path, {"custom": new}, only="custom") == []
    assert main(["--cache-dir", str(tmp_path), "image", "prune"]) == 0
    assert old.path.is_dir() and new.path.is_dir() and seed_old.is_dir() and seed_new.is_dir()
    day_ago = time.time() - 2 * 86400
    os.utime(old.path / "last-used", (day_ago, day_ago))
    assert [r.path for r in prune_seeds(tmp_path, {"custom": new}, only="custom")] == [seed_old]


def test_snapshot_list_columns_fit_long_names(tmp_path: Path) -> None:
    """Saved names run to ~80 characters and derived images past 24: both pushed the columns out of line."""
    seed = entry(tmp_path / "seeds" / "s")
    long = "test_a_rather_long_test_name_of_a_parametrized_case_x-0a1b2c-btl-0123abcd"
    snapshot_on(tmp_path, long, seed, image_name="debian-trixie-minimal+62a6a1b2c3d4", kept=True)
    snapshot_on(tmp_path, "short", seed, image_name="debian-bookworm", kept=True)
    argv = [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={tmp_path}", "snapshot", "list"]
    lines = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    header, *rows = lines
    assert len(rows) == 2, lines
    for i, column in ((1, "STATE"), (2, "IMAGE")):  # each cell starts under its header
        starts = {header.index(column), *(row.index(row.split()[i], len(row.split()[0])) for row in rows)}
        assert len(starts) == 1, (column, lines)
