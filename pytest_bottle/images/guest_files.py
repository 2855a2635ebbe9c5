"""Files the builder lays over the bootstrapped root: agent, units, trimmed defaults."""

from __future__ import annotations

import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from .recipes import CORE_NAME, GUEST_DIR, GUEST_FILES, Recipe, core_sources

log = logging.getLogger(__name__)

AGENT_DIR = "/usr/lib/pytest-bottle"

AGENT_UNIT = f"""\
[Unit]
Description=pytest-bottle guest agent
# Early: the agent only needs the root file system and its virtio port.
DefaultDependencies=no
After=systemd-journald.socket
Before=sysinit.target shutdown.target
Conflicts=shutdown.target

[Service]
# -m, not a script path: a module runs from its compiled bytecode.
WorkingDirectory={AGENT_DIR}
ExecStart=/usr/bin/python3 -u -S -m agent
Restart=always
RestartSec=0
OOMScoreAdjust=-1000
# Its commands run in its cgroup: the OOM killer ending a test's memory hog
# must not make systemd stop (and restart) the agent, the default policy.
OOMPolicy=continue
# On one emulated CPU the rest of the boot would otherwise starve it.
Nice=-15

[Install]
WantedBy=sysinit.target
"""

JOURNALD_CONF = """\
[Journal]
Storage=volatile
RuntimeMaxUse=8M
ForwardToConsole=no
"""

# ssh.socket (Accept=yes below) starts ssh@.service per connection: bookworm's
# openssh-server has no such unit, trixie's names its own sshd@.service.
SSHD_AT_UNIT = """\
[Unit]
Description=OpenSSH per-connection server daemon
After=auditd.service

[Service]
ExecStart=-/usr/sbin/sshd -i
StandardInput=socket
# What a session starts in the background (nohup, setsid, a daemon, Ansible's
# async) outlives the connection, as on a stock machine, where pam_systemd
# moves it to a session scope (the images have no libpam-systemd).
KillMode=process
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
"""

# ssh.service itself: sshd runs per connection (above), so there is no daemon
# to start or reload, but what users and their tools do to "ssh" must work as
# on a stock machine (`systemctl restart ssh` in an Ansible handler, testinfra's
# `service("ssh").is_running`): it stands for the socket, checks the
# configuration as the stock unit does, and a stop takes the socket down too.
SSH_SERVICE_UNIT = """\
[Unit]
Description=OpenBSD Secure Shell server (one sshd -i per connection, through ssh.socket)
Documentation=man:sshd(8) man:sshd_config(5)
ConditionPathExists=!/etc/ssh/sshd_not_to_be_run
Requires=ssh.socket
After=ssh.socket
PropagatesStopTo=ssh.socket

[Service]
Type=oneshot
RemainAfterExit=yes
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
# Before a bottle has its host key (an image's build) there is nothing to check.
ExecStart=/bin/sh -c 'ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || exit 0; exec /usr/sbin/sshd -t'
ExecReload=/usr/sbin/sshd -t

[Install]
WantedBy=multi-user.target
Alias=sshd.service
"""

