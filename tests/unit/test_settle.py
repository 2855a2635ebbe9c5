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
    script(tools, "systemctl", "sleep 0.3; echo degraded")
    script(tools, "udevadm", "exit 0")
    with in_process_agent() as chan:
        reply = AgentClient(chan).settle(timeout=20, quiet=0)
    assert (reply.state, reply.booted) == ("degraded", True)


@pytest.mark.parametrize("slow", ["systemctl", "udevadm"])
def test_a_boot_still_running_at_the_timeout_is_a_boot_timeout(tools: Path, slow: str) -> None:
    script(tools, "systemctl", "echo running")
    script(tools, "udevadm", "exit 0")
    script(tools, slow, "exec sleep 60")
    with in_process_agent() as chan:
        started = time.monotonic()
        with pytest.raises(BootTimeout, match=r"boot did not settle within 4\.5 s \(systemd: (starting|running)\)"):
            AgentClient(chan).settle(timeout=5, quiet=0)
        # the guest answered before the host's own timeout, and its channel still serves
        assert 4.5 <= time.monotonic() - started < 5
        assert AgentClient(chan).listening(timeout=5).ports is not None
