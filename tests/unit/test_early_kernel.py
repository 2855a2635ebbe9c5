"""A cold boot's console read for the kernel's words that it cannot finish booting."""

from __future__ import annotations

import time
from pathlib import Path

from pytest_bottle.lifecycle.boot import EARLY, NO_TIMER, EarlyKernel


def _look(kernel: EarlyKernel) -> bool:
    kernel.next = 0.0  # it looks at most every 0.25 s; here, at every call
    return kernel.doomed()


def test_the_kernel_line_dooms_a_boot_as_soon_as_it_is_written(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    kernel = EarlyKernel(console)
    assert not _look(kernel)  # no console yet
    console.write_bytes(b"[    0.000000] Linux version 6.1\n" * 100)
    assert not _look(kernel)
    with open(console, "ab") as f:
        f.write(b"[    0.458883] " + NO_TIMER + b"\n")
    assert _look(kernel)


def test_it_looks_only_at_the_first_bytes_and_then_stops(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"x" * EARLY + NO_TIMER)  # a guest printing it later is not the kernel's calibration
    kernel = EarlyKernel(console)
    assert not _look(kernel) and kernel.done
    console.write_bytes(NO_TIMER)  # nothing is read again once past the early lines
    assert not _look(kernel)


def test_it_reads_the_file_at_most_four_times_a_second(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    kernel = EarlyKernel(console)
    assert not kernel.doomed()
    console.write_bytes(NO_TIMER)
    kernel.next = time.monotonic() + 3600  # as if the last look was a moment ago
    assert not kernel.doomed()
    kernel.next = time.monotonic() - 0.001
    assert kernel.doomed()
