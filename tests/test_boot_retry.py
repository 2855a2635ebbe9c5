"""Cold boots that can never finish are booted once more: a build's or a
seed's whose agent never answers (lifecycle.boot.boot_twice), and any whose
kernel turned its only timer off (it says so on the console).

Real QEMU: the first one is stopped with SIGSTOP once its kernel has begun,
so that it hangs as a guest with no timer tick does; where the kernel's own
words are the point, they are appended to that first console as the guest
would have printed them (a real guest prints them only when QEMU stalls in a
window of a few ms: docs/concepts.md, "A boot that hangs")."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import pytest_bottle
from pytest_bottle import Image
from pytest_bottle.images import ensure_image
from pytest_bottle.images.derived import entry_dir
from pytest_bottle.lifecycle import boot, launch
from pytest_bottle.store.saved import list_seeds
from pytest_bottle.vmm.backend import Machine

HUNG_WAIT = 25.0  # how long a stopped first boot is waited for, where the test shortens it (its kernel prints in ~1 s)
NO_TIMER = b"[    0.458883] APIC frequency too slow, disabling apic timer\n"


def _first_boot_fails(
    monkeypatch: pytest.MonkeyPatch, module: ModuleType, under: Path, words: bytes = b"", wait: float | None = None
) -> list[tuple[int, float]]:
    """The first cold boot that ``module`` starts below ``under`` gets a QEMU
    stopped once its kernel prints, ``words`` appended to its console, and
    ``wait`` seconds instead of its timeout; returns [(its pid, when it started)]."""
    hung: list[tuple[int, float]] = []
    real = module.start_machine

    def start(cfg: Any, run_dir: Path, name: str, timeout: float, *args: Any, **kwargs: Any) -> Any:
        if hung or cfg.restore is not None or not run_dir.resolve().is_relative_to(under.resolve()):
            return real(cfg, run_dir, name, timeout, *args, **kwargs)
        spawned = kwargs.get("on_spawn")  # by keyword wherever start_machine is called with one

        def stop(machine: Machine) -> None:
            hung.append((machine.pid, time.time()))
            threading.Thread(target=_stop_once_booting, args=(machine, words), daemon=True).start()
            if spawned is not None:
                spawned(machine)

        kwargs["on_spawn"] = stop
        return real(cfg, run_dir, name, timeout if wait is None else wait, *args, **kwargs)

    monkeypatch.setattr(module, "start_machine", start)
    return hung


def _stop_once_booting(machine: Machine, words: bytes) -> None:
    """SIGSTOP as soon as the kernel prints (so the first console has something to lose)."""
    deadline = time.monotonic() + HUNG_WAIT - 10
    while time.monotonic() < deadline and machine.alive():
        try:
            if b"Linux version" in machine.console_log.read_bytes():
                break
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    if not machine.alive():
        return
    os.kill(machine.pid, signal.SIGSTOP)
    with open(machine.console_log, "ab") as f:
        f.write(words)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_build_whose_boot_hangs_boots_again_and_says_so(
    private_cache: Path, monkeypatch: pytest.MonkeyPatch, no_spare_starting: None
) -> None:
    # The build's boot is its parent's build seed's, made by the first build in a cache.
    mark = uuid.uuid4().hex
    image = Image("debian-bookworm").write("/etc/retried", mark)
    hung = _first_boot_fails(monkeypatch, boot, private_cache, wait=HUNG_WAIT)
    ensure_image(image, private_cache)
    ((pid, _),) = hung
    assert _gone(pid)
    log = (entry_dir(private_cache, image) / "build.log").read_text()
    note = f"the build machine: the agent did not answer within {HUNG_WAIT:g} s; booting it once more\n"
    assert note in log
    # The first boot's console follows the note (not under the header that ends what an error quotes);
    # the steps ran on the second boot.
    first, step = log.index(note), log.index("step 1/1")
    assert log.index("--- console of the boot before ---", first) < log.index("Linux version", first) < step
    assert "--- console ---" not in log
    with pytest_bottle.launch(image=image) as b:
        assert b.read_text("/etc/retried") == mark


def test_a_seed_whose_kernel_turned_its_timer_off_boots_again_at_once_with_a_clean_console(
    private_cache: Path, monkeypatch: pytest.MonkeyPatch, no_spare_starting: None, caplog: pytest.LogCaptureFixture
) -> None:
    hung = _first_boot_fails(monkeypatch, boot, private_cache, NO_TIMER)
    with caplog.at_level(logging.WARNING, "pytest_bottle.lifecycle.boot"):
        with pytest_bottle.launch(cache_dir=private_cache) as b:
            assert b.check_output(["cat", "/proc/sys/kernel/hostname"]).strip() == b.name
    ((pid, spawned),) = hung
    assert _gone(pid)
    (warning,) = [r for r in caplog.records if "booting it once more" in r.getMessage()]
    # The seed keeps no console of its first boot: the warning carries its tail.
    assert warning.getMessage().startswith(
        f"seed: booting it once more: bottle seed failed to boot: {boot.NO_TIMER_REASON}"
    )
    assert "disabling apic timer" in warning.getMessage()
    # Given up on as soon as its kernel said so (checked every 0.25 s), not after the seed's 300 s.
    assert warning.created - spawned < 30
    (seed,) = list_seeds(private_cache)
    console = (seed.path / "console.log").read_text(errors="replace")
    # The seed's console begins every clone's: only the boot that made it.
    assert console.count("Linux version") == 1 and "disabling apic timer" not in console
    assert "Reached target" in console


def test_a_cold_bottle_whose_kernel_turned_its_timer_off_boots_again_within_its_timeout(
    private_cache: Path, monkeypatch: pytest.MonkeyPatch, no_spare_starting: None, caplog: pytest.LogCaptureFixture
) -> None:
    hung = _first_boot_fails(monkeypatch, launch, private_cache, NO_TIMER)
    with caplog.at_level(logging.WARNING, "pytest_bottle.lifecycle.launch"):
        with pytest_bottle.launch(cache_dir=private_cache, boot="cold", timeout=240) as b:
            assert b.check_output(["true"]) == ""
            console = b.console_log
    ((pid, spawned),) = hung
    assert _gone(pid)
    (warning,) = [r for r in caplog.records if "booting it once more" in r.getMessage()]
    assert warning.getMessage() == f"{b.name}: booting it once more: {boot.NO_TIMER_REASON}"
    assert warning.created - spawned < 30
    assert console.count("Linux version") == 1 and "disabling apic timer" not in console
