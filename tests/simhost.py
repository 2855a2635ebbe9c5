"""A second host simulated on this machine, for xdist workers reached by ``--tx ssh=``.

Its own network namespace (a veth pair to the root namespace), mount
namespace with a private ``/run`` (so its own state dir: records, leases,
host id) and UTS namespace (its own hostname), and its own cache dir
(``XDG_CACHE_HOME``, passed by the ssh client's ``SetEnv``).  The pid
namespace and the rest of the file system are shared: the checkout and its
``.venv`` are where they are here.  sshd runs in it with a host key and a
client key made for it; ``close()`` ends everything it started (sshd and
every process below it, QEMU included), the namespace and the veth pair, and
is safe to call twice or after a failed start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
VETH_PREFIX = "bsim"  # its veth pair's names: the root namespace's end shows in `ip link`
HOSTNAME = "bottle-sim"
ALIAS = "simhost"


def missing() -> str | None:
    """Why this machine cannot simulate a host, or None."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces, sshd)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is missing (openssh-server; scripts/bootstrap --test-deps installs it)"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


class SimHost:
    def __init__(self, root: Path, cache_home: Path) -> None:
        tag = f"{os.getpid() % 100000}"
        self.root = root
        self.cache_home = cache_home  # XDG_CACHE_HOME on the host
        self.netns = f"bottlesim{tag}"
        self.veth = (f"{VETH_PREFIX}{tag}a", f"{VETH_PREFIX}{tag}b")
        # Its own /30 per xdist worker of a run (the controller's pid tells
        # runs apart), skipping one a killed run may have left on a link.
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        base = os.getppid() * 16 + int(worker[2:]) if worker[2:].isdigit() else os.getpid()
        octet = next(
            o for o in (((base + i) % 250) + 1 for i in range(250))
            if not subprocess.run(["ip", "-o", "addr", "show", "to", f"10.254.{o}.0/30"],
                                  capture_output=True, text=True, check=False).stdout.strip()
        )  # fmt: skip
        self.addr = (f"10.254.{octet}.1", f"10.254.{octet}.2")
        self.ssh_config = root / "ssh_config"
        self.sshd: subprocess.Popen[bytes] | None = None
        self._made_netns = False

    # -- start ----------------------------------------------------------------

    def start(self) -> SimHost:
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache_home.mkdir(parents=True, exist_ok=True)
        host_key, client_key = self.root / "host_key", self.root / "client_key"
        for key in (host_key, client_key):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bottle-sim", "-f", str(key))
        (self.root / "authorized_keys").write_text((self.root / "client_key.pub").read_text())
        a, b = self.veth
        _run("ip", "netns", "add", self.netns)
        self._made_netns = True
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        _run("ip", "link", "set", b, "netns", self.netns)
        _run("ip", "addr", "add", f"{self.addr[0]}/30", "dev", a)
        _run("ip", "link", "set", a, "up")
        _run("ip", "-n", self.netns, "addr", "add", f"{self.addr[1]}/30", "dev", b)
        _run("ip", "-n", self.netns, "link", "set", b, "up")
        _run("ip", "-n", self.netns, "link", "set", "lo", "up")  # bottles forward on 127.77.x.y
        sshd_config = self.root / "sshd_config"
        sshd_config.write_text(
            f"ListenAddress {self.addr[1]}\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            "PidFile none\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "AcceptEnv XDG_CACHE_HOME\n"
        )
        self.ssh_config.write_text(
            f"Host {ALIAS}\n"
            f"  HostName {self.addr[1]}\n  User root\n  IdentityFile {client_key}\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
            f"  SetEnv XDG_CACHE_HOME={self.cache_home}\n"
        )
        # A private /run (tmpfs): the host's own state dir; sshd needs /run/sshd there.
        inner = (
            "mount -t tmpfs -o mode=755 tmpfs /run && mkdir -m 755 /run/sshd"
            f" && hostname {HOSTNAME} && exec {SSHD} -D -e -f {sshd_config}"
        )
        log = open(self.root / "sshd.log", "wb")
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--propagation", "private"]
        self.sshd = subprocess.Popen([*argv, "sh", "-c", inner], stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while self.ssh("true").returncode != 0:
            if self.sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not come up: {(self.root / 'sshd.log').read_text()}")
            time.sleep(0.2)
        return self

    # -- use ------------------------------------------------------------------

    def ssh(self, command: str) -> subprocess.CompletedProcess[str]:
        argv = ["ssh", "-F", str(self.ssh_config), ALIAS, command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def tx(self, python: str, chdir: Path) -> str:
        """The ``--tx`` spec of a worker on this host."""
        return f"ssh={ALIAS}//ssh_config={self.ssh_config}//python={python}//chdir={chdir}"

    def path(self, inside: str) -> Path:
        """A path as the host sees it (its private /run), read from here
        through sshd's root in /proc (which follows its mount namespace)."""
        assert self.sshd is not None
        return Path(f"/proc/{self.sshd.pid}/root") / inside.lstrip("/")

    def descendants(self) -> list[psutil.Process]:
        if self.sshd is None:
            return []
        try:
            return psutil.Process(self.sshd.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    # -- stop -----------------------------------------------------------------

    def close(self) -> None:
        """Kill sshd and everything below it (workers, QEMU), then remove the
        namespace and the veth pair (the pair goes with its end in the namespace)."""
        try:
            if self.sshd is not None:
                procs = [*self.descendants()]
                try:
                    procs.append(psutil.Process(self.sshd.pid))
                except psutil.NoSuchProcess:
                    pass
                for p in procs:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
                psutil.wait_procs(procs, timeout=10)
                self.sshd.wait(timeout=10)
        finally:  # the namespace and the link go even if a process would not
            if self._made_netns:
                subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)
                self._made_netns = False
            if self.link_exists():
                subprocess.run(["ip", "link", "del", self.veth[0]], capture_output=True, timeout=30)

    def link_exists(self) -> bool:
        r = subprocess.run(["ip", "link", "show", self.veth[0]], capture_output=True, timeout=30)
        return r.returncode == 0

    def netns_exists(self) -> bool:
        return (Path("/run/netns") / self.netns).exists()
