"""host/hosts.py: the host id, one sweep per run and host, the "bottles ran on" line."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from pytest_bottle.host import hosts
from pytest_bottle.host.hosts import HostIdentity, WorkerHost, host_identity, start_run_on_host, summary_line
from pytest_bottle.host.sweep import SweepReport


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_spare_starting: None) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(d))
    return d


def test_host_id_is_made_once_and_kept(state: Path) -> None:
    first = host_identity()
    assert first.name == socket.gethostname() and len(first.id) == 32
    assert host_identity() == first
    assert (state / "host-id").stat().st_mode & 0o777 == 0o600


def test_a_host_is_swept_once_per_run(state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[Path]] = []

    def sweep(dirs: list[Path]) -> SweepReport:
        calls.append(dirs)
        return SweepReport()

    monkeypatch.setattr(hosts, "sweep", sweep)
    cache = tmp_path / "cache"
    by_controller = start_run_on_host("run1", cache, "controller", start=100.0)
    again = start_run_on_host("run1", cache, "gw3")  # a worker on the controller's host
    other = start_run_on_host("run2", cache, "gw0")  # another run: sweeps again, its own start
    assert calls == [[cache], [cache]]
    assert by_controller.start == again.start == 100.0 and again.swept_by == "controller" and again.report is None
    assert other.swept_by == "gw0" and other.start > 100.0
    runs = json.loads((state / "host-runs.json").read_text())
    assert {k: v["by"] for k, v in runs.items()} == {"run1": "controller", "run2": "gw0"}


def test_old_runs_are_forgotten(state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts, "sweep", lambda dirs: SweepReport())
    monkeypatch.setattr(hosts, "KEEP_RUNS", 3)
    for i in range(5):
        start_run_on_host(f"run{i}", tmp_path, "controller")
    assert sorted(json.loads((state / "host-runs.json").read_text())) == ["run2", "run3", "run4"]


def test_summary_names_the_hosts_that_ran_bottles() -> None:
    a, b = HostIdentity("alpha", "a" * 32), HostIdentity("beta", "b" * 32)
    line = summary_line(
        [WorkerHost("gw2", a, 3), WorkerHost("gw10", b, 1), WorkerHost("gw0", b, 2), WorkerHost("gw1", a, 0)], a
    )
    assert line == "bottles ran on: beta (gw0: 2, gw10: 1), alpha (gw2: 3; the controller's host)"
    twins = summary_line([WorkerHost("gw0", a, 1), WorkerHost("gw1", HostIdentity("alpha", "c" * 32), 1)], None)
    assert twins == "bottles ran on: alpha [aaaaaaaa] (gw0: 1), alpha [cccccccc] (gw1: 1)"
    lost = summary_line([WorkerHost("gw0", a, 1), WorkerHost("gw1", None)], None)
    assert lost == "bottles ran on: alpha (gw0: 1), unknown (gw1: went down without a report)"
    assert summary_line([WorkerHost("gw0", a, 0)], a) is None
    # xdist names a worker that replaces one that went down as it: one entry, both counts.
    replaced = summary_line([WorkerHost("gw0", a, 1), WorkerHost("gw1", a, 2), WorkerHost("gw0", a, 1)], a)
    assert replaced == "bottles ran on: alpha (gw0: 2, gw1: 2; the controller's host)"


def test_a_sweep_reports_counts_apart_from_what_it_left() -> None:
    report = SweepReport()
    report.vms.append("a")
    report.paths.extend(["p; with a semicolon", "q"])
    report.skip("/x; y", "owned by uid 5")
    assert report.counts() == "swept 1 VM record(s), 0 process(es), 0 lease(s), 2 path(s)"
    assert report.summary() == f"{report.counts()}; left 1 it may not touch: /x; y: owned by uid 5"
