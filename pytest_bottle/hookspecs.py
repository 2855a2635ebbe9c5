"""Hooks pytest-bottle adds to pytest (``pluginmanager.add_hookspecs``)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from .images.image import Image


@pytest.hookspec
def pytest_bottle_images() -> Iterable[Image]:  # type: ignore[empty-body]
    """Return derived images to register, each named with ``Image.named``.

    Called once at configure time, before ``--bottle-image`` and the ini
    setting are looked up: a plugin or a root ``conftest.py`` provides images
    this way without registering them as a side effect of being imported::

        def pytest_bottle_images():
            return [Image("debian-bookworm").install("nginx-light").named("web")]
    """
