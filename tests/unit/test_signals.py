"""host.signals in a process of its own (handlers are process-wide)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, signal
    from pytest_bottle.host import signals
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # ignored already (nohup): left so
    signals.unwind_on(signal.SIGHUP, signal.SIGTERM, signal.SIGUSR2)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        print("not raised")
    except KeyboardInterrupt as e:
        print("status", signals.exit_status(e))
    # once: the cleanup that follows is not cut short by another one
    print("after", signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)
    os.kill(os.getpid(), signal.SIGTERM)
    print("usr2 ignored", signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN)
    if os.fork() == 0:  # a forked child with the handler dies the default way
        signals.unwind_on(signal.SIGINT)  # (SIGINT is Python's own: not at its default, not taken)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        signals.unwind_on(signal.SIGQUIT)
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGQUIT)
            os._exit(0)
        print("child", os.waitpid(pid, 0)[1] >> 8, flush=True)
        os._exit(0)
    os.wait()
""")


def test_unwind_once_exit_status_and_what_it_leaves_alone() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["status 129", "after True True", "usr2 ignored True", f"child {128 + 3}"]


RESTORE = textwrap.dedent("""
    import signal
    from pytest_bottle.host import signals
    restore = signals.unwind_on(signal.SIGHUP, signal.SIGTERM)
    mine = lambda *a: None
    signal.signal(signal.SIGTERM, mine)  # set after ours: not ours to put back
    restore()
    print(signal.getsignal(signal.SIGHUP) == signal.SIG_DFL, signal.getsignal(signal.SIGTERM) is mine)
""")


def test_the_defaults_come_back_for_a_process_that_lives_on_after_pytest_main() -> None:
    # a pytest.main() in a long-lived process left its handler (or SIG_IGN, after one signal) behind
    out = subprocess.run([sys.executable, "-c", RESTORE], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "True True\n"), out.stderr
