"""Set up once, fork per test: a snapshot of a running, initialised service.

Some state only a running system can make: here a small key-value service is
started as a systemd unit and loaded with data *through its own API* (think
of a database initialised by the code under test).  That slow part runs once
per module; ``module_bottle.snapshot()`` saves the running VM, and every test
gets its own fork with ``bottle_factory(snapshot=prepared)``:

- the fork has the service running and the data loaded, without setting
  anything up again;
- what a test writes stays in its fork: forks are independent of each other
  and of the bottle the snapshot came from;
- a fork may publish ports with ``forward=`` (and set ``timeout=``); the rest
  (image, memory, network) is the snapshot's;
- each fork is its own machine: hostname, machine-id, MAC, SSH host key.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

import pytest

from pytest_bottle import Bottle, Snapshot

SERVICE = r"""
import json, os
from http.server import BaseHTTPRequestHandler, HTTPServer

DATA = "/var/lib/kv/data.json"

def load():
    return json.load(open(DATA)) if os.path.exists(DATA) else {}

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(load()).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        data = load()
        data[self.path.strip("/")] = self.rfile.read(int(self.headers["Content-Length"])).decode()
        with open(DATA + ".new", "w") as f:
            json.dump(data, f)
        os.replace(DATA + ".new", DATA)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass

os.makedirs(os.path.dirname(DATA), exist_ok=True)
HTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""

CLIENT = "python3 -c 'import sys, urllib.request as u; print(u.urlopen(\"http://127.0.0.1:8000/\").read().decode())'"


def put(bottle: Bottle, key: str, value: str) -> None:
    code = (
        "import sys, urllib.request as u; "
        "u.urlopen(u.Request('http://127.0.0.1:8000/' + sys.argv[1], data=sys.argv[2].encode(), method='PUT'))"
    )
    bottle.check_output(["python3", "-c", code, key, value])


def stored(bottle: Bottle) -> dict[str, str]:
    return dict(json.loads(bottle.check_output(CLIENT)))


@pytest.fixture(scope="module")
def prepared(module_bottle: Bottle) -> Snapshot:
    """The slow part, once: install and start the service, load it through its API."""
    module_bottle.write_text("/opt/kv/kv.py", SERVICE)
    module_bottle.check_output("systemd-run --unit=kv --property=Restart=always python3 /opt/kv/kv.py")
    module_bottle.wait_for_port(8000, timeout=60)
    for user in ("alice", "bob"):
        put(module_bottle, user, f"{user}@example.org")
    return module_bottle.snapshot()


def test_a_fork_has_the_service_running_with_its_data(
    prepared: Snapshot, bottle_factory: Callable[..., Bottle]
) -> None:
    b = bottle_factory(snapshot=prepared)
    assert b.check_output("systemctl is-active kv").strip() == "active"
    assert stored(b) == {"alice": "alice@example.org", "bob": "bob@example.org"}


def test_writes_stay_in_their_fork(prepared: Snapshot, bottle_factory: Callable[..., Bottle]) -> None:
    one, two = bottle_factory(snapshot=prepared), bottle_factory(snapshot=prepared)
    put(one, "carol", "carol@example.org")
    assert "carol" in stored(one)
    assert "carol" not in stored(two)


def test_the_next_fork_starts_clean(prepared: Snapshot, bottle_factory: Callable[..., Bottle]) -> None:
    b = bottle_factory(snapshot=prepared)
    assert sorted(stored(b)) == ["alice", "bob"]  # nothing of the previous test's forks


def test_a_fork_can_publish_a_port(prepared: Snapshot, bottle_factory: Callable[..., Bottle]) -> None:
    b = bottle_factory(snapshot=prepared, forward=[8000])
    host, port = b.address(8000)
    with urllib.request.urlopen(f"http://{host}:{port}/", timeout=30) as r:
        assert json.loads(r.read())["alice"] == "alice@example.org"


def test_each_fork_is_its_own_machine(
    prepared: Snapshot, module_bottle: Bottle, bottle_factory: Callable[..., Bottle]
) -> None:
    forks = [bottle_factory(snapshot=prepared) for _ in range(2)]
    ids = {b.check_output("hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address") for b in forks}
    ids.add(module_bottle.check_output("hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address"))
    assert len(ids) == 3
