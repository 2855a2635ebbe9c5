"""A console log stays bounded: its head is cut in place while a writer
appends (as QEMU does, O_APPEND), and readers hold only its tail."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_bottle.vmm import console

WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
for i in range(int(sys.argv[2])):
    if i == int(sys.argv[3]):
        sys.stdin.read(1)  # until the watcher has cut once
    os.write(fd, b"line %08d ".ljust(1023, b"x") % i + b"\\n")
os.write(fd, b"THE END\\n")
"""


def test_a_log_cut_while_it_is_appended_to_keeps_its_tail(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    # 40 MB of 1 KiB lines; halfway it waits for the first cut, so that one is
    # made while the log is open for appending, however loaded the host.
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(log), "40000", "20000"], stdin=subprocess.PIPE)
    assert writer.stdin is not None
    cut = 0
    with writer.stdin:
        while writer.poll() is None:
            if log.exists() and log.stat().st_size > 4 << 20:
                cut += console.trim(log, keep=1 << 20)
                if not writer.stdin.closed:
                    writer.stdin.write(b"g")
                    writer.stdin.close()
            time.sleep(0.01)
    assert writer.wait() == 0
    assert cut > 0  # cut while it was appended to
    # A loaded host can let the writer outrun the last cut (8.5 MB written
    # since, in one CI run): the watcher's next cut is made here.
    if log.stat().st_size > 4 << 20:
        cut += console.trim(log, keep=1 << 20)
    text, _ = console.read_tail(log, cap=2 << 20)
    last = text.splitlines()[-2:]
    assert last[0].startswith("line 00039999 xxx") and last[1] == "THE END"  # nothing lost at the end
    assert cut > 30 << 20 and "\0" not in text
    assert log.stat().st_blocks * 512 < 8 << 20  # on disk: the tail only (collapsed, or a hole)


def test_a_short_log_is_read_whole_and_never_cut(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"boot\r\nok\r\n")
    assert console.trim(log, keep=1 << 20) == 0
    assert console.read_tail(log) == ("boot\nok\n", 0)
    assert console.read_tail(tmp_path / "none") == ("", 0)


def test_a_punched_head_reads_as_nothing(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(bytes(1 << 20) + b"tail\n")
    text, gone = console.read_tail(log, cap=4 << 20)
    assert (text, gone) == ("tail\n", 1 << 20)
    console.copy_tail(log, tmp_path / "copy.log")
    assert (tmp_path / "copy.log").read_bytes() == b"tail\n"


@pytest.fixture(params=["disk", "tmpfs"])
def log_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """ext4 here collapses a range; tmpfs only punches a hole (as btrfs and ZFS)."""
    if request.param == "disk":
        yield tmp_path
        return
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        yield Path(d)


def test_the_watcher_cuts_a_file_past_the_cap_and_counts_it_once(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "DISK_CAP", 1 << 20)
    monkeypatch.setattr(console, "KEEP", 256 << 10)
    monkeypatch.setattr(console, "CHECK_EVERY", 0.05)
    watcher = console._Watcher()
    log = log_dir / "console.log"
    written = (3 << 20) + 4
    log.write_bytes(b"x" * (3 << 20) + b"end\n")

    class Owner:
        pass

    owner = Owner()
    watcher.watch(owner, log)
    try:
        deadline = time.monotonic() + 10
        while log.stat().st_blocks * 512 > 1 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # more looks: a file cut once is not cut (nor counted) again
        assert log.stat().st_blocks * 512 <= 1 << 20
        text, gone = console.read_tail(log)
        assert text.endswith("end\n")
        with watcher.lock:
            cut = watcher.cut.get(str(log), 0)
        # What a reader is told was not kept, plus what it got, is what was written: no more, no less.
        assert cut + gone + len(text) == written, (cut, gone, len(text))
        assert len(text) <= (256 << 10) + 4096
    finally:
        watcher.forget(owner)
        watcher.wake.set()


def test_a_line_crs_overwrote_reads_as_a_terminal_shows_it(tmp_path: Path) -> None:
    """A progress bar (``\\r``, no newline) was one line of every update joined:
    420,000 characters in a failed test's report for 20,000 updates."""
    log = tmp_path / "console.log"
    bar = "".join(f"\rprogress {i:6d}/20000" for i in range(1, 20001))
    log.write_bytes(f"boot\r\n{bar}\r\nlogin: \r\r\nend".encode())
    assert console.read_tail(log) == ("boot\nprogress  20000/20000\nlogin: \nend", 0)


def test_a_report_cuts_an_endless_console_line() -> None:
    from pytest_bottle.reports import LINE_CAP, _capped

    assert _capped("x" * LINE_CAP) == "x" * LINE_CAP
    assert _capped("x" * (LINE_CAP + 5)) == "x" * LINE_CAP + " [... 5 more characters]"


def test_report_sections_drop_colours_and_show_other_escapes() -> None:
    from pytest_bottle.terminal_text import printable

    text = "[\x1b[0;1;31mFAILED\x1b[0m] unit\tx\n\x1b]0;pwned\x07\x1b[2J\x1b[H=== 1 passed ===\r\x9b31m é"
    assert printable(text) == "[FAILED] unit\tx\n\\x1b]0;pwned\\x07\\x1b[2J\\x1b[H=== 1 passed ===\\x0d\\x9b31m é"


@pytest.mark.parametrize(
    ("tail", "said"),
    [
        (
            "[  9.1] systemd-shutdown[1]: Rebooting.\n[  9.2] reboot: Restarting system\n",
            "the guest rebooted: 'reboot:",
        ),
        ("[  9.2] reboot: Power down\n", "the guest powered off: 'reboot: Power down' on its console"),
        (
            "[  3.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009\n"
            "[  3.0] ---[ end Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009 ]---\n",
            "the guest kernel panicked: 'Kernel panic - not syncing: Attempted to kill init!",
        ),
        ("[  1.0] sysrq: Resetting\n", "the guest rebooted"),
        ("[  5.0] reboot: System halted\n", "the guest halted: 'reboot: System halted' on its console"),
        ("login: \n", ""),
        ("", ""),
    ],
)
def test_last_words_say_how_the_guest_ended(tail: str, said: str) -> None:
    words = console.last_words(tail)
    if said:
        assert words.startswith(said), words
    else:
        assert words == ""


def test_last_words_are_bounded_and_printable() -> None:
    """The guest writes its console: what reaches an error message is one short, printable line."""
    words = console.last_words("reboot: Power down \x1b]0;owned\x07" + "x" * 10_000 + "\n")
    assert words.startswith("the guest powered off: 'reboot: Power down ?]0;owned?xxx")
    assert len(words) < 300 and "\x1b" not in words
    assert console.last_words("reboot: Power down\n" + "ok\n" * 50) == ""  # only the end of the console counts
