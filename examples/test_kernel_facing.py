"""Kernel-facing checks: sysctls, mounts, network namespaces, routing, firewall.

A bottle runs its own Linux kernel, and tests run as root in it, so they can
change kernel state that no container or host-side test could touch safely:

- sysctls, set at runtime and through ``/etc/sysctl.d`` + ``systemd-sysctl``;
- a size-limited tmpfs, and a loop-mounted ext4 image made with ``mkfs.ext4``;
- two network namespaces joined by a veth pair, with TCP between them;
- policy routing (``ip rule`` + a routing table), checked with ``ip -j route get``;
- an nftables rule that rejects that TCP traffic.  ``nft`` is not in the
  minimal image, so that one test asks for ``network="nat"`` and installs it.

Each test gets a fresh VM, so none of them cleans up after itself.
"""

from __future__ import annotations

import json

import pytest

from pytest_bottle import Bottle

# -- sysctl -------------------------------------------------------------------


def test_sysctl_at_runtime(bottle: Bottle) -> None:
    before = bottle.read_text("/proc/sys/net/ipv4/ip_forward").strip()
    after = "0" if before == "1" else "1"

    bottle.check_output(["sysctl", "-w", f"net.ipv4.ip_forward={after}"])

    assert bottle.read_text("/proc/sys/net/ipv4/ip_forward").strip() == after
    assert bottle.check_output(["sysctl", "-n", "net.ipv4.conf.all.forwarding"]).strip() == after


def test_sysctl_drop_in_is_applied_by_systemd(bottle: Bottle) -> None:
    bottle.write_text(
        "/etc/sysctl.d/90-example.conf",
        "net.ipv4.ip_forward = 1\nvm.swappiness = 7\nkernel.pid_max = 65000\n",
    )
    bottle.check_output(["systemctl", "restart", "systemd-sysctl.service"], timeout=60)

    assert bottle.read_text("/proc/sys/net/ipv4/ip_forward") == "1\n"
    assert bottle.read_text("/proc/sys/vm/swappiness") == "7\n"
    assert bottle.read_text("/proc/sys/kernel/pid_max") == "65000\n"


def test_sysctl_rejects_invalid_value(bottle: Bottle) -> None:
    r = bottle.exec(["sysctl", "-w", "vm.swappiness=banana"])
    assert not r.ok
    assert "Invalid argument" in r.stderr


# -- mounts -------------------------------------------------------------------


def test_tmpfs_with_a_size_limit(bottle: Bottle) -> None:
    bottle.check_output("mkdir -p /mnt/scratch && mount -t tmpfs -o size=4m,mode=1777 scratch /mnt/scratch")

    fstype, source, options = bottle.check_output(["findmnt", "-no", "FSTYPE,SOURCE,OPTIONS", "/mnt/scratch"]).split()
    assert (fstype, source) == ("tmpfs", "scratch")
    assert "size=4096k" in options.split(",")
    assert bottle.check_output(["stat", "-c", "%a", "/mnt/scratch"]).strip() == "1777"

    # The kernel enforces the limit.
    r = bottle.exec("dd if=/dev/zero of=/mnt/scratch/big bs=1M count=8")
    assert not r.ok
    assert "No space left on device" in r.stderr

    # Unmounting drops everything that was in it.
    bottle.check_output(["umount", "/mnt/scratch"])
    assert not bottle.exec(["mountpoint", "-q", "/mnt/scratch"]).ok
    assert not bottle.exec(["test", "-e", "/mnt/scratch/big"]).ok


def test_loop_mounted_ext4_image(bottle: Bottle) -> None:
    img, mnt = "/root/disk.img", "/mnt/disk"
    bottle.check_output(f"truncate -s 32M {img} && mkfs.ext4 -q -L exampledisk {img} && mkdir -p {mnt}", timeout=120)
    assert bottle.check_output(["e2label", img]).strip() == "exampledisk"

    bottle.check_output(["mount", "-o", "loop", img, mnt])
    source, fstype = bottle.check_output(["findmnt", "-no", "SOURCE,FSTYPE", mnt]).split()
    assert source.startswith("/dev/loop") and fstype == "ext4"
    assert bottle.check_output(["losetup", "-nO", "BACK-FILE", source]).strip() == img
    bottle.write_text(f"{mnt}/hello.txt", "persisted on ext4\n")
    bottle.check_output(["umount", mnt])
    # The loop device is released: the kernel does that asynchronously after
    # the unmount (autoclear), so give it a moment rather than look at once.
    released = f'for i in $(seq 50); do [ -z "$(losetup -j {img})" ] && exit 0; sleep 0.1; done; exit 1'
    assert bottle.exec(released).ok, bottle.check_output(["losetup", "-j", img])

    # Mounted again, read-only: the data survived, writes are refused.
    bottle.check_output(["mount", "-o", "loop,ro", img, mnt])
    assert bottle.read_text(f"{mnt}/hello.txt") == "persisted on ext4\n"
    r = bottle.exec(["touch", f"{mnt}/new"])
    assert not r.ok and "Read-only file system" in r.stderr
    bottle.check_output(["umount", mnt])
    r = bottle.exec(["fsck.ext4", "-fn", img], timeout=120)
    assert r.ok, r.stdout + r.stderr


