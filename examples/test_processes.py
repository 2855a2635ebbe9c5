"""Run a server in the guest, wait for it, and watch long commands as they run.

- ``bottle.spawn`` starts a process and returns as soon as it runs: a
  ``GuestProcess`` with its ``pid``, its output so far, ``wait_for_output``
  to wait for a log line (a plain string or a compiled regex), and
  ``terminate()`` / ``kill()`` / ``wait()`` to end it;
- used as a context manager, the process is killed when the block ends;
- ``exec(..., on_output=fn)`` shows a long command's output while it runs,
  here to follow progress and to stop early by raising from ``fn``;
- the server is reached from the host through ``forward=[8080]``.
"""

from __future__ import annotations

import re
import signal
import urllib.request

import pytest

from pytest_bottle import Bottle, OutputTimeout

SERVER = ["python3", "-u", "-m", "http.server", "8080", "--directory", "/srv/www"]


@pytest.mark.bottle(forward=[8080])
def test_a_server_in_the_guest_answers_the_host(bottle: Bottle) -> None:
    bottle.write_text("/srv/www/index.html", "hello from the guest\n")
    with bottle.spawn(SERVER) as server:
        server.wait_for_output(re.compile(r"Serving HTTP on .* port 8080"), timeout=60)
        host, port = bottle.address(8080)
        with urllib.request.urlopen(f"http://{host}:{port}/index.html", timeout=30) as page:
            assert page.read() == b"hello from the guest\n"
        server.wait_for_output('"GET /index.html HTTP/1.1" 200', timeout=30, stream="stderr")
        result = server.terminate().wait(timeout=30)
    assert result.returncode == -signal.SIGTERM


def test_a_background_worker_and_its_log(bottle: Bottle) -> None:
    worker = bottle.spawn("for i in 1 2 3; do echo job $i done; sleep 0.5; done; echo idle; sleep 600")
    worker.wait_for_output("idle", timeout=60)
    assert worker.poll() is None  # still running
    assert worker.stdout.splitlines()[:3] == ["job 1 done", "job 2 done", "job 3 done"]
    worker.kill()
    assert worker.wait(timeout=30).returncode == -signal.SIGKILL


def test_waiting_for_a_line_that_never_comes_fails_with_what_was_seen(bottle: Bottle) -> None:
    broken = bottle.spawn("echo 'config error: no port given' >&2; exit 2")
    with pytest.raises(OutputTimeout) as e:
        broken.wait_for_output("Listening", timeout=30)
    assert e.value.returncode == 2 and "no port given" in e.value.stderr


def test_follow_a_long_command_as_it_runs(bottle: Bottle) -> None:
    progress: list[str] = []
    bottle.exec(
        "for pct in 25 50 75 100; do echo progress $pct%; sleep 0.2; done",
        on_output=lambda stream, text: progress.extend(text.splitlines()),
        check=True,
    )
    assert progress == ["progress 25%", "progress 50%", "progress 75%", "progress 100%"]


def test_stop_a_command_early_from_its_output(bottle: Bottle) -> None:
    class Enough(Exception):
        pass

    def stop_at_error(stream: str, text: str) -> None:
        if "ERROR" in text:
            raise Enough(text.strip())

    with pytest.raises(Enough, match="ERROR step 2"):
        bottle.exec("echo ok step 1; echo ERROR step 2; sleep 600", on_output=stop_at_error)
    assert bottle.exec("pgrep -x sleep").returncode == 1  # the command was killed, group and all
