"""Shared helpers for the integration tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pytest_bottle.paths import default_cache_dir


@pytest.fixture
def private_cache(tmp_path: Path) -> Path:
    """A cache dir of its own (seeds, keys, run dirs) that shares the built images.

    Images are expensive (about 40 s) and read-only once built, so they are
    linked in; everything a test may corrupt or rebuild is private.
    """
    main = default_cache_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (main / "images").mkdir(parents=True, exist_ok=True)
    os.symlink(main / "images", cache / "images")
    for name in ("accel.json",):
        if (main / name).exists():
            shutil.copy(main / name, cache / name)
    return cache
