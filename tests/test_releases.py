"""Debian 13 (trixie) images: what differs from bookworm works (issue 16).

The release-independent runtime tests (exec, files, SSH, LANs, forwards,
clones) run on both releases through the matrix in ``conftest.py``; these
are the checks of what trixie itself brings: newer systemd, kernel 6.12,
python3.13, its own OpenSSH units, its own package sources.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import pytest_bottle
from pytest_bottle import Bottle, Image
from pytest_bottle.images import ensure_image

pytestmark = pytest.mark.bottle(image="debian-trixie")


def os_release(b: Bottle) -> dict[str, str]:
    text = b.read_text("/etc/os-release")
    return {k: v.strip('"') for k, _, v in (line.partition("=") for line in text.splitlines() if "=" in line)}


def test_trixie_is_debian_13_with_its_kernel_python_and_systemd(module_bottle: Bottle) -> None:
    b = module_bottle
    assert b.image == "debian-trixie"
    release = os_release(b)
    assert (release["VERSION_ID"], release["VERSION_CODENAME"]) == ("13", "trixie")
    assert re.match(r"6\.12\.\d+", b.check_output("uname -r")), b.check_output("uname -r")
    assert b.check_output(["python3", "-c", "import sys; print(sys.version_info[:2])"]) == "(3, 13)\n"
    assert b.check_output("cat /proc/1/comm") == "systemd\n"
    assert int(b.check_output("systemctl --version | head -n1 | cut -d' ' -f2")) >= 257
    # The agent runs on the guest's python3 from its compiled bytecode.
    assert b.exec("ls /usr/lib/pytest-bottle/__pycache__ | grep -q 'agent.cpython-313.pyc'").ok
    b.wait_until_succeeds("systemctl is-system-running | grep -qx running", timeout=60)
    assert b.check_output("systemctl --failed --no-legend --plain") == ""


def test_trixie_ssh_is_one_sshd_per_connection_and_nothing_else_listens(module_bottle: Bottle) -> None:
    b = module_bottle
    r = b.ssh("echo $SSH_CONNECTION; cat /proc/$PPID/cmdline | tr '\\0' ' '")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[2] == "10.0.2.15"
    assert b.check_output("systemctl is-active ssh.socket") == "active\n"
    assert b.check_output("systemctl show -p Accept --value ssh.socket") == "yes\n"
    # ssh.service stands for the socket (active, for tools that ask), with no resident daemon
    assert b.check_output("systemctl is-active ssh.service sshd.service") == "active\nactive\n"
    assert b.check_output("systemctl show -p MainPID --value ssh.service") == "0\n"
    assert b.check_output("systemctl show -p Type --value ssh.service") == "oneshot\n"
    # systemd's ssh generator (AF_VSOCK / AF_UNIX sockets) is masked: no units, no failure at boot.
    assert b.check_output("systemctl list-units --all --no-legend 'sshd-unix-local*' 'sshd-vsock*' | wc -l") == "0\n"
    assert "systemd-ssh-generator" not in b.console_log
    # Only the bottle's own host key: no first-boot keygen made others.
    assert b.check_output("ls /etc/ssh | grep ^ssh_host_ | sort").split() == [
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
    ]


def test_the_image_uses_trixie_sources_not_the_hosts_older_suite(module_bottle: Bottle) -> None:
    sources = module_bottle.check_output("cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null || true")
    assert "trixie" in sources and "bookworm" not in sources, sources


@pytest.mark.slow
def test_a_derived_image_of_trixie_minimal_installs_trixie_packages(warm_cache: Path) -> None:
    # jq is 1.6 in bookworm and 1.7 in trixie: the version says which suite apt used.
    # On the minimal twin: its own seed is not needed, the derived image's is.
    image = Image("debian-trixie-minimal").install("jq", "openssh-server").write("/etc/app.json", '{"release": 13}\n')
    built = ensure_image(image, warm_cache)
    assert built.manifest["parent"] == "debian-trixie-minimal"
    assert built.parent is not None and not built.parent.has_sshd
    assert built.manifest["sshd"] is True and built.has_sshd
    log = (built.path / "build.log").read_text()  # the update fetched the package lists, no translations
    assert " Packages " in log and "Translation-" not in log, log[:3000]
    with pytest_bottle.launch(image=image) as b:
        assert b.check_output("jq --version").startswith("jq-1.7"), b.check_output("jq --version")
        assert b.check_output("jq .release /etc/app.json") == "13\n"
        assert os_release(b)["VERSION_CODENAME"] == "trixie"
        assert b.check_output("dpkg-query -W -f '${Version}' libc6").startswith("2.41")
        assert b.check_output("hostname").strip() == b.name
        # The step installed openssh-server: SSH as on the root images, the bottle's own host key only.
        assert b.ssh("hostname", check=True).stdout == f"{b.name}\n"
        assert b.check_output("systemctl is-active ssh.socket ssh.service") == "active\nactive\n"
        assert b.check_output("ls /etc/ssh | grep ^ssh_host_ | sort").split() == [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
        ]
