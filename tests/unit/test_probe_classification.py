"""Which failed KVM probes are definite (cached) and which prove nothing (pure)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest

from pytest_bottle.vmm import accel

PANIC = "[    1.2] VFS: Unable to mount root fs on unknown-block(0,0)\n[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs\n"
KVM_REFUSED = "qemu-system-x86_64: failed to initialize kvm: Permission denied\n"
KVM_ASSERT = "qemu-system-x86_64: ../accel/kvm/kvm-all.c:1234: kvm_foo: Assertion `r == 0' failed.\n"
HOST_SIDE = "qemu-system-x86_64: cannot set up guest memory 'ram': Cannot allocate memory\n"


@pytest.mark.parametrize(
    ("returncode", "qemu_log", "console", "definite"),
    [
        (1, KVM_REFUSED, "", True),  # QEMU's own exit, naming KVM
        (-signal.SIGABRT, KVM_ASSERT, "", True),  # QEMU's own abort()
        (-signal.SIGABRT, "qemu-system-x86_64: error: failed to set MSR 0x38d to 0x0\n", "", True),
        (0, "", PANIC, True),  # the guest panicked (panic=-1, -no-reboot: QEMU exits 0)
        (-signal.SIGKILL, "", PANIC, True),  # the panic is on the console, whoever killed QEMU later
        (1, HOST_SIDE, "", False),  # a host-side fault in QEMU's words, not about KVM
        (1, "qemu: could not open kernel file 'x': No such file or directory\n", "", False),
        (-signal.SIGKILL, KVM_REFUSED, "", False),  # the OOM killer: whatever the log says
        (-signal.SIGTERM, "", "", False),
        (-signal.SIGABRT, "", "", False),  # an abort with no word about KVM
        (None, KVM_REFUSED, "", False),  # QEMU had not exited (the agent channel broke)
    ],
)
def test_exited_is_definite_only_in_qemus_or_the_guests_own_words(
    returncode: int | None, qemu_log: str, console: str, definite: bool
) -> None:
    r = accel.exited("QEMU exited", returncode, qemu_log, console)
    assert (r.ok, r.definite) == (False, definite)
    assert r.reason.startswith("inconclusive: ") is not definite
    assert "QEMU exited" in r.reason


def test_the_reasons_say_why() -> None:
    assert "SIGKILL" in accel.exited("x", -9, "", "").reason
    assert "signal 99" in accel.exited("x", -99, "", "").reason
    panicked = accel.exited("QEMU exited with 0", 0, "", PANIC).reason
    assert "Kernel panic - not syncing: VFS: Unable to mount root fs" in panicked
    assert "\n" not in panicked


def test_inconclusive_names_the_fault() -> None:
    r = accel.inconclusive("cannot create the disk overlay: No space left on device", "a host-side fault")
    assert (r.ok, r.definite) == (False, False)
    assert r.reason == "inconclusive: cannot create the disk overlay: No space left on device (a host-side fault)"


def test_falling_back_to_tcg_is_a_warning_once_then_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Each xdist worker and each `bottle run` (its stderr is the command's) read
    # the stored verdict: only the process that probed warns.
    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    probes: list[float] = []

    def probe(timeout: float) -> str:
        probes.append(timeout)
        return "QEMU exited with 1: failed to initialize kvm: Permission denied"

    caplog.set_level(logging.INFO, logger=accel.__name__)
    first = accel.decide("auto", tmp_path, probe)
    again = accel.decide("auto", tmp_path, probe)
    assert (first.accel, again.accel, len(probes)) == ("tcg", "tcg", 1)
    levels = [r.levelno for r in caplog.records if "using TCG" in r.getMessage()]
    assert levels == [logging.WARNING, logging.INFO], caplog.text
