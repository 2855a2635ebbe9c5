"""Build an image with the provisioning script you already have.

``scripts/provision.sh`` (also tested on its own in ``test_root_script.py``)
creates a system user, a config file and a systemd service.  Here it builds a
derived image instead:

- ``.copy("scripts", "/opt/provision")`` copies a host directory in, modes
  kept; a relative source is resolved against this file's directory.  The
  image's key covers the bytes of the copied files: edit the script and the
  image is rebuilt on next use, otherwise it is a cache hit.
- ``.run(...)`` runs the script as root during the build, with network
  access; a non-zero exit fails the build with ``ImageBuildError`` naming the
  step and the tail of its output.
- Every test gets a fresh bottle with the service already running.
"""

from __future__ import annotations

import pytest

from pytest_bottle import Bottle, Image

GREETER = Image("debian-bookworm").copy("scripts", "/opt/provision").run("/opt/provision/provision.sh 8080")

pytestmark = pytest.mark.bottle(image=GREETER)

FETCH = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/').read().decode(), end='')"


def test_the_service_it_set_up_is_running(bottle: Bottle) -> None:
    assert bottle.check_output(["systemctl", "is-active", "greeter"]).strip() == "active"
    bottle.wait_for_port(8080, timeout=30)
    assert bottle.check_output(["python3", "-c", FETCH]) == "hello from greeter\n"


def test_user_and_config_are_in_place(bottle: Bottle) -> None:
    assert bottle.check_output(["getent", "passwd", "greeter"]).split(":")[6].strip() == "/usr/sbin/nologin"
    assert bottle.check_output(["stat", "-c", "%a %U %G", "/etc/greeter/greeter.conf"]).strip() == "640 root greeter"


def test_the_image_is_already_provisioned(bottle: Bottle) -> None:
    """Running the script again in a bottle of the image changes nothing."""
    out = bottle.check_output(["/opt/provision/provision.sh", "8080"], timeout=120)
    assert "changed:" not in out