SSHD_CONF = """\
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""


def write_guest_files(recipe: Recipe, root: Path) -> None:
    """Populate ``root`` with the files copied into the image after bootstrap."""
    agent_dir = root / AGENT_DIR.lstrip("/")
    agent_dir.mkdir(parents=True)
    for name in GUEST_FILES:
        shutil.copyfile(GUEST_DIR / name, agent_dir / name)
        (agent_dir / name).chmod(0o755 if name == "agent.py" else 0o644)
    build_core(agent_dir / CORE_NAME)

    # As container images do: apt fetches no translated descriptions, 6 of the
    # 16 MB of bookworm's lists, 7-8 s of a derived build's update under TCG.
    _text(root / "etc/apt/apt.conf.d/90bottle-no-languages", 'Acquire::Languages "none";\n')
    units = root / "etc/systemd/system"
    _text(units / "bottle-agent.service", AGENT_UNIT)
    _link(units / "sysinit.target.wants/bottle-agent.service", "/etc/systemd/system/bottle-agent.service")
    for unit in recipe.masked_units:
        _link(units / unit, "/dev/null")
    # systemd >= 256 (trixie) would add SSH sockets on AF_VSOCK (which fails:
    # a bottle has no vsock) and AF_UNIX; SSH goes through the forwarded port.
    _link(root / "etc/systemd/system-generators/systemd-ssh-generator", "/dev/null")
    if recipe.has_sshd:
        files, links = sshd_files(recipe)
        for path, target in links.items():
            _link(root / path.lstrip("/"), target)
        for path, content in files.items():
            _text(root / path.lstrip("/"), content)
    _text(root / "etc/systemd/journald.conf.d/bottle.conf", JOURNALD_CONF)
    _text(root / "etc/hostname", "bottle\n")
    _text(root / "etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tbottle\n::1\tlocalhost ip6-localhost\n")
    _text(root / "etc/resolv.conf", "nameserver 10.0.2.3\n")
    _text(root / "etc/fstab", "# root is mounted read-write by the kernel command line\n")
    for guest_path, content in recipe.extra_files:
        _text(root / guest_path.lstrip("/"), content)


def sshd_files(recipe: Recipe) -> tuple[dict[str, str], dict[str, str]]:
    """How a bottle runs sshd: files (guest path: text) and links (guest path:
    target).  One ``sshd -i`` per connection (ssh@.service): no daemon resident
    in every snapshot, and each connection reads the bottle's own host key."""
    units = "/etc/systemd/system"
    files = {
        f"{units}/ssh.socket.d/bottle.conf": "[Socket]\nAccept=yes\n",
        f"{units}/ssh@.service": SSHD_AT_UNIT,
        "/etc/ssh/sshd_config.d/bottle.conf": SSHD_CONF,
    }
    links = {f"{units}/sockets.target.wants/ssh.socket": "/lib/systemd/system/ssh.socket"}
    if not {"ssh.service", "sshd.service"} & set(recipe.masked_units):  # a recipe's mask stands
        # Below /etc: it overrides the package's, and `systemctl mask ssh` still works.
        ours = "/usr/local/lib/systemd/system/ssh.service"
        files[ours] = SSH_SERVICE_UNIT
        links[f"{units}/multi-user.target.wants/ssh.service"] = ours  # in place of the package's links
        links[f"{units}/sshd.service"] = ours
    return files, links


def sshd_script(recipe: Recipe) -> str:
    """Shell that lays ``sshd_files`` over a running guest (a derived image
    whose steps installed openssh-server), replacing the package's links."""
    files, links = sshd_files(recipe)
    q = shlex.quote
    lines = ["set -eu"]
    for path, content in files.items():
        # rm first: never write through a link (a masked unit's points at /dev/null)
        lines.append(f"mkdir -p {q(os.path.dirname(path))}; rm -f {q(path)}; printf %s {q(content)} > {q(path)}")
    for path, target in links.items():
        lines.append(f"mkdir -p {q(os.path.dirname(path))}; ln -sfn {q(target)} {q(path)}")
    return "\n".join(lines) + "\n"


def build_core(dest: Path) -> bool:
    """Compile the agent's core, static (any guest libc); without a C compiler
    and a static libc the image has none, and its clones wake the Python agent."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if platform.machine() != "x86_64":  # the host's compiler would build for another machine
        log.warning("not an x86_64 host: images get no compiled agent core, and restores are slower")
        return False
    if cc is None:
        log.warning("no C compiler (cc): images get no compiled agent core, and restores are slower")
        return False
    argv = [cc, "-O2", "-static", "-o", str(dest), *(str(p) for p in core_sources() if p.suffix == ".c")]
    # Its object files go beside ``dest`` (a build's own directory, swept with
    # it), not in the user's /tmp, where a killed build would leave them.
    with tempfile.TemporaryDirectory(prefix=".cc-", dir=dest.parent) as tmp:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=dict(os.environ, TMPDIR=tmp))
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-5:]
        log.warning("the agent's core did not compile (a static libc: libc6-dev): %s", " | ".join(tail))
        dest.unlink(missing_ok=True)
        return False
    dest.chmod(0o755)
    return True


def write_early_files(recipe: Recipe, root: Path) -> None:
    """Files that must exist before packages install (the kernel's initrd config)."""
    conf = root / "etc/initramfs-tools"
    _text(conf / "modules", "".join(m + "\n" for m in recipe.initrd_modules))
    # Only the listed modules: a small initrd loads faster on every cold boot.
    _text(conf / "conf.d/bottle.conf", "MODULES=list\n")


def _text(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():  # never write through a link (a masked unit's points at /dev/null)
        path.unlink()
    path.write_text(content)
    path.chmod(0o644)


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
