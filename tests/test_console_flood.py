"""A guest that floods its serial console (or QEMU with events) fills neither the host's disk nor
its memory: the log is cut on disk while the VM runs, and read as a tail."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_bottle import Bottle
from pytest_bottle.vmm import console


def test_a_flooded_console_stays_bounded_on_disk_and_in_memory(
    bottle_factory: Callable[..., Bottle], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "DISK_CAP", 2 << 20)
    monkeypatch.setattr(console, "KEEP", 1 << 20)
    monkeypatch.setattr(console, "CHECK_EVERY", 0.2)
    monkeypatch.setattr(console, "READ_CAP", 512 << 10)
    b = bottle_factory()
    # 6 MB through the 16550 (~0.5 MB/s under TCG), then a last line to find.
    b.exec("head -c 6000000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo; echo FLOOD-END > /dev/ttyS0", timeout=600)
    path = b.console_log_path
    assert path.stat().st_blocks * 512 < 4 << 20, "the log was not cut on disk"
    text = b.console_log
    assert "FLOOD-END" in text.splitlines()[-1]
    assert text.startswith("[pytest-bottle: ") and "earlier bytes of console output not kept]" in text
    note, _, kept = text.partition("\n")
    told = int(note.split()[1]) + len(kept)  # not kept + kept: all the console ever held
    assert 6_000_000 < told < 6_000_000 + (1 << 20), told  # the flood and a boot log, each counted once
    assert len(text) < 600 << 10
    b.close()
    assert "FLOOD-END" in b.console_log and len(b.console_log) < 600 << 10  # kept at close: the tail only


def test_qmp_events_are_not_kept(bottle_factory: Callable[..., Bottle]) -> None:
    """A guest can make QEMU send events (RTC_CHANGE...); nothing reads them, so none piles up."""
    b = bottle_factory()
    qmp = b._machine.qmp  # type: ignore[attr-defined]
    for _ in range(3):
        qmp.cmd("stop")  # STOP and RESUME events, as a guest's RTC writes would send theirs
        qmp.cmd("cont")
    assert b.exec("true").ok
    assert qmp._client.events.history == () and qmp._client.events.empty()
