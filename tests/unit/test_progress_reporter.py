"""The progress reporter's lines and heartbeats, on a fake clock (pure logic)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from pytest_bottle.host import progress
from pytest_bottle.host.progress import DEFAULT_INTERVAL, INTERVAL_ENV, Event, Reporter, default_interval, format_event
from pytest_bottle.host.progress_sinks import FileSink, Tail


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(stages: bool = True) -> tuple[Reporter, Clock, list[Event]]:
    clock, seen = Clock(), list[Event]()
    reporter = Reporter(seen.append, interval=10.0, stages=stages, clock=clock)
    reporter._ensure_thread = lambda: None  # type: ignore[method-assign]  # ticks are driven by hand
    return reporter, clock, seen


def test_a_task_reports_start_stages_heartbeats_and_end() -> None:
    reporter, clock, seen = make()
    with reporter.task("building image x (key k)", "not cached yet") as t:
        clock.now += 3
        t.stage("downloading")
        clock.now += 9
        reporter.tick()  # 9 s since the stage line: not yet
        clock.now += 1
        reporter.tick()  # 10 s of quiet: a heartbeat naming the stage
        clock.now += 5
        reporter.tick()
        clock.now += 20
    assert [(e.kind, e.elapsed, e.stage) for e in seen] == [
        ("start", 0.0, ""),
        ("stage", 3.0, "downloading"),
        ("heartbeat", 13.0, "downloading"),
        ("end", 38.0, "downloading"),
    ]
    assert [format_event(e) for e in seen] == [
        "pytest-bottle [   0s] building image x (key k): not cached yet",
        "pytest-bottle [   3s] building image x (key k): downloading",
        "pytest-bottle [  13s] building image x (key k): still running (downloading)",
        "pytest-bottle [  38s] building image x (key k): done in 38.0s",
    ]


def test_quiet_hides_stages_but_never_the_heartbeat() -> None:
    reporter, clock, seen = make(stages=False)
    with reporter.task("making the work seed of image x", "none yet") as t:
        for _ in range(6):  # a stage every 5 s: shown ones would keep the task "not quiet"
            clock.now += 5
            t.stage("step")
            reporter.tick()
    assert [e.kind for e in seen] == ["start", "heartbeat", "heartbeat", "heartbeat", "end"]


def test_a_failure_is_reported_and_raised() -> None:
    reporter, clock, seen = make()
    with pytest.raises(RuntimeError), reporter.task("building image x") as t:
        t.stage("E: broken")
        clock.now += 2
        raise RuntimeError("boom")
    assert format_event(seen[-1]) == "pytest-bottle [   2s] building image x: failed after 2.0s (E: broken)"


def test_ctrl_c_is_reported_as_interrupted_not_failed() -> None:
    reporter, clock, seen = make()
    with pytest.raises(KeyboardInterrupt), reporter.task("making the work seed of image x"):
        clock.now += 3
        raise KeyboardInterrupt
    assert format_event(seen[-1]) == "pytest-bottle [   3s] making the work seed of image x: interrupted after 3.0s"
    assert Event.from_dict(seen[-1].to_dict()) == seen[-1]  # as it crosses from an xdist worker


def test_relay_shows_stages_only_when_nobody_else_does() -> None:
    reporter, _, seen = make()
    got: list[tuple[str, float]] = []
    with reporter.task("a") as t:
        t.relay()("I: one", 1.0)
        t.relay(lambda s, e: got.append((s, e)))("I: two", 2.0)
        assert t.last_stage == "I: two"
    assert [e.stage for e in seen if e.kind == "stage"] == ["I: one"]
    assert got == [("I: two", 2.0)]


def test_a_stage_line_from_the_guest_is_shown_not_obeyed() -> None:
    """A derived build's step output reaches the terminal as stage lines."""
    reporter, _, seen = make()
    got: list[str] = []
    hostile = "\x1b]0;pwned\x07\x1b[2J\x1b[32mok\x1b[0m\r=== 9 passed ==="
    with reporter.task("a") as t:
        t.relay()(hostile, 1.0)
        t.relay(lambda s, e: got.append(s))(hostile, 2.0)
    shown = [format_event(e) for e in seen] + got + [e.stage for e in seen]
    assert not any(c in line for line in shown for c in "\x1b\x07\r"), shown
    assert got == ["\\x1b]0;pwned\\x07\\x1b[2Jok\\x0d=== 9 passed ==="]


def test_a_failing_sink_does_not_break_the_work() -> None:
    def sink(e: Event) -> None:
        raise OSError("terminal gone")

    with Reporter(sink, interval=10.0).task("a") as t:
        t.stage("b")


def test_the_heartbeat_thread_runs_while_a_task_does() -> None:
    seen: list[Event] = []
    reporter = Reporter(seen.append, interval=0.2)
    previous = progress.install(reporter)
    try:
        with progress.task("a", "b"):
            time.sleep(1.0)
    finally:
        progress.install(previous)
        reporter.close()
    assert sum(e.kind == "heartbeat" for e in seen) >= 2


