"""Polling with backoff: the ``wait_*`` helpers of a ``Bottle``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from .agent.client import AgentClient
from .agent.streams import OnOutput
from .arguments import GuestPath, check_port, check_timeout
from .errors import AgentTimeout, ExecTimeout, WaitTimeout, shown_command
from .results import Command, ExecResult, as_command

FIRST_WAIT = 0.05
MAX_WAIT = 1.0
WAIT_GRACE = 1.0  # a try of wait_until_succeeds: the wait's deadline, not the agent, decides


def poll(attempt: Callable[[], bool], timeout: float) -> bool:
    """Call ``attempt`` until it returns True (backoff from 50 ms up to 1 s);
    False once ``timeout`` seconds have passed.  The last wait is cut short so
    that the last attempt starts at the deadline, not up to a backoff after
    it.  Its exceptions propagate."""
    deadline = time.monotonic() + timeout
    wait = FIRST_WAIT
    while not attempt():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(wait, left))
        wait = min(2 * wait, MAX_WAIT)
    return True


def until_succeeds(run: Callable[[float], ExecResult], timeout: float, what: str) -> ExecResult:
    """``run(limit)`` (a command given ``limit`` seconds) until it exits 0;
    ``WaitTimeout`` naming the last try after ``timeout`` s.  A hanging try must
    not outlive the wait itself: each gets what is left (0.5 s at least)."""
    last: list[ExecResult | ExecTimeout | AgentTimeout] = []
    deadline = time.monotonic() + timeout

    def attempt() -> bool:
        try:
            r = run(max(0.5, deadline - time.monotonic()))
        except (ExecTimeout, AgentTimeout) as e:  # the command, or the agent, took the time left
            last[:] = [e]
            return False
        last[:] = [r]
        return r.ok

    if poll(attempt, timeout):
        assert isinstance(last[0], ExecResult)
        return last[0]
    detail, tried = "", last[0] if last else None
    if isinstance(tried, ExecTimeout):
        detail = f"the last try was still running after {tried.timeout:.1f} s (killed)"
    elif isinstance(tried, AgentTimeout):
        detail = f"the agent did not answer the last try within the wait ({tried})"
    elif tried is not None:
        said = (tried.stderr.strip() or tried.stdout.strip())[-300:]
        detail = f"exit {tried.returncode}: {said}" if said else f"exit {tried.returncode}, no output"
    raise WaitTimeout(what, timeout, detail)


class Waits:
    """The ``wait_*`` methods of ``Bottle`` (a mixin): its agent, its name and its ``_exec``."""

    _agent: AgentClient
    name: str

    def _exec(
        self, cmd: Command, check: bool, input: str | bytes | None, timeout: float | None,
        env: Mapping[str, str] | None, cwd: GuestPath | None, user: str | int | None, on_output: OnOutput | None,
        grace: float,
    ) -> ExecResult:  # fmt: skip
        raise NotImplementedError

    def wait_until_succeeds(self, cmd: Command, timeout: float = 60.0, **kw: Any) -> ExecResult:
        """Run ``cmd`` until it exits 0 (with backoff); raise ``WaitTimeout`` after ``timeout`` s,
        naming the last try.  A failing try never raises (``check=`` is ignored)."""
        check_timeout(timeout, optional=False)  # the total wait: a number, not None
        kw.pop("check", None)
        cmd = as_command(cmd)
        if unknown := sorted(set(kw) - {"input", "env", "cwd", "user", "on_output"}):
            raise TypeError(f"wait_until_succeeds() got an unexpected keyword argument {unknown[0]!r}")

        def attempt(left: float) -> ExecResult:  # a hung agent too gets what is left of the wait, a second more
            opts = (kw.get("input"), left, kw.get("env"), kw.get("cwd"), kw.get("user"), kw.get("on_output"))
            return self._exec(cmd, False, *opts, WAIT_GRACE)

        return until_succeeds(attempt, timeout, f"{shown_command(cmd)} succeeding in {self.name}")

    def wait_for_port(self, port: int, timeout: float = 60.0) -> None:
        """Wait until something in the guest listens on TCP ``port``."""
        check_port(port)
        check_timeout(timeout, optional=False)
        deadline = time.monotonic() + timeout
        unanswered = ""

        def listens() -> bool:
            nonlocal unanswered
            left = max(0.5, min(30.0, deadline - time.monotonic()))
            try:  # each look gets what is left of the wait: a stalled guest must not hold it 30 s
                ports = self._agent.listening(timeout=left).ports
            except AgentTimeout as e:  # cancelled; the wait's deadline decides
                busy = " (a busy guest or host can take that long)" if left < 5 else ""
                unanswered = f"the agent did not answer in the {left:.1f} s left of the wait{busy} ({e})"
                return False
            unanswered = ""
            return port in ports

        if poll(listens, timeout):
            return
        raise WaitTimeout(f"a listen on TCP port {port} in {self.name}", timeout, unanswered)
