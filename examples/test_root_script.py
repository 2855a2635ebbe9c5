"""Test a provisioning script that needs root and changes the system.

``scripts/provision.sh`` creates a system user, writes a config file with a
given owner and mode, installs a systemd unit, enables and starts it.  Running
that on a developer's machine or a CI runner would be reckless; in a bottle it
is an ordinary test:

- ``bottle.put`` copies the script in (modes kept, so it stays executable);
- commands run as root by default; ``user=`` runs one as someone else;
- assertions read the real system: ``getent``, ``stat``, ``systemctl``,
  ``/proc``, and the service's own answer;
- the script is run twice to show it is idempotent, and a third time with a
  new argument to show it reconfigures (and restarts) the service;
- every test gets a fresh VM (the ``bottle`` fixture is function-scoped): what
  one test changed is gone in the next.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_bottle import Bottle

SCRIPTS = Path(__file__).parent / "scripts"
PROVISION = "/opt/provision/provision.sh"


def provision(bottle: Bottle, *args: str, **kw: object) -> str:
    """Copy the scripts in (if needed), run provision.sh, return its stdout."""
    if not bottle.exec(["test", "-x", PROVISION]).ok:
        bottle.put(SCRIPTS, "/opt/provision")
    return bottle.check_output([PROVISION, *args], timeout=120, **kw)


def changes(output: str) -> list[str]:
    return [line.removeprefix("changed: ") for line in output.splitlines() if line.startswith("changed: ")]


def main_pid(bottle: Bottle, unit: str) -> int:
    return int(bottle.check_output(["systemctl", "show", "--value", "-p", "MainPID", unit]))


def fetch(bottle: Bottle, port: int) -> str:
    """GET http://127.0.0.1:port/ from inside the guest."""
    script = (
        "import urllib.request\n"
        f"print(urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=10).read().decode(), end='')\n"
    )
    return bottle.check_output(["python3", "-c", script], timeout=60)


def test_provision_sets_up_user_config_and_service(bottle: Bottle) -> None:
    out = provision(bottle)
    assert changes(out) == [
        "user greeter",
        "/etc/greeter",
        "/var/lib/greeter",
        "/etc/greeter/greeter.conf",
        "/var/lib/greeter/index.html",
        "/etc/systemd/system/greeter.service",
        "enabled greeter",
        "started greeter",
    ]

    # A system user (uid below 1000) that cannot log in.
    _, _, uid, _, _, home, shell = bottle.check_output(["getent", "passwd", "greeter"]).strip().split(":")
    assert int(uid) < 1000
    assert (home, shell) == ("/var/lib/greeter", "/usr/sbin/nologin")
    assert bottle.check_output(["id", "-gn", "greeter"]).strip() == "greeter"

    # Owners and modes, read back from the guest's filesystem.
    def owner_mode(path: str) -> str:
        return bottle.check_output(["stat", "-c", "%U:%G %a", path]).strip()

    assert owner_mode("/etc/greeter") == "root:greeter 750"
    assert owner_mode("/etc/greeter/greeter.conf") == "root:greeter 640"
    assert owner_mode("/etc/systemd/system/greeter.service") == "root:root 644"
    assert bottle.read_text("/etc/greeter/greeter.conf") == "PORT=8080\n"

    # The service's user may read its config, other users may not.
    assert bottle.exec(["cat", "/etc/greeter/greeter.conf"], user="greeter").ok
    # (cwd="/": nobody's home directory, /nonexistent, does not exist.)
    denied = bottle.exec(["cat", "/etc/greeter/greeter.conf"], user="nobody", cwd="/")
    assert not denied.ok and "Permission denied" in denied.stderr

    # Enabled, running as its own user, and answering.
    assert bottle.exec(["systemctl", "is-enabled", "greeter"]).stdout.strip() == "enabled"
    assert bottle.exec(["systemctl", "is-active", "greeter"]).stdout.strip() == "active"
    pid = main_pid(bottle, "greeter")
    assert pid > 0
    assert bottle.check_output(["stat", "-c", "%u", f"/proc/{pid}"]).strip() == uid
    bottle.wait_for_port(8080, timeout=60)
    assert fetch(bottle, 8080) == "hello from greeter\n"


def test_provision_is_idempotent(bottle: Bottle) -> None:
    first = provision(bottle)
    assert "started greeter" in changes(first)
    bottle.wait_for_port(8080, timeout=60)
    pid = main_pid(bottle, "greeter")
    conf_before = bottle.check_output(["stat", "-c", "%i %Y", "/etc/greeter/greeter.conf"])

    second = provision(bottle)

    assert changes(second) == []
    assert main_pid(bottle, "greeter") == pid  # not restarted
    assert bottle.check_output(["stat", "-c", "%i %Y", "/etc/greeter/greeter.conf"]) == conf_before  # not rewritten
    passwd = bottle.read_text("/etc/passwd")
    assert sum(line.startswith("greeter:") for line in passwd.splitlines()) == 1
    assert fetch(bottle, 8080) == "hello from greeter\n"


def test_provision_reconfigures_and_restarts(bottle: Bottle) -> None:
    provision(bottle, "8080")
    bottle.wait_for_port(8080, timeout=60)
    pid = main_pid(bottle, "greeter")

    out = provision(bottle, "9090")

    assert changes(out) == ["/etc/greeter/greeter.conf", "restarted greeter"]
    assert bottle.read_text("/etc/greeter/greeter.conf") == "PORT=9090\n"
    assert main_pid(bottle, "greeter") != pid
    bottle.wait_for_port(9090, timeout=60)
    assert fetch(bottle, 9090) == "hello from greeter\n"
    assert not bottle.exec(["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 8080), 5)"]).ok


def test_provision_refuses_to_run_unprivileged(bottle: Bottle) -> None:
    bottle.put(SCRIPTS, "/opt/provision")
    r = bottle.exec([PROVISION], user="nobody", cwd="/")
    assert r.returncode == 1
    assert "must run as root" in r.stderr
    assert not bottle.exec(["getent", "passwd", "greeter"]).ok  # it changed nothing


@pytest.mark.parametrize("round", [1, 2])
def test_each_test_gets_a_fresh_vm(bottle: Bottle, round: int) -> None:
    """Both rounds start from the pristine image: nothing leaks from round 1,
    nor from the tests above that provisioned the service."""
    assert not bottle.exec(["test", "-e", "/root/written-by-a-test"]).ok
    assert not bottle.exec(["getent", "passwd", "greeter"]).ok
    assert not bottle.exec(["test", "-e", "/etc/systemd/system/greeter.service"]).ok

    bottle.write_text("/root/written-by-a-test", f"round {round}\n")
    assert bottle.read_text("/root/written-by-a-test") == f"round {round}\n"