def test_worker_events_cross_a_file_to_the_controller(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"")
    shown: list[Event] = []
    done = threading.Event()

    def show(e: Event) -> None:
        shown.append(e)
        if e.kind == "end":
            done.set()

    tail = Tail(path, show, poll=0.05)
    sink = FileSink(path, "gw1")
    with Reporter(sink, interval=10.0).task("making the work seed of image x", "none yet") as t:
        t.stage("booting")
    sink.close()
    assert done.wait(10)
    tail.stop()
    assert not path.exists()
    first = format_event(shown[0])
    assert first == "[gw1] pytest-bottle [   0s] making the work seed of image x: none yet"
    assert [e.kind for e in shown] == ["start", "stage", "end"]
    json.dumps(shown[0].to_dict())  # plain values


def test_a_lock_held_by_another_process_is_a_progress_task_while_waited_for(tmp_path: Path) -> None:
    """A `bottle image build` in another terminal holds the build lock: the waiting
    run says so on the terminal (progress), not only in a captured log record."""
    import subprocess

    from pytest_bottle.host.locks import reporting_lock

    lock = tmp_path / "image-x.lock"
    lock.touch()
    seen: list[Event] = []
    gate = tmp_path / "go"

    def show(e: Event) -> None:
        seen.append(e)
        if e.kind == "start":
            gate.touch()  # the holder lets go only once the wait was shown

    previous = progress.install(Reporter(show, interval=60.0))
    wait_for_gate = f"i=0; while [ ! -e {gate} ] && [ $i -lt 1500 ]; do sleep 0.02; i=$((i+1)); done"  # 30 s at most
    holder = subprocess.Popen(["flock", "-x", str(lock), "sh", "-c", wait_for_gate])
    try:
        deadline = time.monotonic() + 10
        while not (Path("/proc/locks").read_text().count("FLOCK") and _held(lock)):
            assert time.monotonic() < deadline, "flock never took the lock"
            time.sleep(0.02)
        with reporting_lock(lock, "the build of image x", show_after=0.2):
            assert holder.poll() is not None  # only once the holder let go
        assert [e.kind for e in seen] == ["start", "end"], seen
        assert seen[0].what == "waiting for the build of image x" and f"held by pid {holder.pid} (" in seen[0].why
        seen.clear()
        # Held by this process (another thread's task reports it): no second task.
        from filelock import FileLock

        taken = threading.Event()

        def hold() -> None:  # a FileLock's state is per thread: taken and let go in one
            with FileLock(str(lock)):
                taken.set()
                time.sleep(0.6)

        other = threading.Thread(target=hold)
        other.start()
        assert taken.wait(10)
        with reporting_lock(lock, "the build of image x", show_after=0.2):
            pass
        other.join()
        assert seen == []
    finally:
        gate.touch()
        holder.wait(10)
        progress.install(previous)


def _held(lock: Path) -> bool:
    from pytest_bottle.host.locks import lock_holder

    return bool(lock_holder(lock))


def _worker_progress(path: Path) -> FileSink | None:
    """The file sink an xdist worker handed ``path`` reports into (None: stderr)."""
    from types import SimpleNamespace

    from pytest_bottle.live_progress import WORKER_KEY, LiveProgress

    config = SimpleNamespace(workerinput={WORKER_KEY: str(path), "workerid": "gw9"}, get_verbosity=lambda: 0)
    live = LiveProgress(config)  # type: ignore[arg-type]
    live.close()
    return live.file


def test_a_worker_reports_only_into_a_file_of_its_own_hosts_progress_directory(tmp_path: Path) -> None:
    # On another host (an xdist --tx ssh= worker) the controller's path may be
    # a directory someone else prepared: nothing is created or followed there.
    from pytest_bottle.host.paths import state_dir

    elsewhere = tmp_path / "progress" / "1-cafe.jsonl"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"")
    assert _worker_progress(elsewhere) is None
    missing = state_dir() / "progress" / f"{os.getpid()}-test-missing.jsonl"
    assert _worker_progress(missing) is None and not missing.exists()
    link = state_dir() / "progress" / f"{os.getpid()}-test-link.jsonl"
    link.parent.mkdir(mode=0o700, exist_ok=True)
    link.symlink_to(elsewhere)
    try:
        assert _worker_progress(link) is None
    finally:
        link.unlink()
    ours = state_dir() / "progress" / f"{os.getpid()}-test-ours.jsonl"
    ours.write_bytes(b"")
    try:
        assert _worker_progress(ours) is not None  # the controller's file on this host: used
    finally:
        ours.unlink()
    assert elsewhere.read_bytes() == b""


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan"])
def test_a_progress_interval_that_is_no_number_of_seconds_is_named_and_not_used(
    value: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # "abc" was ignored without a word, and "inf" made every long build silent
    monkeypatch.setenv(INTERVAL_ENV, value)
    monkeypatch.setattr(progress, "_warned", set())
    assert default_interval() == default_interval() == DEFAULT_INTERVAL
    said = f"BOTTLE_PROGRESS_INTERVAL='{value}' is not a positive number of seconds: using 15"
    assert caplog.text.count(said) == 1  # once, however many reporters read it
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert default_interval() == 2.5
