"""LAN segments: a bridge in a private network namespace, TAP fds handed to QEMU.

The namespace is unnamed (no bind mount under /run/netns): it lives exactly
as long as something references it — our namespace fd and the TAP fds QEMU
holds.  When the owner dies (even by SIGKILL) and its QEMUs die with it, the
kernel frees the namespace, bridge and TAPs.  Nothing is ever created in the
host's own namespace, and QEMU itself stays in the host namespace so its
user-mode forwards still bind host loopback addresses.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import secrets
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import BottleError, HostDependencyError
from . import pools

log = logging.getLogger(__name__)
T = TypeVar("T")

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
BRIDGE = "br0"
LAN_PREFIX = 16  # LAN addresses come from 10.77.0.0/16, unique host-wide
WARM_TAPS = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread: namespace switches then die with the thread."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name="bottle-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES):
            raise HostDependencyError(
                "permission to create network namespaces (root, or CAP_SYS_ADMIN and CAP_NET_ADMIN)",
                None,
                f'{what} failed; lan= needs it, network="none"/"nat" and forward= do not',
            )
        if err == errno.ENOSPC:  # not a disk's: the host's limit of namespaces
            raise HostDependencyError(
                "room for another network namespace",
                None,
                f"{what} failed (ENOSPC): the limit (sysctl user.max_net_namespaces) is reached; lan= needs one",
            )
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _new_netns() -> int:
    def make() -> int:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    return _in_thread(make)


class Lan:
    """One L2 segment.  ``attach`` gives each bottle a TAP fd on the bridge."""

    def __init__(self, name: str) -> None:
        from pyroute2 import IPRoute

        self.name = name
        self.id = secrets.token_hex(3)
        self._lock = threading.Lock()
        self._warm: list[tuple[int, str]] = []  # TAPs on the bridge, ready to hand out
        # Who is on the segment, by name: their address and how to tell them of a
        # newcomer (see lifecycle.lan_names).
        self.members: dict[str, tuple[str, Callable[[str, str, float], None]]] = {}
        self._ns_fd = _new_netns()
        self.inode = os.fstat(self._ns_fd).st_ino
        ipr = None
        try:
            ipr = IPRoute(netns=f"/proc/{os.getpid()}/fd/{self._ns_fd}", flags=0)
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname=BRIDGE, kind="bridge")
            self._br = ipr.link_lookup(ifname=BRIDGE)[0]
            ipr.link("set", index=self._br, state="up")
        except BaseException as e:
            if ipr is not None:
                ipr.close()
            os.close(self._ns_fd)
            if isinstance(e, Exception) and not isinstance(e, BottleError):
                raise BottleError(f"setting up LAN {name!r} failed: {type(e).__name__}: {e}") from e
            raise
        self._ipr = ipr

    def join(
        self, name: str, ip: str, tell: Callable[[str, str, float], None]
    ) -> tuple[list[tuple[str, str]], list[Callable[[str, str, float], None]]]:
        """Adds ``name`` (at ``ip``; ``tell(ip, name, deadline)`` tells it of a later one):
        the members already there, (ip, name), and how to tell each of it."""
        with self._lock:
            there = [(addr, member) for member, (addr, _) in self.members.items()]
            tells = [t for _, t in self.members.values()]
            self.members[name] = (ip, tell)
        return there, tells

    def leave(self, name: str) -> None:
        with self._lock:
            self.members.pop(name, None)

    def attach(self, holder: str) -> tuple[int, str, str]:
        """A TAP on the bridge for ``holder``: (fd for QEMU, TAP name, LAN IP with prefix).

        Takes a warm TAP when there is one, and makes the next one in the
        background: the second and later bottles of a LAN skip the setns,
        the ioctl and the netlink round trips.
        """
        ip = pools.lease("lan", holder)[0]
        with self._lock:
            warm = self._warm.pop() if self._warm else None
        if warm is not None:
            fd, tap = warm
            pools.reassign("tap", tap, holder)
        else:
            try:
                fd, tap = self._new_tap(holder)
            except BaseException:
                pools.release_value("lan", ip)
                raise
        threading.Thread(target=self._refill, name="bottle-tap-pool", daemon=True).start()
        return fd, tap, f"{ip}/{LAN_PREFIX}"

    def _new_tap(self, holder: str) -> tuple[int, str]:
        tap = pools.lease("tap", holder)[0]
        ns_fd = self._ns_fd

        def create() -> int:
            _check(_libc.setns(ns_fd, CLONE_NEWNET), "setns")
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
            except BaseException:
                os.close(fd)
                raise
            return fd

        try:
            fd = _in_thread(create)
        except BaseException:
            pools.release_value("tap", tap)
            raise
        try:
            with self._lock:
                idx = self._ipr.link_lookup(ifname=tap)[0]
                self._ipr.link("set", index=idx, master=self._br, state="up")
        except BaseException:
            os.close(fd)
            pools.release_value("tap", tap)
            raise
        return fd, tap

    def _refill(self) -> None:
        with self._lock:
            if self._ns_fd < 0 or len(self._warm) >= WARM_TAPS:
                return
        try:
            fd, tap = self._new_tap(f"lan-{self.id}")
        except Exception as e:  # only a warm spare is lost; attach makes its own
            log.debug("warming a TAP for LAN %s: %s", self.name, e)
            return
        with self._lock:
            if self._ns_fd >= 0:
                self._warm.append((fd, tap))
                return
        os.close(fd)
        pools.release_value("tap", tap)

    def close(self) -> None:
        with self._lock:
            if self._ns_fd < 0:
                return
            warm, self._warm = self._warm, []
            try:
                self._ipr.close()
            finally:
                os.close(self._ns_fd)
                self._ns_fd = -1
        for fd, tap in warm:
            os.close(fd)
            pools.release_value("tap", tap)


class LanRegistry:
    """LANs by name within one scope (a test, the session), closed with their last bottle."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lans: dict[str, tuple[Lan, int]] = {}

    def acquire(self, name: str) -> Lan:
        with self._lock:
            lan, refs = self._lans.get(name) or (None, 0)
            if lan is None:
                lan = Lan(name)
            self._lans[name] = (lan, refs + 1)
            return lan

    def release(self, name: str) -> None:
        with self._lock:
            lan, refs = self._lans[name]
            if refs > 1:
                self._lans[name] = (lan, refs - 1)
                return
            del self._lans[name]
        lan.close()

    def close(self) -> None:
        with self._lock:
            lans, self._lans = [lan for lan, _ in self._lans.values()], {}
        for lan in lans:
            lan.close()
