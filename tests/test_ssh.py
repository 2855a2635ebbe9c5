"""A bottle as a real SSH target: OpenSSH, scp, testinfra (issue: SSH access)."""

from __future__ import annotations

import contextlib
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import outcome_in_thread, run_isolated, wait_until

import pytest_bottle
from pytest_bottle import AgentError, Bottle, BottleError, ExecError, SpecError


def test_ssh_runs_through_openssh(bottle: Bottle) -> None:
    r = bottle.ssh("hostname; echo err >&2; exit 5")
    assert (r.returncode, r.stdout, r.stderr) == (5, f"{bottle.name}\n", "err\n")
    assert bottle.ssh(["printf", "%s|", "a b", "c"]).stdout == "a b|c|"
    assert bottle.ssh("cat", input="piped").stdout == "piped"
    # It really is sshd: the session has SSH_CONNECTION set.
    assert bottle.ssh("echo $SSH_CONNECTION").stdout.split()[2] == "10.0.2.15"
    # The config leaves out the post-quantum key exchange: under emulation it made a
    # new bottle's first connection 0.3-0.5 s slower (bench/releases.py).
    ssh, *rest = bottle.ssh_argv("true")
    verbose = subprocess.run([ssh, "-v", *rest], capture_output=True, text=True, timeout=60)
    assert "kex: algorithm: curve25519-sha256\n" in verbose.stderr, verbose.stderr


def test_the_ssh_service_restarts_reloads_stops_and_starts_as_on_a_stock_machine(bottle: Bottle) -> None:
    """ssh.service was masked (sshd runs per connection): an Ansible handler's
    `systemctl restart ssh` failed, and `systemctl stop ssh` left SSH up."""
    b = bottle
    assert b.check_output("systemctl is-active ssh sshd") == "active\nactive\n"  # testinfra's is_running
    # a restart from inside an SSH session: the session survives it, later ones get in
    r = b.ssh("systemctl restart ssh && systemctl reload sshd && echo survived")
    assert (r.returncode, r.stdout) == (0, "survived\n"), r
    assert b.ssh("true").returncode == 0
    b.check_output("echo 'NoSuchOption yes' > /etc/ssh/sshd_config.d/broken.conf")
    assert not b.exec("systemctl reload ssh").ok  # the configuration is checked, as the stock unit does
    assert not b.exec("systemctl restart ssh").ok
    b.check_output("rm /etc/ssh/sshd_config.d/broken.conf")
    b.check_output("systemctl start ssh")
    assert b.check_output("systemctl is-active ssh ssh.socket") == "active\nactive\n"
    assert b.ssh("true").returncode == 0
    b.check_output("systemctl stop ssh")
    assert b.check_output("systemctl is-active ssh.socket; true") == "inactive\n"
    assert b.ssh("true").returncode == 255  # down, as a stopped sshd is
    b.check_output("systemctl start ssh")
    assert b.ssh("echo back").stdout == "back\n"
    b.check_output("systemctl mask ssh")  # as on a stock machine (a hardening role does it)
    assert b.check_output("systemctl is-enabled ssh; true") == "masked\n"


def test_ssh_output_is_capped_and_a_timeout_keeps_what_came(bottle: Bottle, monkeypatch: pytest.MonkeyPatch) -> None:
    """What comes back is the guest sshd's to choose: kept up to the cap, as exec's is."""
    monkeypatch.setattr(pytest_bottle.ssh, "OUTPUT_CAP", 1 << 20)
    r = bottle.ssh("head -c 3000000 /dev/zero | tr '\\0' x; echo done >&2")
    assert r.ok and r.stdout.startswith("x" * (1 << 20) + "\n[pytest-bottle: output truncated: 1951424 bytes")
    assert r.stderr == "done\n"
    with pytest.raises(pytest_bottle.ExecTimeout) as info:
        bottle.ssh("echo started; sleep 60", timeout=15)  # a new connection and sshd each call: seconds under TCG
    assert info.value.stdout == "started\n"
    with pytest.raises(pytest_bottle.SpecError, match="input must be a str or bytes"):
        bottle.ssh("cat", input=3)


