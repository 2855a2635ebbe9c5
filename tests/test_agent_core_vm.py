"""The agent's compiled core serves a clone's restore path, then hands the
port back to the Python agent with the commands it runs (issue 18)."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from harness import wait_until

from pytest_bottle import Bottle, ExecTimeout

CORE = "bottle-agent-co"  # /proc/PID/comm keeps 15 characters of "bottle-agent-core"

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: images have no compiled core")


def _server(b: Bottle) -> str:
    """Who started this command: the agent's core or its Python side."""
    return b.check_output("cat /proc/$PPID/comm").strip()


def test_a_clone_is_served_by_the_core_until_a_call_it_does_not_serve(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    b = bottle_factory()
    assert _server(b) == CORE
    assert b.exec("echo out; echo err >&2; exit 3").stdout == "out\n"
    assert b.exec(["no-such-command"]).returncode == 127
    b.exec("printf 'echo ran\\n' > /root/bare; chmod 755 /root/bare", check=True)
    r = b.exec(["/root/bare"])  # no #! line: as a shell says, not the agent's error
    assert (r.returncode, r.stderr) == (126, "/root/bare: Exec format error\n"), r
    r = b.exec(["echo", "x" * 200_000])  # one argument past the kernel's 128 KiB
    assert (r.returncode, r.stderr) == (126, "echo: Argument list too long\n"), r
    assert _server(b) == CORE  # none of those woke the Python agent
    b.write_text("/tmp/handed-back", "yes")  # a call only the Python agent serves
    assert _server(b) == "python3"
    assert b.read_text("/tmp/handed-back") == "yes"
    assert b.exec("hostname").stdout.strip() == b.name


def test_commands_running_at_the_handback_finish_under_the_python_agent(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    b = bottle_factory()
    with ThreadPoolExecutor(2) as pool:
        # Its parent before and after: the core, then (the core gone) the agent.
        # Files, not sleeps, order the steps: a loaded host may take seconds for each.
        slow = pool.submit(
            b.exec,
            "cat /proc/$PPID/comm; touch /tmp/s; while [ ! -e /tmp/go ]; do sleep 0.1; done; "
            "cat /proc/$(cut -d' ' -f4 /proc/$$/stat)/comm; echo done >&2; exit 7",
            timeout=300,
        )
        cut_started = time.monotonic()
        cut = pool.submit(b.exec, "touch /tmp/c; exec sleep 60", timeout=20)
        try:
            wait_until(lambda: b.exec("test -e /tmp/s -a -e /tmp/c").ok, 60, "both commands running")
            b.write_text("/tmp/handed-back", "yes")  # while both run
            assert not slow.done() and not cut.done()
        finally:  # the pool waits for slow, and slow for this
            b.exec("touch /tmp/go")
        result = slow.result(timeout=120)
        assert (result.returncode, result.stdout, result.stderr) == (7, f"{CORE}\npython3\n", "done\n")
        with pytest.raises(ExecTimeout):  # its deadline went along with it
            cut.result(timeout=120)
        assert 20 <= time.monotonic() - cut_started < 30
    assert _server(b) == "python3"


def test_a_big_output_through_the_core_is_whole_and_in_order(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    b = bottle_factory()
    # 15 MiB: nearly four times the window, so it only finishes if credit flows back.
    out = b.exec("seq 1 2000000", timeout=300).stdout
    assert out.splitlines() == [str(i) for i in range(1, 2000001)]
    assert _server(b) == CORE


def test_sigpipe_is_ignored_on_every_path_so_a_background_writer_lives_on(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    """docs/reference.md (exec): commands start with SIGPIPE ignored, whoever
    serves them; a writer left in the background survives the agent closing
    its pipe."""
    b = bottle_factory()

    def check(tag: str, **kw: str) -> None:
        mask = int(b.check_output("grep SigIgn /proc/self/status", **kw).split()[-1], 16)
        assert mask & (1 << 12), f"{tag}: SIGPIPE (13) not ignored: {mask:x}"
        b.exec(f"(sleep 1; while :; do echo {tag}; sleep 0.2; done) & echo $! > /tmp/{tag}.pid", **kw)
        time.sleep(3)  # it writes into the pipe the agent no longer reads
        assert b.exec(f"kill -0 $(cat /tmp/{tag}.pid)").returncode == 0, f"{tag}: the writer died"

    assert _server(b) == CORE
    check("core")
    check("subprocess", cwd="/tmp")  # the core hands back a call with a cwd
    assert _server(b) == "python3"
    check("spawn")  # the Python agent's posix_spawn


def _stray(b: Bottle) -> list[str]:
    """Cores beyond the one serving (if any), and zombies: what a spare left behind would be."""
    rows = [line.split(None, 2) for line in b.check_output("ps -eo pid=,stat=,comm=").splitlines()]
    own = b.check_output("cat /proc/$PPID/comm").strip() == CORE
    cores = [r for r in rows if r[2] == CORE]
    return [" ".join(r) for r in rows if r[1].startswith("Z")] + [" ".join(r) for r in cores[1 if own else 0 :]]


@pytest.mark.parametrize("first", ["exec", "write"])
def test_a_clones_spare_is_used_or_ended_by_its_first_call(bottle_factory, first: str) -> None:  # type: ignore[no-untyped-def]
    """guest/core/spare.c: the seed's core made a process for a clone's first
    plain exec; that exec runs in it, and a first call the core does not serve
    ends it.  Either way a user sees no extra process."""
    b = bottle_factory()
    if first == "write":
        b.write_text("/tmp/first", "yes")  # handed back: the core, and its spare, end
        assert _server(b) == "python3"
    else:
        # the first command: in a session of its own, its stdin /dev/null, the core's child
        out = b.check_output("echo $$; cut -d' ' -f6 /proc/$$/stat; readlink /proc/$$/fd/0; cat /proc/$PPID/comm")
        pid, session, stdin, parent = out.split()
        assert (session, stdin, parent) == (pid, "/dev/null", CORE)
    assert _stray(b) == []
