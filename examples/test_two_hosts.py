"""Two bottles on one LAN: a server and a client exchanging TCP traffic.

``bottle_factory(lan="net")`` starts VMs that share an L2 segment named
``net`` (a bridge in a private network namespace on the host; nothing touches
the host's own network).  Each bottle gets an address on it, ``bottle.lan_ip``,
and its own hostname, ``bottle.name``.  Bottles of the same test with the
same ``lan`` name see each other; different names are separate segments.
Segments, like bottles, are torn down after the test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from pytest_bottle import Bottle

PORT = 8000


def add_to_hosts(*bottles: Bottle) -> None:
    """Name every bottle's LAN address in each one's /etc/hosts (there is no DNS on a LAN)."""
    entries = "".join(f"{b.lan_ip} {b.name}\n" for b in bottles)
    for b in bottles:
        b.check_output(["sh", "-c", "cat >> /etc/hosts"], input=entries)


def serve_http(b: Bottle, text: str) -> None:
    """Serve ``text`` at http://<lan_ip>:PORT/ from ``b``, as a systemd service."""
    b.write_text("/srv/www/index.html", text)
    b.check_output(
        f"systemd-run --unit=web python3 -m http.server {PORT} --bind {b.lan_ip} --directory /srv/www",
        timeout=60,
    )
    b.wait_for_port(PORT, timeout=60)


def try_connect(b: Bottle, host: str) -> str:
    """From ``b``, open a TCP connection to host:PORT; 'ok' or the error's name."""
    script = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {PORT}), timeout=5).close(); print('ok')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    return b.check_output(["python3", "-c", script], timeout=60).strip()


def test_client_fetches_from_server_over_the_lan(bottle_factory: Callable[..., Bottle]) -> None:
    server = bottle_factory(lan="net")
    client = bottle_factory(lan="net")
    assert server.lan_ip and client.lan_ip and server.lan_ip != client.lan_ip

    # Each guest carries its LAN address on an interface of its own.
    for b in (server, client):
        addrs = json.loads(b.check_output(["ip", "-j", "-4", "addr", "show"]))
        assert b.lan_ip in {a["local"] for i in addrs for a in i["addr_info"]}

    add_to_hosts(server, client)
    serve_http(server, f"hello from {server.name}\n")

    script = (
        "import urllib.request\n"
        f"print(urllib.request.urlopen('http://{server.name}:{PORT}/', timeout=10).read().decode(), end='')\n"
    )
    assert client.check_output(["python3", "-c", script], timeout=60) == f"hello from {server.name}\n"

    # The server saw the request come from the client's LAN address
    # (journald files the service's log line a moment after it is written).
    from_client = f"grep '^{re.escape(client.lan_ip)} - - ' | grep -qF '\"GET / HTTP/1.1\" 200'"
    server.wait_until_succeeds(f"journalctl -u web --no-pager -o cat | {from_client}", timeout=30)


def test_bottles_on_different_lans_are_isolated(bottle_factory: Callable[..., Bottle]) -> None:
    left = bottle_factory(lan="left")
    left_peer = bottle_factory(lan="left")
    right = bottle_factory(lan="right")
    assert left.lan_ip and left_peer.lan_ip and right.lan_ip
    add_to_hosts(left, left_peer)
    add_to_hosts(right)
    serve_http(left, "left\n")

    assert try_connect(left_peer, left.lan_ip) == "ok"
    assert try_connect(right, left.lan_ip) != "ok"  # no route, no ARP answer: a timeout or "unreachable"
