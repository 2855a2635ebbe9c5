"""boot_twice's choices, with start_machine replaced (no QEMU): which failures
are booted again, how often, and what of the first attempt is left."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_bottle.errors import BootError, BootTimeout
from pytest_bottle.lifecycle import boot
from pytest_bottle.vmm.qemu import MachineConfig


def _cfg(tmp_path: Path) -> MachineConfig:
    return MachineConfig(tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "root.img", save_ram=tmp_path / "ram")


def _starts(monkeypatch: pytest.MonkeyPatch, *outcomes: BaseException | str) -> list[Path]:
    """start_machine that writes a console, a QEMU log and the RAM file, then raises or returns each outcome."""
    calls: list[Path] = []

    def start(cfg: MachineConfig, run_dir: Path, name: str, timeout: float) -> Any:
        calls.append(run_dir)
        for leftover in (run_dir / "console.log", run_dir / "qemu.log", cfg.save_ram):
            assert leftover is not None and not leftover.exists()  # nothing of the attempt before
            leftover.write_text(f"attempt {len(calls)}")
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome, "channel"

    monkeypatch.setattr(boot, "start_machine", start)
    return calls


@pytest.mark.parametrize(
    "first", [BootTimeout("the agent did not answer within 300 s"), BootError(boot.NO_TIMER_REASON)], ids=str
)
def test_a_boot_that_cannot_finish_is_started_once_more_from_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, first: BootError
) -> None:
    calls = _starts(monkeypatch, first, "machine")
    seen: list[str] = []
    result: Any = boot.boot_twice(_cfg(tmp_path), tmp_path, "seed", 300, lambda e: seen.append(e.reason))
    assert result == ("machine", "channel") and len(calls) == 2
    assert seen == [first.reason]


def test_on_retry_sees_the_first_console_before_it_goes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _starts(monkeypatch, BootError(boot.NO_TIMER_REASON), "machine")
    seen: list[str] = []
    boot.boot_twice(
        _cfg(tmp_path), tmp_path, "build", 300, lambda e: seen.append((tmp_path / "console.log").read_text())
    )
    assert seen == ["attempt 1"]


def test_a_second_failure_is_the_error_and_there_is_no_third_boot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _starts(monkeypatch, BootError(boot.NO_TIMER_REASON), BootTimeout("the agent did not answer within 300 s"))
    with pytest.raises(BootTimeout, match="did not answer"):
        boot.boot_twice(_cfg(tmp_path), tmp_path, "seed", 300)
    assert len(calls) == 2


def test_a_qemu_that_exited_is_not_booted_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _starts(monkeypatch, BootError("QEMU exited with 1: bad kernel"))
    with pytest.raises(BootError, match="bad kernel"):
        boot.boot_twice(_cfg(tmp_path), tmp_path, "seed", 300)
    assert len(calls) == 1
