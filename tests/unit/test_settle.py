"""The agent's settle call, served in this process with stand-ins for
systemctl and udevadm first on PATH: a boot still running when the time is
up must fail the settle, not pass for a settled machine (a seed saved then
gave every clone a half-booted guest without SSH)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import in_process_agent

from pytest_bottle.agent.client import NOT_SETTLED, AgentClient
from pytest_bottle.errors import BootTimeout
from pytest_bottle.images import failures
from pytest_bottle.images.cache import BuiltImage
from pytest_bottle.store import seeds, unsettled

IMAGE = BuiltImage("img", "key-1", Path("/nonexistent/images/img"), {"created": 1.0})


@pytest.fixture(autouse=True)
def no_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with this process remembering no unsettled seed."""
    monkeypatch.setattr(unsettled, "_mine", {})


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory first on PATH; only commands written into it change."""
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    yield tmp_path


def script(tools: Path, name: str, body: str) -> None:
    path = tools / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def test_a_boot_that_finishes_settles(tools: Path) -> None:
    script(tools, "systemctl", "sleep 0.3; echo degraded; exit 1")  # degraded: finished, with a failed unit
    script(tools, "udevadm", 'echo "$@" > "$(dirname "$0")/udev-args"')
    with in_process_agent() as chan:
        reply = AgentClient(chan).settle(timeout=8, quiet=0.25)  # the idle check runs (this host's CPU)
    assert (reply.state, reply.busy) == ("degraded", "") and reply.quiet in (0, 0.25)
    # udev is told how long it may take (its own default is 120 s, whatever we wait)
    assert (tools / "udev-args").read_text().split()[0] == "settle"
    assert 6 <= int((tools / "udev-args").read_text().split("--timeout=")[1]) <= 8


# is-system-running --wait never returns; list-jobs says what is still starting
SYSTEMD_BUSY = """\
if [ "$1" = list-jobs ]; then
    printf '7 hang.service start running\\n9 multi-user.target start waiting\\n12 other.service start running\\n'
    exit 0
