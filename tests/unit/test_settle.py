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

from pytest_bottle.agent.client import AgentClient
from pytest_bottle.errors import BootTimeout


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
    tools: Path, systemctl: str, udevadm: str, what: str
) -> None:
    script(tools, "systemctl", systemctl)
    script(tools, "udevadm", udevadm)
    with in_process_agent() as chan:
        started = time.monotonic()
        with pytest.raises(BootTimeout, match=rf"boot did not settle within 3 s \({what}\)"):
            AgentClient(chan).settle(timeout=3, quiet=0)
        took = time.monotonic() - started
        # the guest answered (no AgentTimeout), and no later than the time it was given
        assert took < 3 + 1.0, took
        assert AgentClient(chan).listening(timeout=5).ports is not None  # its channel still serves