# -- network namespaces, routing, firewall ------------------------------------

SERVER_IP, CLIENT_IP, PORT = "10.200.0.2", "10.200.0.1", 8000


def connect(bottle: Bottle, netns: str, ip: str, port: int) -> str:
    """From inside ``netns``, open a TCP connection; return 'ok' or the error's name."""
    script = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({ip!r}, {port}), timeout=5).close(); print('ok')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    return bottle.check_output(["ip", "netns", "exec", netns, "python3", "-c", script], timeout=60).strip()


@pytest.fixture
def two_namespaces(bottle: Bottle) -> Bottle:
    """Namespaces "client" and "server" joined by a veth pair, a TCP listener in "server"."""
    bottle.check_output(
        f"""
        set -e
        ip netns add client
        ip netns add server
        ip link add veth-c netns client type veth peer name veth-s netns server
        ip -n client addr add {CLIENT_IP}/24 dev veth-c
        ip -n server addr add {SERVER_IP}/24 dev veth-s
        ip -n client link set veth-c up
        ip -n server link set veth-s up
        ip -n client link set lo up
        ip -n server link set lo up
        """
    )
    # A long-running listener belongs to systemd, not to the exec that starts it.
    bottle.check_output(
        "systemd-run --unit=listener ip netns exec server"
        f" python3 -m http.server {PORT} --bind {SERVER_IP} --directory /tmp",
        timeout=60,
    )
    bottle.wait_until_succeeds(f"ip netns exec server ss -Htln 'sport = :{PORT}' | grep -q LISTEN", timeout=60)
    return bottle


def test_namespaces_talk_over_a_veth_pair(two_namespaces: Bottle) -> None:
    b = two_namespaces
    assert connect(b, "client", SERVER_IP, PORT) == "ok"
    assert connect(b, "client", SERVER_IP, PORT + 1) == "ConnectionRefusedError"

    # Each namespace sees only its own interfaces; the root namespace sees neither.
    assert "veth-c" in b.check_output(["ip", "-n", "client", "-br", "link"])
    assert "veth-s" not in b.check_output(["ip", "-n", "client", "-br", "link"])
    assert SERVER_IP not in b.check_output(["ip", "-br", "addr"])
    # The listener really runs in the server namespace.
    pid = b.check_output(["systemctl", "show", "--value", "-p", "MainPID", "listener"]).strip()
    assert b.check_output(["ip", "netns", "identify", pid]).strip() == "server"


def test_policy_routing_rule(bottle: Bottle) -> None:
    bottle.check_output(
        """
        set -e
        ip link add uplink2 type dummy
        ip addr add 192.0.2.10/24 dev uplink2
        ip link set uplink2 up
        ip route add default via 192.0.2.1 dev uplink2 table 100
        ip rule add from 192.0.2.10 lookup 100 priority 1000
        """
    )

    def route(*args: str) -> dict[str, str]:
        routes: list[dict[str, str]] = json.loads(
            bottle.check_output(["ip", "-j", "route", "get", "203.0.113.5", *args])
        )
        return routes[0]

    sourced = route("from", "192.0.2.10")
    assert (sourced["dev"], sourced["gateway"]) == ("uplink2", "192.0.2.1")
    main = route()
    assert main["dev"] != "uplink2"  # everything else still uses the main table

    rules = json.loads(bottle.check_output(["ip", "-j", "rule", "show", "priority", "1000"]))
    assert [(r["src"], r["table"]) for r in rules] == [("192.0.2.10", "100")]

    bottle.check_output(["ip", "rule", "del", "priority", "1000"])
    assert route("from", "192.0.2.10")["dev"] == main["dev"]


@pytest.mark.bottle(network="nat")
def test_nftables_rejects_traffic(two_namespaces: Bottle) -> None:
    b = two_namespaces
    b.check_output("apt-get update", timeout=600)
    b.check_output(
        ["apt-get", "install", "-y", "--no-install-recommends", "nftables"],
        env={"DEBIAN_FRONTEND": "noninteractive"},
        timeout=600,
    )
    assert connect(b, "client", SERVER_IP, PORT) == "ok"

    b.check_output(
        ["ip", "netns", "exec", "server", "nft", "-f", "-"],
        input=f"""
        table inet example {{
            chain input {{
                type filter hook input priority 0; policy accept;
                tcp dport {PORT} counter reject with tcp reset
            }}
        }}
        """,
    )
    assert connect(b, "client", SERVER_IP, PORT) == "ConnectionRefusedError"
    ruleset = json.loads(b.check_output(["ip", "netns", "exec", "server", "nft", "-j", "list", "ruleset"]))
    rules = [item["rule"] for item in ruleset["nftables"] if "rule" in item]
    counters = [e["counter"]["packets"] for rule in rules for e in rule["expr"] if "counter" in e]
    assert len(counters) == 1 and counters[0] >= 1  # the rejected SYN was counted
    # The rule lives in the server namespace only: the root namespace has no ruleset.
    assert b.check_output(["nft", "list", "ruleset"]).strip() == ""

    b.check_output(["ip", "netns", "exec", "server", "nft", "delete", "table", "inet", "example"])
    assert connect(b, "client", SERVER_IP, PORT) == "ok"