fi
exec sleep 60"""


@pytest.mark.parametrize(
    ("systemctl", "udevadm", "what"),
    [
        (SYSTEMD_BUSY, "exit 0", "systemd was still starting units: hang.service, other.service"),
        ("echo running", "exec sleep 60", "udev was still handling devices"),
        ("echo running", "exit 1", "udev was still handling devices"),  # its own timeout ran out
    ],
)
def test_a_boot_still_running_at_the_timeout_is_a_boot_timeout(
    tools: Path, systemctl: str, udevadm: str, what: str, tmp_path: Path
) -> None:
    script(tools, "systemctl", systemctl)
    script(tools, "udevadm", udevadm)
    with in_process_agent() as chan:
        started = time.monotonic()
        with pytest.raises(BootTimeout, match=rf"boot did not settle within 3 s \({what}\)") as raised:
            AgentClient(chan).settle(timeout=3, quiet=0)
        took = time.monotonic() - started
        # the guest answered (no AgentTimeout), and no later than the time it was given
        assert took < 8, took  # at its 3 s, well before the grace the host adds (SETTLE_GRACE, 30 s) ran out
        assert AgentClient(chan).listening(timeout=5).ports is not None  # its channel still serves
    # the client's own words are what a seed remembers
    unsettled.record(tmp_path / "seed", raised.value, "seed of img", IMAGE)
    assert unsettled.marker(tmp_path / "seed").exists()


# -- a seed that did not settle is tried once (store/unsettled.py) ------------------


def unsettled_error() -> BootTimeout:
    return BootTimeout(f"{NOT_SETTLED} 300 s (systemd was still starting units: hang.service)", "console", "seed")


def test_a_seed_that_did_not_settle_is_not_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failures, "_run", "run-1")
    final = tmp_path / "seed-a"
    before = time.time_ns()
    named = unsettled.record(final, unsettled_error(), "seed of img", IMAGE)
    assert (named.name, named.console_tail) == ("seed of img", "console")
    assert unsettled.marker(final).stat().st_mode & 0o777 == 0o600
    again = unsettled.earlier(final, time.time_ns())
    assert again is not None and "earlier in this process: not tried again" in again.reason
    unsettled._mine.clear()  # as another process of the same run sees it
    other = unsettled.earlier(final, time.time_ns())
    assert other is not None and "in another process of this run" in other.reason and other.name == "seed of img"
    monkeypatch.setattr(failures, "_run", "run-2")  # a later run tries again...
    assert unsettled.earlier(final, time.time_ns()) is None
    # ...unless the failure came while it waited for the seed's lock
    waited = unsettled.earlier(final, before)
    assert waited is not None and "while this one waited" in waited.reason
    unsettled.forget(final)
    assert not unsettled.marker(final).exists() and unsettled.earlier(final, before) is None


def test_only_a_boot_that_did_not_settle_is_remembered(tmp_path: Path) -> None:
    final = tmp_path / "seed-b"
    slow_agent = BootTimeout("the agent did not answer within 300 s", "console", "seed")
    assert unsettled.record(final, slow_agent, "seed of img", IMAGE).name == "seed of img"
    assert unsettled.earlier(final, 0) is None and not unsettled.marker(final).exists()


@pytest.mark.parametrize(
    ("text", "reason"),
    [("not json", None), ("[1, 2]", None), ('{"reason": 3}', "3 (in another process of this run")],
)
def test_a_garbled_marker_is_ignored_or_read_as_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, reason: str | None
) -> None:
    final = tmp_path / "seed-c"
    unsettled.marker(final).write_text(text)
    found = unsettled.earlier(final, 0)
    assert found is None  # no time of its own: an older run's, this one tries again
    monkeypatch.setattr(failures, "_run", "run-1")
    unsettled.marker(final).write_text(text.replace("{", '{"run": "run-1", ', 1))
    found = unsettled.earlier(final, 0)
    assert (found.reason[: len(reason or "")] if found else None) == reason


def test_a_marker_of_an_image_built_again_is_pruned(tmp_path: Path) -> None:
    for name in ("seed-d", "seed-e"):
        unsettled.record(tmp_path / name, unsettled_error(), "seed of img", IMAGE)
    (tmp_path / "other.unsettled").write_text('{"image": "other", "image_key": "x"}')
    (tmp_path / "garbled.unsettled").write_text("not json")
    (tmp_path / "listed.unsettled").write_text('{"image_key": ["key-1"], "image_built": [1.0]}')
    current = {unsettled.build(IMAGE)}
    assert sorted(p.name for p in unsettled.prune(tmp_path, current)) == [
        "garbled.unsettled",
        "listed.unsettled",
        "other.unsettled",
    ]
    rebuilt = BuiltImage("img", "key-1", IMAGE.path, {"created": 2.0})
    assert unsettled.prune(tmp_path, {unsettled.build(rebuilt)}, key="key-2") == []  # another image's
    assert sorted(p.name for p in unsettled.prune(tmp_path, {unsettled.build(rebuilt)}, key="key-1")) == [
        "seed-d.unsettled",
        "seed-e.unsettled",
    ]


class Made(Exception):
    """Stands in for the seed's boot after the test has seen what it needs."""


def test_ensure_seed_tries_an_unsettled_seed_once_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The call site: checked under the seed's lock, recorded on failure, forgotten once made."""
    made: list[Path] = []

    def create(
        image: BuiltImage, accel: str, parts: dict[str, object], final: Path, baked: object, on_retry: object
    ) -> None:
        made.append(final)
        if len(made) == 1:
            raise unsettled_error()
        if len(made) == 3:  # the loop looks for the seed it "made" and makes it again: enough
            raise Made

    monkeypatch.setattr(seeds, "_create", create)
    monkeypatch.setattr(failures, "_run", "run-1")
    with pytest.raises(BootTimeout, match="did not settle") as first:
        seeds.ensure_seed(IMAGE, "tcg", 512, 1, 1, tmp_path)
    assert first.value.name == "seed of img" and unsettled.marker(made[0]).exists()
    unsettled._mine.clear()  # another worker of the same run
    with pytest.raises(BootTimeout, match="in another process of this run: not tried again"):
        seeds.ensure_seed(IMAGE, "tcg", 512, 1, 1, tmp_path)
    assert len(made) == 1
    older = BuiltImage("img", "key-1", IMAGE.path, {"created": 0.5})  # the same image, built before
    unsettled.record(made[0].parent / "of-older", unsettled_error(), "seed of img", older)
    monkeypatch.setattr(failures, "_run", "run-2")  # the next run tries again, and makes it
    with pytest.raises(Made):
        seeds.ensure_seed(IMAGE, "tcg", 512, 1, 1, tmp_path)
    assert made == [made[0]] * 3 and not unsettled.marker(made[0]).exists()
    assert not unsettled.marker(made[0].parent / "of-older").exists()  # its build is gone: litter
