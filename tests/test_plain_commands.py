"""A test's commands run as ordinary processes: the agent is out of the OOM
killer's reach and at a raised priority (bottle-agent.service), but what it
starts gets neither, whichever side serves it (the compiled core after a
restore, the Python agent after the handback, a cold boot, a terminal)."""

from __future__ import annotations

import signal

import pytest

from pytest_bottle import Bottle

SHOW = "echo $(nice) $(cat /proc/self/oom_score_adj)"
# Memory until the OOM killer ends it: ~16 MiB a step, each page written.
HOG = ["python3", "-c", "x = []\nwhile True: x.append(bytearray(16 << 20))"]


def _agent(b: Bottle) -> str:
    """The serving agent's comm, the nice of each of its threads (a spawn
    resets its own thread's for the moment) and its OOM score."""
    nice = "$(awk '{print $19}' /proc/$PPID/task/*/stat | sort -u | tr '\\n' ' ')"
    return b.check_output(f"echo $(cat /proc/$PPID/comm) {nice} $(cat /proc/$PPID/oom_score_adj)")


def test_commands_get_the_default_priority_and_oom_score_on_every_path(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    b = bottle_factory()
    assert b.check_output(SHOW) == "0 0\n"  # a clone's first commands: the core (or the agent without one)
    assert b.check_output(SHOW, user="nobody") == "0 0\n"  # the Python agent (Popen)
    assert b.check_output(SHOW) == "0 0\n"  # the Python agent (posix_spawn)
    with b.spawn(["sh", "-c", SHOW + "; sleep 60"]) as p:
        p.wait_for_output("\n", timeout=60)
        assert p.stdout == "0 0\n"
    # ...while the Python agent itself keeps both, after all those spawns
    assert _agent(b).split() == ["python3", "-15", "-1000"]
    cold = bottle_factory(boot="cold")
    assert cold.check_output(SHOW) == "0 0\n"
    assert _agent(cold).split() == ["python3", "-15", "-1000"]


@pytest.mark.parametrize("side", ["first command", "python agent"])
def test_a_memory_hog_is_killed_by_the_oom_killer_and_the_bottle_lives_on(bottle_factory, side: str) -> None:  # type: ignore[no-untyped-def]
    b = bottle_factory()
    extra = {"cwd": "/tmp"} if side == "python agent" else {}  # cwd=: a call only the Python agent serves
    r = b.exec(HOG, timeout=300, **extra)
    assert r.returncode == -9, (r, b.console_log[-2000:])
    assert "Kernel panic" not in b.console_log
    assert b.check_output("echo alive") == "alive\n"
    # the kernel's own log (the journal reads it a moment later): the OOM killer did it
    assert "Killed process" in b.check_output("dmesg")


class _Interrupted(BaseException):
    """What pytest-timeout's signal method raises in the test's thread (a ``Failed``)."""


@pytest.mark.parametrize("streamed", [False, True])
def test_an_exec_interrupted_from_outside_ends_its_command(bottle: Bottle, streamed: bool) -> None:
    """A test timeout (or Ctrl-C) that lands in ``exec``: a shared bottle's next
    test must not find the command still running."""

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted()

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        with pytest.raises(_Interrupted):
            bottle.exec("sleep 301; echo never", on_output=(lambda stream, text: None) if streamed else None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert bottle.wait_until_succeeds("! pgrep -x sleep", timeout=15).ok
    assert bottle.check_output("echo next") == "next\n"  # the channel is fine afterwards
