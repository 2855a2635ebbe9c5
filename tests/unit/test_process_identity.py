"""Process identity from /proc/PID/stat (kernel start ticks + boot id), and the new errors."""

from __future__ import annotations

import os
import pickle

import pytest

from pytest_bottle.errors import BottleError, LockTimeout, UnsafeDirectory
from pytest_bottle.vmm import process


@pytest.mark.parametrize(
    ("comm", "state"),
    [(b"python3", "S"), (b"a b) c (d", "R"), (b")", "Z"), (b"", "S"), (b"py) t\xc3", "S"), (b"\xff\xfe) (", "D")],
)
def test_parse_stat_counts_fields_after_the_last_paren(comm: bytes, state: str) -> None:
    # Fields 3..52 of a real line, with start time (field 22) set to 987654321.
    fields = [state] + [str(n) for n in range(4, 53)]
    fields[22 - 3] = "987654321"
    line = b"4242 (" + comm + b") " + " ".join(fields).encode() + b"\n"
    assert process.parse_stat(line) == (state, 987654321)


def test_identity_is_kernel_ticks_and_boot_id() -> None:
    with open("/proc/self/stat", "rb") as f:
        raw = f.read().decode()
    ticks = raw.rsplit(")", 1)[1].split()[19]
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    assert process.start_time(os.getpid()) == f"{ticks}@{boot}"


def test_legacy_and_foreign_identities() -> None:
    me = os.getpid()
    ident = process.start_time(me)
    assert ident is not None and process.is_same_process(me, ident) and process.is_alive(me, ident)
    ticks, _, _ = ident.partition("@")
    # Another boot: gone, whatever holds that pid now.
    assert not process.is_alive(me, f"{ticks}@00000000-0000-0000-0000-000000000000")
    # A wall-clock float (older records) proves nothing: alive while the pid exists, never "same".
    assert process.is_alive(me, 1.0) and not process.is_same_process(me, 1.0)
    assert process.is_alive(me, None) and not process.is_same_process(me, None)


@pytest.mark.parametrize(
    "err",
    [UnsafeDirectory("/tmp/x", "it belongs to uid 7", "remove it"), LockTimeout("/run/x.lock", 60.0, "pid 1 (init)")],
    ids=lambda e: type(e).__name__,
)
def test_new_errors_pickle(err: BottleError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)
    assert isinstance(LockTimeout("l", 1.0), TimeoutError)