# "1" was a TypeError from subprocess once ssh had started, nan and inf no
# deadline, True one second, 0 and -1 an ExecTimeout: exec refuses them all.
BAD_TIMEOUTS: tuple[object, ...] = ("1", float("nan"), float("inf"), 0, 0.0, -1, True)


def test_ssh_refuses_what_exec_refuses_before_the_client_starts(bottle: Bottle) -> None:
    started = time.monotonic()
    for bad in BAD_TIMEOUTS:
        for run in (bottle.exec, bottle.ssh):
            with pytest.raises(SpecError, match="timeout must be a positive, finite number of seconds"):
                run("touch /tmp/ran", timeout=bad)  # type: ignore[arg-type]
    for env in ({"N": 1}, {"HOME": None}, {"A=B": "x"}, {"": "x"}, {"K": "a\0b"}):
        with pytest.raises(SpecError, match="env"):
            bottle.ssh("touch /tmp/ran", env=env)
    for data in (3, ["x"]):
        with pytest.raises(SpecError, match="input must be a str or bytes"):
            bottle.ssh("touch /tmp/ran", input=data)
    with pytest.raises(TypeError, match=r"ssh\(\) does not take on_output"):  # exec's alone
        bottle.ssh("touch /tmp/ran", on_output=print)
    for run in (bottle.exec, bottle.ssh):
        with pytest.raises(SpecError, match="cwd must be absolute"):
            run("touch /tmp/ran", cwd="tmp")
    for user in (True, -1, "", "a\0b", 1.5):
        with pytest.raises(SpecError, match="user must be a user name or a uid"):
            bottle.ssh("touch /tmp/ran", user=user)
    assert time.monotonic() - started < 5  # at once: no ssh client ran
    assert bottle.ssh("test -e /tmp/ran; echo $?", timeout=None).stdout == "1\n"  # None: no deadline


def test_ssh_takes_cwd_and_user_as_exec_does(bottle: Bottle) -> None:
    show = "id -un; id -G; pwd; echo $HOME"
    for kw in ({"user": "nobody"}, {"user": 65534, "cwd": "/tmp"}, {"user": "0"}, {"cwd": "/etc"}, {}):
        assert bottle.ssh(show, **kw).stdout == bottle.exec(show, **kw).stdout, kw
    assert bottle.ssh("cat; echo $K", input="in ", user="nobody", env={"K": "v w"}).stdout == "in v w\n"
    # missing; not the user's to enter; a file; missing below one the user may not enter (root's view, as exec)
    for cwd in ("/nonexistent", "/root", "/etc/hostname", "/root/nonexistent"):
        ssh, exec_ = bottle.ssh("true", cwd=cwd, user="nobody"), bottle.exec("true", cwd=cwd, user="nobody")
        assert (ssh.returncode, exec_.returncode) == (2, 2)
        assert ssh.stderr == exec_.stderr and ssh.stderr.startswith(f"cannot change directory to {cwd}: "), ssh
    for user in ("nobody-here", 54321, "54321"):
        with pytest.raises(SpecError, match=f"no such user in the guest: {user!r}"):
            bottle.exec("true", user=user)
        with pytest.raises(SpecError, match=f"no such user in the guest: {user!r}"):
            bottle.ssh("true", user=user, check=True)


def test_ssh_of_nothing_runs_nothing_and_ssh_argv_takes_only_text(bottle: Bottle, tmp_path: Path) -> None:
    """ssh("") opened a login shell (its MOTD came back); exec("") runs nothing.
    ssh_argv(1) handed the int on, for subprocess to fail on far from here."""
    assert (bottle.ssh("").returncode, bottle.ssh("").stdout) == (0, "") == (0, bottle.exec("").stdout)
    assert bottle.ssh_argv("ls", tmp_path)[-2:] == ["ls", str(tmp_path)]
    with pytest.raises(TypeError, match="ssh_argv\\(\\) arguments are str or path-like, not int"):
        bottle.ssh_argv("sleep", 1)  # type: ignore[arg-type]


