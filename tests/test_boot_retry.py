"""A build's or a seed's cold boot whose agent never answers is booted once
more (lifecycle.boot.boot_twice): real QEMU, the first one stopped with SIGSTOP
so that it hangs as a guest with no timer tick does."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

import pytest_bottle
from pytest_bottle import Image
from pytest_bottle.images import ensure_image
from pytest_bottle.images.derived import entry_dir
from pytest_bottle.lifecycle import boot
from pytest_bottle.store.saved import list_seeds
from pytest_bottle.vmm.backend import Machine

HUNG_WAIT = 3.0  # how long the stopped first boot is waited for (the real wait is minutes)


def _first_boot_hangs(monkeypatch: pytest.MonkeyPatch, under: Path) -> list[int]:
    """The first cold boot ``boot_twice`` starts below ``under`` gets a stopped
    QEMU and a short wait; the pids of those QEMUs are returned."""
    hung: list[int] = []
    real = boot.start_machine

    def start(cfg: Any, run_dir: Path, name: str, timeout: float, *args: Any, **kwargs: Any) -> Any:
        if hung or not run_dir.resolve().is_relative_to(under.resolve()):
            return real(cfg, run_dir, name, timeout, *args, **kwargs)

        def stop(machine: Machine) -> None:
            hung.append(machine.pid)
            os.kill(machine.pid, signal.SIGSTOP)

        return real(cfg, run_dir, name, HUNG_WAIT, *args, **{**kwargs, "on_spawn": stop})

    monkeypatch.setattr(boot, "start_machine", start)
    return hung


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_build_whose_boot_hangs_boots_again_and_says_so(
    warm_cache: Path, monkeypatch: pytest.MonkeyPatch, no_spare_starting: None
) -> None:
    mark = uuid.uuid4().hex
    image = Image("debian-bookworm").write("/etc/retried", mark)
    hung = _first_boot_hangs(monkeypatch, warm_cache)
    ensure_image(image, warm_cache)
    assert len(hung) == 1 and _gone(hung[0])
    log = (entry_dir(warm_cache, image) / "build.log").read_text()
    # The stopped QEMU printed nothing: the reason says so, and no console section follows.
    assert (
        f"the build machine: the agent did not answer within {HUNG_WAIT:g} s (the console printed nothing in that "
        "time); booting it once more\n"
    ) in log
    with pytest_bottle.launch(image=image) as b:
        assert b.read_text("/etc/retried") == mark


def test_a_seed_whose_boot_hangs_boots_again_with_a_clean_console(
    private_cache: Path, monkeypatch: pytest.MonkeyPatch, no_spare_starting: None
) -> None:
    hung = _first_boot_hangs(monkeypatch, private_cache)
    with pytest_bottle.launch(cache_dir=private_cache) as b:
        assert b.check_output(["cat", "/proc/sys/kernel/hostname"]).strip() == b.name
    assert len(hung) == 1 and _gone(hung[0])
    (seed,) = list_seeds(private_cache)
    console = (seed.path / "console.log").read_text(errors="replace")
    # The seed's console begins every clone's: only the boot that made it.
    assert "booting it again" not in console
    assert console.count("Linux version") == 1
    ram = seed.path / "memory.ram"
    assert ram.stat().st_size > 0
