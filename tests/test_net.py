"""Forwards, egress modes, LANs (issue: networking, pools, sweeping)."""

from __future__ import annotations

import http.server
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from simhost import VETH_PREFIX

from pytest_bottle import Bottle, BottleError, SpecError


@pytest.fixture
def host_server() -> Iterator[int]:
    """An HTTP server on all host addresses: what a guest with egress could reach as 10.0.2.2."""
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _fetch(b: Bottle, url: str) -> int:
    return b.exec(
        ["python3", "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=5)"], timeout=60
    ).returncode


def _port_free_everywhere() -> int:
    """A port no host service holds (what a forward's own number depends on)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def test_forward_publishes_a_guest_port_on_loopback(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    guest_port = _port_free_everywhere()
    bottle = bottle_factory(forward=[guest_port])
    bottle.exec("mkdir -p /srv && echo hello > /srv/index.html")
    bottle.exec(f"cd /srv && nohup python3 -m http.server {guest_port} >/dev/null 2>&1 &")
    bottle.wait_for_port(guest_port, timeout=60)
    host, port = bottle.address(guest_port)
    assert port == guest_port and ipaddress.ip_address(host).is_loopback and host != "127.0.0.1"
    assert urllib.request.urlopen(f"http://{host}:{port}/index.html", timeout=10).read() == b"hello\n"
    # Bound to the leased loopback address only, not to every address.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", guest_port)) != 0
    with pytest.raises(BottleError, match="not forwarded"):
        bottle.address(guest_port + 1 if guest_port < 65535 else guest_port - 1)
    for bad in (str(guest_port), float(guest_port), True, None, 0, 70000):  # as wait_for_port checks its port
        with pytest.raises(SpecError, match="guest_port must be a TCP port number"):
            bottle.address(bad)


CAPTURE_ARP = """
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # outgoing: ETH_P_ALL only
s.bind(("eth0", 0))
open("/tmp/capture.ready", "w").close()
s.settimeout(120)
while True:
    frame, addr = s.recvfrom(2048)
    if addr[2] == socket.PACKET_OUTGOING and frame[12:14] == bytes.fromhex("0806"):
        open("/tmp/arp.hex", "w").write(frame.hex())
        break
"""


@pytest.mark.bottle(forward=[8080])
def test_asking_for_a_forward_announces_the_clones_mac(bottle: Bottle) -> None:
    # QEMU's fresh user network learns the clone's MAC from this ARP; without
    # it the first forwarded connection stalls.  It is sent on first use.
    bottle.write_text("/tmp/capture.py", CAPTURE_ARP)
    bottle.exec("nohup python3 /tmp/capture.py >/dev/null 2>&1 &")
    bottle.wait_until_succeeds("test -e /tmp/capture.ready", timeout=60)
    mac = bottle.read_text("/sys/class/net/eth0/address").strip()
    bottle.address(8080)
    frame = bytes.fromhex(bottle.wait_until_succeeds("cat /tmp/arp.hex", timeout=30).stdout)
    assert frame[22:28] == bytes.fromhex(mac.replace(":", ""))  # the ARP sender's MAC
    assert socket.inet_ntoa(frame[28:32]) == "10.0.2.15"


def test_network_none_has_no_egress(bottle: Bottle, host_server: int) -> None:
    assert _fetch(bottle, f"http://10.0.2.2:{host_server}/") != 0


@pytest.mark.bottle(network="nat")
def test_network_nat_reaches_out(bottle: Bottle, host_server: int) -> None:
    assert _fetch(bottle, f"http://10.0.2.2:{host_server}/") == 0


def test_two_bottles_on_a_lan_exchange_tcp(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    server, client, outsider = bottle_factory(lan="net"), bottle_factory(lan="net"), bottle_factory(lan="other")
    server.exec("cd /tmp && echo from-server > hi.txt && nohup python3 -m http.server 7000 >/dev/null 2>&1 &")
    server.wait_for_port(7000, timeout=60)
    out = client.check_output(
        [
            "python3",
            "-c",
            f"import urllib.request; print(urllib.request.urlopen('http://{server.name}:7000/hi.txt', "
            "timeout=10).read().decode(), end='')",
        ],
        timeout=60,
    )
    assert out == "from-server\n"  # by name: peers are in each other's /etc/hosts
    assert server.check_output(["getent", "hosts", client.name]).split() == [client.lan_ip, client.name]
    assert client.check_output(["getent", "hosts", server.name]).split() == [server.lan_ip, server.name]
    # A bottle on another LAN of the same test is on another segment, and knows no names on this one.
    assert _fetch(outsider, f"http://{server.lan_ip}:7000/hi.txt") != 0
    assert outsider.exec(["getent", "hosts", server.name]).returncode == 2


def test_a_hung_lan_peer_costs_a_newcomer_a_warning_within_its_timeout(  # type: ignore[no-untyped-def]
    bottle_factory, caplog: pytest.LogCaptureFixture
) -> None:
    """Telling the peers of a newcomer's name took up to 45 s for each peer
    that did not answer, whatever the newcomer's timeout."""
    peer, healthy = bottle_factory(lan="hung"), bottle_factory(lan="hung")
    os.kill(peer.pid, signal.SIGSTOP)  # QEMU itself: its agent reads nothing
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="pytest_bottle"):
            newcomer = bottle_factory(lan="hung", timeout=15)
        took = time.monotonic() - started
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    assert took < 15 + 8, took  # it took 32-45 s: the peer's 30 s, then its agent's silence
    said = [r.getMessage() for r in caplog.records if "does not know its LAN peer" in r.getMessage()]
    assert said and said[0].startswith(f"pytest-bottle: {peer.name} does not know its LAN peer {newcomer.name}"), said
    # The newcomer wrote its own lines: it knows the peer by name, and the peer runs on.
    assert newcomer.check_output(["getent", "hosts", peer.name]).split() == [peer.lan_ip, peer.name]
    assert peer.exec("true", timeout=60).ok
    # Peers are told all at once: the hung one did not leave the others no time.
    assert healthy.check_output(["getent", "hosts", newcomer.name]).split() == [newcomer.lan_ip, newcomer.name]