def test_a_bottle_closed_by_another_thread_during_ssh_exec_or_a_wait_says_so(
    bottle_factory: Callable[..., Bottle],
) -> None:
    """ssh() gave exit 255 with whatever ssh saw ("Connection to ... closed by
    remote host", "Connection refused" or nothing); exec and wait_for_port named
    the bottle twice, or said "agent channel of NAME is closed: ..."."""
    b = bottle_factory()
    b.ssh("true")  # sshd is up: what follows is the close, not a slow start
    outcome: dict[str, object] = {}

    def run(what: str, call: Callable[[], object]) -> None:
        try:
            outcome[what] = call()
        except (AgentError, ExecError) as e:
            outcome[what] = e

    calls: dict[str, Callable[[], object]] = {
        "ssh": lambda: b.ssh("sleep 60"),
        "ssh check": lambda: b.ssh("sleep 60", check=True),
        "exec": lambda: b.exec("sleep 60"),
        "wait_for_port": lambda: b.wait_for_port(9, timeout=60),
    }
    waiters = [threading.Thread(target=run, args=item) for item in calls.items()]
    for t in waiters:
        t.start()
    wait_until(lambda: b.exec("pgrep -c -x sleep").stdout.strip() == "3", 30, "the commands run")
    b.close()
    for t in waiters:
        t.join(30)
    assert sorted(outcome) == sorted(calls) and all(type(o) is AgentError for o in outcome.values()), outcome
    said = {what: str(e) for what, e in outcome.items()}
    assert said["ssh"] == said["ssh check"] == f"bottle {b.name} was closed during ssh", said
    assert said["exec"] == f"bottle {b.name} was closed during exec", said
    assert said["wait_for_port"].startswith(f"bottle {b.name} was closed"), said


def test_ssh_on_a_vm_that_died_raises_agent_error_as_exec_does(bottle: Bottle) -> None:
    """A guest that powered off: ssh() gave exit 255 ("Connection refused", or
    "closed by remote host" for one under way) where exec raises AgentError."""
    b = bottle
    b.ssh("true")
    waiter, outcome = outcome_in_thread(lambda: b.ssh("sleep 60", timeout=120), AgentError)
    wait_until(lambda: b.exec("pgrep -c -x sleep").stdout.strip() == "1", 30, "the ssh command runs")
    with contextlib.suppress(AgentError):  # at once: the VM may be gone before exec's answer
        b.exec("poweroff -f")
    waiter.join(90)
    assert len(outcome) == 1 and type(outcome[0]) is AgentError, outcome
    assert str(outcome[0]).startswith(f"bottle {b.name}: ") and str(outcome[0]).endswith(" during ssh"), outcome
    assert "powered off" in str(outcome[0]), outcome
    with pytest.raises(AgentError, match="powered off.* during ssh$"):
        b.ssh("true")
    with pytest.raises(AgentError, match="powered off"):
        b.exec("true")


def test_ssh_config_pins_the_bottles_own_host_key(bottle: Bottle) -> None:
    text = bottle.ssh_config.read_text()
    host, port = bottle.address(22)
    assert f"Host {bottle.name}\n" in text and f"HostName {host}\n" in text and f"Port {port}\n" in text
    assert "StrictHostKeyChecking yes" in text and "StrictHostKeyChecking no" not in text
    identity = Path(next(line.split()[1] for line in text.splitlines() if line.strip().startswith("IdentityFile")))
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    known = Path(next(line.split()[1] for line in text.splitlines() if "UserKnownHostsFile" in line)).read_text()
    guest_key = bottle.read_text("/etc/ssh/ssh_host_ed25519_key.pub").split()[1]
    assert known.split()[0] == bottle.name and known.split()[2] == guest_key


