"""A Debian package that runs a daemon, installed once into an image.

What this shows:

- ``Image(...).install(...).write(...).run(...)`` describes a derived image:
  nginx-light installed and enabled, a page in place.  It is built on first
  use (a minute or two under software emulation) and cached by a key of its
  steps; later runs start bottles of it in well under a second.
- Every test gets a fresh ``bottle`` of that image with nginx already
  serving: no shared VM, no order between tests.  One test stops nginx; the
  others never see it.
- ``forward=[80]`` publishes guest TCP port 80 on the host;
  ``bottle.address(80)`` says where (a leased loopback address, same port).
  Bottles keep ``network="none"``: only the image build reached the archive.
"""

from __future__ import annotations

import urllib.request

import pytest

from pytest_bottle import Bottle, Image

PAGE = "served from inside a bottle\n"

WEB = (
    Image("debian-bookworm")
    .install("nginx-light")
    .write("/var/www/html/index.html", PAGE, mode=0o644)
    .run("systemctl enable nginx")
)

pytestmark = pytest.mark.bottle(image=WEB, forward=[80])

FETCH = (
    "import urllib.request as u\n"
    "r = u.urlopen('http://127.0.0.1/', timeout=10)\n"
    "print(r.status)\n"
    "print(r.read().decode(), end='')\n"
)


def test_package_is_installed(bottle: Bottle) -> None:
    status = bottle.check_output(["dpkg-query", "-W", "-f", "${Status}", "nginx-light"])
    assert status == "install ok installed"
    assert bottle.exec(["nginx", "-v"]).stderr.startswith("nginx version: nginx/")  # on stderr


def test_service_is_active_and_enabled(bottle: Bottle) -> None:
    assert bottle.exec(["systemctl", "is-active", "nginx"]).stdout.strip() == "active"
    assert bottle.exec(["systemctl", "is-enabled", "nginx"]).stdout.strip() == "enabled"
    r = bottle.exec(["nginx", "-t"])
    assert r.ok, r.stderr


def test_service_answers_inside_the_guest(bottle: Bottle) -> None:
    assert bottle.check_output(["python3", "-c", FETCH]) == "200\n" + PAGE


def test_service_answers_from_the_host(bottle: Bottle) -> None:
    host, port = bottle.address(80)
    assert host.startswith("127.")  # forwards bind loopback only
    with urllib.request.urlopen(f"http://{host}:{port}/", timeout=30) as r:
        assert r.status == 200
        assert r.headers["Server"].startswith("nginx")
        assert r.read().decode() == PAGE


def test_stopped_service_stops_answering(bottle: Bottle) -> None:
    """This bottle is thrown away afterwards: no need to start nginx again."""
    bottle.check_output(["systemctl", "stop", "nginx"], timeout=60)
    assert bottle.exec(["systemctl", "is-active", "nginx"]).stdout.strip() == "inactive"
    r = bottle.exec(["python3", "-c", FETCH])
    assert not r.ok
    assert "Connection refused" in r.stderr
