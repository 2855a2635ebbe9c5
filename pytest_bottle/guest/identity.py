"""Guest side of the clone handshake: identity, entropy, clock and NICs (stdlib only).

Snapshot clones wake up sharing their parent's RNG state, clock, machine-id,
SSH host keys and MAC addresses.  The host sends fresh values right after a
restore (and after a cold boot, so both paths are the same).  Everything here
uses syscalls and ioctls, not subprocesses: it runs on the restore path.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import socket
import struct
import subprocess
import time
from typing import Any

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCGIFADDR, SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFHWADDR = 0x8915, 0x8916, 0x891C, 0x8924
IFF_UP = 0x1
ARPHRD_ETHER = 1


def setup(call: dict[str, Any]) -> dict[str, Any]:
    """Apply what the host sent."""
    if call.get("entropy"):
        _add_entropy(bytes.fromhex(call["entropy"]))
    if call.get("time_ns"):
        time.clock_settime_ns(time.CLOCK_REALTIME, int(call["time_ns"]))
    if call.get("hostname"):
        _set_hostname(call["hostname"])
    if call.get("machine_id"):
        _write("/etc/machine-id", call["machine_id"] + "\n", 0o444)
    if call.get("ssh_host_key"):
        _set_ssh_host_key(call["ssh_host_key"]["private"], call["ssh_host_key"]["public"])
    if call.get("resolv_conf") is not None:
        _write_if_changed("/etc/resolv.conf", call["resolv_conf"], 0o644)
    if call.get("authorized_keys"):
        os.makedirs("/root/.ssh", mode=0o700, exist_ok=True)
        _write("/root/.ssh/authorized_keys", call["authorized_keys"], 0o600)
    nics = {}
    for nic in call.get("nics", []):
        try:
            nics[nic["mac"]] = _configure_nic(nic)
        except OSError as e:  # the seed's name for it was wrong after all
            if e.errno != errno.ENODEV or not nic.get("name"):
                raise
            nics[nic["mac"]] = _configure_nic(dict(nic, name=None))
    if call.get("list_nics"):  # a seed records its interfaces' names for its clones
        nics.update(_ifaces())
    return {"nics": nics}


def _add_entropy(seed: bytes) -> None:
    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        # Force the CRNG to reseed now, not at its next scheduled reseed.
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def _set_hostname(name: str) -> None:
    # The name resolves through nss-myhostname: /etc/hosts need not change.
    socket.sethostname(name)
    _write("/etc/hostname", name + "\n", 0o644)


def _set_ssh_host_key(private: str, public: str) -> None:
    # The image has no other host keys and sshd_config names only this one.
    _write("/etc/ssh/ssh_host_ed25519_key", private, 0o600)
    _write("/etc/ssh/ssh_host_ed25519_key.pub", public, 0o644)


def _write(path: str, text: str, mode: int) -> None:
    """Overwrite in place: no truncate, rename, new inode or chmod unless needed.

    Nothing reads these files mid-handshake, and every file system path the
    restore takes is code TCG must translate afresh in each clone; the seed
    holds files of the same sizes, so a clone's write is a plain overwrite."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)  # the mode applies to a new file only
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        os.pwrite(fd, data, 0)
        if size > len(data):
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _write_if_changed(path: str, text: str, mode: int) -> None:
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    _write(path, text, mode)


def _ifaces() -> dict[str, str]:
    """MAC -> interface name."""
    found = {}
    for path in glob.glob("/sys/class/net/*/address"):
        with open(path) as f:
            found[f.read().strip().lower()] = path.split("/")[4]
    return found


def _iface_by_mac(mac: str) -> str:
    try:
        return _ifaces()[mac.lower()]
    except KeyError:
        raise LookupError(f"no network interface with MAC {mac}") from None


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s", name.encode()) + payload.ljust(24, b"\0")


def _sockaddr_in(ip: str) -> bytes:
    return struct.pack("HH4s", socket.AF_INET, 0, socket.inet_aton(ip))


def _configure_nic(nic: dict[str, Any]) -> str:
    """Set a NIC's MAC and IPv4 address; the kernel adds the on-link route.

    A clone is told its NICs' names (the seed's); a cold boot looks them up."""
    name = nic.get("name") or _iface_by_mac(nic["match"])
    s = _ioctl_socket()
    if nic["mac"].lower() != nic["match"].lower():
        hw = bytes.fromhex(nic["mac"].replace(":", ""))
        fcntl.ioctl(s, SIOCSIFHWADDR, _ifreq(name, struct.pack("H6s", ARPHRD_ETHER, hw)))
    if nic.get("ip") and _ipv4(s, name) != nic["ip"].partition("/")[0]:  # a clone has its seed's already
        ip, _, plen = nic["ip"].partition("/")
        mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - int(plen or 24))) & 0xFFFFFFFF))
        fcntl.ioctl(s, SIOCSIFADDR, _ifreq(name, _sockaddr_in(ip)))
        fcntl.ioctl(s, SIOCSIFNETMASK, _ifreq(name, _sockaddr_in(mask)))
    flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(name)), 16)[0]
    if not flags & IFF_UP:
        _no_dad(name)
        fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))
    if nic.get("ip") and nic.get("announce", True):
        _gratuitous_arp(name, nic["mac"], nic["ip"].partition("/")[0])
    if nic.get("gateway") and not _has_default_route():
        subprocess.run(["ip", "route", "replace", "default", "via", nic["gateway"], "dev", name], check=True)
    return name


def _no_dad(name: str) -> None:
    """The IPv6 link-local of a NIC brought up here is usable at once, not
    after a second of duplicate address detection (the MAC is the bottle's own)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/accept_dad", "w") as f:
            f.write("0")
    except OSError:  # no IPv6: nothing to detect
        pass


_sock: list[socket.socket] = []


def _ioctl_socket() -> int:
    """A socket for interface ioctls, kept open: a clone inherits its seed's."""
    if not _sock:
        _sock.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    return _sock[0].fileno()


def _ipv4(s: int, name: str) -> str | None:
    try:
        return socket.inet_ntoa(fcntl.ioctl(s, SIOCGIFADDR, _ifreq(name))[20:24])
    except OSError:  # no address yet
        return None


def announce(call: dict[str, Any]) -> dict[str, Any]:
    """The gratuitous ARP a setup left for later (``announce: false``)."""
    _gratuitous_arp(call["name"], call["mac"], call["ip"].partition("/")[0])
    return {}


def _gratuitous_arp(name: str, mac: str, ip: str) -> None:
    """Announce (MAC, IP): a fresh QEMU's user network has an empty ARP table and
    drops the first packet towards the guest otherwise (a 6 s stall on the
    first forwarded connection after a restore); LAN peers learn the new MAC."""
    hw, addr = bytes.fromhex(mac.replace(":", "")), socket.inet_aton(ip)
    arp = struct.pack("!HHBBH", ARPHRD_ETHER, 0x0800, 6, 4, 1) + hw + addr + b"\0" * 6 + addr
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((name, 0))
        s.send(b"\xff" * 6 + hw + struct.pack("!H", 0x0806) + arp)


def _has_default_route() -> bool:
    with open("/proc/net/route") as f:
        return any(line.split()[1] == "00000000" for line in f.readlines()[1:])
