"""Install a Debian package that runs a daemon, start it, and talk to it.

What this shows:

- ``network="nat"`` lets the guest reach out (here: Debian's archive through
  QEMU user-mode NAT; the image's apt sources are the host's).  The default,
  ``network="none"``, has no egress at all.
- ``forward=[80]`` publishes guest TCP port 80 on the host;
  ``bottle.address(80)`` says where (a leased loopback address, same port).
- ``module_bottle`` shares one VM between the tests of this module, so the
  slow part (apt under software emulation can take a minute) is paid once.
  The module's ``pytestmark`` configures it.
- Generous ``timeout=`` on slow commands: a command still running after its
  timeout is killed and ``ExecTimeout`` is raised, instead of hanging the run.
"""

from __future__ import annotations

import urllib.request

import pytest

from pytest_bottle import Bottle

pytestmark = pytest.mark.bottle(network="nat", forward=[80])

PACKAGE = "nginx-light"
SERVICE = "nginx"
MARKER = "served from inside a bottle\n"


@pytest.fixture(scope="module")
def web(module_bottle: Bottle) -> Bottle:
    """The shared VM with nginx installed, started and serving MARKER."""
    b = module_bottle
    b.check_output("apt-get update", timeout=600)
    b.check_output(
        ["apt-get", "install", "-y", "--no-install-recommends", PACKAGE],
        env={"DEBIAN_FRONTEND": "noninteractive"},
        timeout=600,
    )
    # Start it explicitly rather than relying on the package's maintainer
    # scripts: chroot-built images often carry a policy-rc.d that forbids it.
    b.check_output(["systemctl", "enable", "--now", SERVICE], timeout=120)
    b.write_text("/var/www/html/index.html", MARKER, mode=0o644)
    b.wait_for_port(80, timeout=60)
    return b


def test_package_is_installed(web: Bottle) -> None:
    status = web.check_output(["dpkg-query", "-W", "-f", "${Status}", PACKAGE])
    assert status == "install ok installed"
    # nginx prints its version on stderr.
    assert web.exec(["nginx", "-v"]).stderr.startswith("nginx version: nginx/")


def test_service_is_active_and_enabled(web: Bottle) -> None:
    assert web.exec(["systemctl", "is-active", SERVICE]).stdout.strip() == "active"
    assert web.exec(["systemctl", "is-enabled", SERVICE]).stdout.strip() == "enabled"
    # The configuration the package shipped is valid.
    r = web.exec(["nginx", "-t"])
    assert r.ok, r.stderr


def test_service_answers_inside_the_guest(web: Bottle) -> None:
    script = (
        "import urllib.request\n"
        "r = urllib.request.urlopen('http://127.0.0.1/', timeout=30)\n"
        "print(r.status)\n"
        "print(r.read().decode(), end='')\n"
    )
    out = web.check_output(["python3", "-c", script], timeout=60)
    status, body = out.split("\n", 1)
    assert status == "200"
    assert body == MARKER


def test_service_answers_from_the_host(web: Bottle) -> None:
    host, port = web.address(80)
    assert host.startswith("127.")  # forwards bind loopback only
    with urllib.request.urlopen(f"http://{host}:{port}/", timeout=30) as r:
        assert r.status == 200
        assert r.headers["Server"].startswith("nginx")
        assert r.read().decode() == MARKER


def test_stopped_service_stops_answering(web: Bottle) -> None:
    """Runs last in this module: it leaves the service stopped, then starts it again."""
    web.check_output(["systemctl", "stop", SERVICE], timeout=60)
    try:
        assert web.exec(["systemctl", "is-active", SERVICE]).stdout.strip() == "inactive"
        r = web.exec(["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1/', timeout=5)"])
        assert not r.ok
        assert "Connection refused" in r.stderr
    finally:
        web.check_output(["systemctl", "start", SERVICE], timeout=60)
    web.wait_for_port(80, timeout=60)