def test_openssh_and_scp_with_the_config_file(bottle: Bottle, tmp_path: Path) -> None:
    cfg = str(bottle.ssh_config)
    r = subprocess.run(["ssh", "-F", cfg, bottle.name, "id -un"], capture_output=True, text=True, timeout=60)
    assert r.stdout == "root\n", r.stderr
    src = tmp_path / "payload.txt"
    src.write_text("over scp\n")
    subprocess.run(["scp", "-q", "-F", cfg, str(src), f"{bottle.name}:/tmp/payload.txt"], check=True, timeout=60)
    assert bottle.read_text("/tmp/payload.txt") == "over scp\n"
    subprocess.run(
        ["scp", "-q", "-F", cfg, f"{bottle.name}:/etc/hostname", str(tmp_path / "h")], check=True, timeout=60
    )
    assert (tmp_path / "h").read_text() == f"{bottle.name}\n"
    assert subprocess.run(bottle.ssh_argv("true"), timeout=60).returncode == 0


def test_testinfra_checks_package_file_service(bottle: Bottle) -> None:
    testinfra = pytest.importorskip("testinfra")
    bottle.write_text("/etc/motd.d/app", "managed\n", mode=0o640)
    host = testinfra.get_host(f"ssh://{bottle.name}", ssh_config=str(bottle.ssh_config))
    assert host.package("openssh-server").is_installed
    assert host.package("no-such-package").is_installed is False
    f = host.file("/etc/motd.d/app")
    assert f.content_string == "managed\n" and f.mode == 0o640 and f.user == "root"
    assert host.service("ssh.socket").is_running and host.service("ssh.socket").is_enabled
    assert host.check_output("hostname") == bottle.name


NO_CLIENT = """
import os
import pytest_bottle
from pytest_bottle import HostDependencyError
with pytest_bottle.launch() as b:
    os.environ["PATH"] = "/nonexistent"  # after the start: ssh-keygen made the keys
    for use in (lambda: b.ssh("true"), lambda: b.ssh_argv("true")):
        try:
            use()
        except HostDependencyError as e:
            assert "openssh-client" in str(e), e
        else:
            raise AssertionError("ssh without a client did not fail")
    assert b.check_output("echo up") == "up\\n"
print("ok")
"""


def test_ssh_is_refused_without_an_ssh_client(warm_cache: Path) -> None:
    # PATH is process-wide: emptied only in a process where no pre-start thread runs.
    assert run_isolated(NO_CLIENT).stdout == "ok\n"


@pytest.mark.slow
def test_ssh_on_an_image_without_sshd_names_the_image() -> None:
    with pytest_bottle.launch(image="debian-bookworm-minimal") as b:
        assert b.check_output("echo up") == "up\n"
        # The full image without its SSH server: procps came with openssh-server only.
        assert b.check_output(["ps", "-p", "1", "-o", "comm="]) == "systemd\n"
        assert b.exec(["pgrep", "-x", "systemd-journal"]).ok and b.exec(["free", "-m"]).ok
        assert b.exec(["test", "-e", "/usr/sbin/sshd"]).returncode == 1
        for use in (lambda: b.ssh("true"), lambda: b.ssh_argv(), lambda: b.ssh_config):
            with pytest.raises(BottleError, match="debian-bookworm-minimal.*no SSH server"):
                use()
        with pytest.raises(BottleError, match="not forwarded"):
            b.address(22)


def test_what_a_command_leaves_running_over_ssh_outlives_the_connection(bottle: Bottle) -> None:
    """Each connection is a unit of its own (ssh.socket, Accept=yes): when it
    ended, systemd killed what the session had started in the background."""
    bottle.ssh("setsid sleep 600 </dev/null >/dev/null 2>&1 &", check=True)
    bottle.ssh("nohup sleep 601 >/dev/null 2>&1 &", check=True)
    bottle.wait_until_succeeds(  # the connections' units have stopped
        "test -z \"$(systemctl list-units --no-legend --state=active,activating,deactivating 'ssh@*')\"", timeout=30
    )
    running = bottle.exec("pgrep -ax sleep").stdout
    assert "sleep 600" in running and "sleep 601" in running, running