def test_lan_peers_reach_each_other_over_ipv6_link_local_at_once(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    a, b = bottle_factory(lan="v6"), bottle_factory(lan="v6")

    def link_local(x: Bottle) -> tuple[str, str]:
        nic = x.check_output(f"ip -o -4 addr show to {x.lan_ip} | cut -d' ' -f2").strip()
        line = x.check_output(["ip", "-6", "-o", "addr", "show", "dev", nic, "scope", "link"])
        assert "tentative" not in line, line  # usable now, not after a second of duplicate detection
        return nic, line.split()[3].split("/")[0]

    nic_b, ll_b = link_local(b)  # the newest first
    nic_a, ll_a = link_local(a)
    assert ll_a != ll_b  # each from its bottle's own MAC
    assert a.exec(["ping", "-6", "-c1", "-W5", f"{ll_b}%{nic_a}"]).returncode == 0
    assert b.exec(["ping", "-6", "-c1", "-W5", f"{ll_a}%{nic_b}"]).returncode == 0


def _host_links() -> set[str]:
    """The root namespace's links, but for a simulated host's veth
    (tests/simhost.py), which a test on another xdist worker may add or
    remove meanwhile."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
    return {name for name in names if not name.startswith(VETH_PREFIX)}


def test_lan_devices_never_appear_in_the_host_namespace(bottle_factory) -> None:  # type: ignore[no-untyped-def]
    before = _host_links()
    a = bottle_factory(lan="x")
    assert _host_links() == before
    assert a.lan_ip


def test_a_host_wildcard_listener_does_not_stop_the_bottle() -> None:
    import pytest_bottle

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest_bottle.launch(forward=[port]) as b:
            host, host_port = b.address(port)
            assert host_port != port  # the port was not free on the bottle's address
            b.exec(f"cd /tmp && nohup python3 -m http.server {port} >/dev/null 2>&1 &")
            b.wait_for_port(port, timeout=60)
            assert urllib.request.urlopen(f"http://{host}:{host_port}/", timeout=10).status == 200


def test_warm_tap_pool_hands_out_ready_taps() -> None:
    import os
    import time

    from pytest_bottle.net import pools
    from pytest_bottle.net.lan import Lan

    lan = Lan("warm")
    try:
        fd1, tap1, ip1 = lan.attach("holder-a")
        deadline = time.monotonic() + 10
        while not lan._warm and time.monotonic() < deadline:  # refilled in the background
            time.sleep(0.01)
        warm_tap = lan._warm[0][1]
        fd2, tap2, ip2 = lan.attach("holder-b")
        assert tap2 == warm_tap and tap1 != tap2 and ip1 != ip2
        leases = pools.snapshot()
        assert leases["tap"][tap2]["holder"] == "holder-b" and leases["tap"][tap1]["holder"] == "holder-a"
        for fd in (fd1, fd2):
            os.close(fd)
    finally:
        lan.close()
        pools.release("holder-a")
        pools.release("holder-b")
    deadline = time.monotonic() + 10
    while any(o.get("holder") == f"lan-{lan.id}" for o in pools.snapshot().get("tap", {}).values()):
        assert time.monotonic() < deadline, "warm TAP leases outlived their LAN"
        time.sleep(0.05)
