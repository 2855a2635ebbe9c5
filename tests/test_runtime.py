"""The runtime against real VMs: exec, files, timeouts, faults (issue: VM runtime)."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

import pytest_bottle
from pytest_bottle import AgentError, Bottle, ExecError, ExecTimeout, SpecError


def test_exec_shell_string_and_argv(module_bottle: Bottle) -> None:
    r = module_bottle.exec("echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
    assert r.args == "echo out; echo err >&2; exit 3" and r.duration > 0
    r = module_bottle.exec(["uname", "-s"])
    assert r.ok and r.stdout == "Linux\n"
    with pytest.raises(ExecError) as info:
        r2 = module_bottle.exec("exit 4")
        r2.check()
    assert info.value.returncode == 4
    with pytest.raises(ExecError):
        module_bottle.check_output(["false"])
    assert module_bottle.check_output("echo $((6*7))") == "42\n"
    with pytest.raises(ExecError):
        module_bottle.exec("exit 1", check=True)


def test_guest_aslr_is_off_under_tcg_only_and_can_be_turned_back_on(module_bottle: Bottle) -> None:
    # TCG translates code per virtual address: with ASLR every process's libc is new code.
    expected = "0" if module_bottle.accel == "tcg" else "2"
    assert module_bottle.check_output("cat /proc/sys/kernel/randomize_va_space").strip() == expected
    maps = "grep -m1 libc.so /proc/self/maps | cut -d- -f1"
    same = module_bottle.check_output(maps) == module_bottle.check_output(maps)
    assert same == (module_bottle.accel == "tcg")
    module_bottle.exec("sysctl -qw kernel.randomize_va_space=2", check=True)
    try:
        assert module_bottle.check_output(maps) != module_bottle.check_output(maps)
    finally:
        module_bottle.exec(f"sysctl -qw kernel.randomize_va_space={expected}", check=True)


def test_missing_program_is_a_result_not_an_exception(module_bottle: Bottle) -> None:
    r = module_bottle.exec(["/no/such/program", "x"])
    assert r.returncode == 127 and "not found" in r.stderr
    r = module_bottle.exec("no-such-command-here")
    assert r.returncode == 127 and "not found" in r.stderr


def test_stdin_env_cwd_user(module_bottle: Bottle) -> None:
    assert module_bottle.exec("cat", input="hello\n").stdout == "hello\n"
    assert module_bottle.exec(["wc", "-c"], input=b"\x00" * 300000).stdout.strip() == "300000"
    r = module_bottle.exec('echo "$FOO" "$PATH"; pwd; id -un', env={"FOO": "bar baz"}, cwd="/tmp", user="nobody")
    foo, cwd, user = r.stdout.splitlines()
    assert foo.startswith("bar baz /usr/local/sbin") and cwd == "/tmp" and user == "nobody"
    assert module_bottle.exec("id -u").stdout == "0\n"


def test_bytes_that_are_not_utf8_survive(module_bottle: Bottle) -> None:
    r = module_bottle.exec(r"printf '\377\376ok'; printf '\200' >&2")
    assert r.stdout_bytes == b"\xff\xfeok" and r.stderr_bytes == b"\x80"
    assert "ok" in r.stdout  # decoded with replacement
    module_bottle.write_bytes("/tmp/bin.dat", bytes(range(256)))
    assert module_bottle.read_bytes("/tmp/bin.dat") == bytes(range(256))


COUNT = """
import glob, sys
n = 0
for path in glob.glob("/proc/[0-9]*/stat"):
    try:
        comm, rest = open(path).read().rsplit(") ", 1)
    except OSError:
        continue
    n += comm.endswith("(" + sys.argv[1]) and rest[0] != "Z"  # zombies are dead, merely unreaped
print(n)
"""


def _count(bottle: Bottle, comm: str) -> int:
    return int(bottle.check_output(["python3", "-c", COUNT, comm]))


def test_timeout_kills_the_process_group_and_bottle_stays_usable(module_bottle: Bottle) -> None:
    started = time.monotonic()
    with pytest.raises(ExecTimeout) as info:
        module_bottle.exec("sleep 300 & sleep 301; echo never", timeout=1)
    assert time.monotonic() - started < 10
    assert isinstance(info.value, TimeoutError) and info.value.timeout == 1
    assert _count(module_bottle, "sleep") == 0
    assert module_bottle.check_output("echo still here") == "still here\n"


def test_background_process_does_not_hold_exec(module_bottle: Bottle) -> None:
    started = time.monotonic()
    r = module_bottle.exec("sleep 30 & echo $!")
    assert time.monotonic() - started < 5
    module_bottle.check_output(["kill", r.stdout.strip()])


def test_files_text_bytes_modes(module_bottle: Bottle) -> None:
    module_bottle.write_text("/etc/app/app.conf", "x=1\n")
    assert module_bottle.read_text("/etc/app/app.conf") == "x=1\n"
    module_bottle.write_bytes("/usr/local/bin/hello", b"#!/bin/sh\necho hi\n", mode=0o755)
    assert module_bottle.check_output("hello") == "hi\n"
    with pytest.raises(FileNotFoundError):
        module_bottle.read_text("/no/such/file")
    with pytest.raises(SpecError):
        module_bottle.write_text("relative/path", "x")
    with pytest.raises(SpecError):
        module_bottle.put(__file__, "relative/dst")


def test_put_and_get_directories_keep_modes(module_bottle: Bottle, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\necho run\n")
    (src / "run.sh").chmod(0o750)
    (src / "sub" / "data.txt").write_text("data\n")
    (src / "sub" / "data.txt").chmod(0o600)
    (src / "link").symlink_to("run.sh")
    module_bottle.put(src, "/opt/app")
    out = module_bottle.check_output("stat -c '%a %U %n' /opt/app/run.sh /opt/app/sub/data.txt; /opt/app/link")
    assert out.splitlines() == ["750 root /opt/app/run.sh", "600 root /opt/app/sub/data.txt", "run"]
    module_bottle.exec("mkdir -p /var/log/app && echo line > /var/log/app/app.log && chmod 640 /var/log/app/app.log")
    module_bottle.get("/var/log/app", tmp_path / "logs")
    assert (tmp_path / "logs" / "app.log").read_text() == "line\n"
    assert (tmp_path / "logs" / "app.log").stat().st_mode & 0o777 == 0o640
    module_bottle.get("/opt/app/run.sh", tmp_path / "out" / "run.sh")
    assert (tmp_path / "out" / "run.sh").stat().st_mode & 0o777 == 0o750
    with pytest.raises(FileNotFoundError):
        module_bottle.put(tmp_path / "missing", "/tmp/x")
    with pytest.raises(FileNotFoundError):
        module_bottle.get("/no/such/dir", tmp_path / "nothing")


@pytest.mark.slow
def test_100mb_put_then_get_is_identical(module_bottle: Bottle, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    module_bottle.put(big, "/var/tmp/big.bin")
    assert module_bottle.check_output("stat -c %s /var/tmp/big.bin").strip() == str(100 << 20)
    module_bottle.get("/var/tmp/big.bin", tmp_path / "back.bin")
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest() == digest
    module_bottle.exec("rm -f /var/tmp/big.bin")


def test_wait_helpers(module_bottle: Bottle) -> None:
    module_bottle.exec("rm -f /tmp/flag; (sleep 1; touch /tmp/flag) >/dev/null 2>&1 &")
    r = module_bottle.wait_until_succeeds("test -e /tmp/flag", timeout=30)
    assert r.ok
    with pytest.raises(pytest_bottle.WaitTimeout):
        module_bottle.wait_until_succeeds("false", timeout=1)
    module_bottle.exec("nohup python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1 &")
    module_bottle.wait_for_port(8765, timeout=60)
    with pytest.raises(TimeoutError):
        module_bottle.wait_for_port(8766, timeout=1)


def test_console_log_has_the_boot(module_bottle: Bottle) -> None:
    assert "Linux version" in module_bottle.console_log


def test_concurrent_execs_from_threads(module_bottle: Bottle) -> None:
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = module_bottle.check_output(f"sleep 0.{i}; echo {i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i}\n" for i in range(5)}


def test_vm_killed_during_exec_raises_agent_error_quickly(bottle: Bottle) -> None:
    threading.Timer(0.5, os.kill, (bottle.pid, signal.SIGKILL)).start()
    started = time.monotonic()
    with pytest.raises(AgentError):
        bottle.exec("sleep 60")
    assert time.monotonic() - started < 3
    with pytest.raises(AgentError):
        bottle.exec("true")


def test_close_is_idempotent_and_leaves_nothing(bottle: Bottle) -> None:
    pid = bottle.pid
    run_dir = bottle.console_log_path.parent
    assert run_dir.is_dir() and psutil.pid_exists(pid)
    bottle.close()
    bottle.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not run_dir.exists()
    assert bottle.closed


def _qemu_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.name() == "qemu-system-x86_64"}


def test_invalid_arguments_fail_before_anything_boots() -> None:
    before = _qemu_children()
    started = time.monotonic()
    for kwargs in ({"memory": -1}, {"cpus": 0}, {"memory": "lots"}, {"network": "wifi"}, {"bogus": 1}):
        with pytest.raises(SpecError):
            pytest_bottle.launch(**kwargs)
    with pytest.raises(pytest_bottle.ImageNotFound):
        pytest_bottle.launch(image="no-such-image")
    assert time.monotonic() - started < 2
    assert _qemu_children() <= before


def test_file_semantics_like_cp(module_bottle: Bottle, tmp_path: Path) -> None:
    # Replacing a file keeps its mode and owner unless a mode is given.
    module_bottle.exec("printf old > /tmp/kept && chmod 600 /tmp/kept && chown nobody /tmp/kept")
    module_bottle.write_text("/tmp/kept", "new")
    assert module_bottle.check_output("stat -c '%a %U' /tmp/kept") == "600 nobody\n"
    module_bottle.write_text("/tmp/kept", "newer", mode=0o644)
    assert module_bottle.check_output("stat -c '%a' /tmp/kept") == "644\n"
    # A file put onto an existing directory goes inside it.
    src = tmp_path / "tool.sh"
    src.write_text("echo tool\n")
    module_bottle.exec("mkdir -p /opt/tools")
    module_bottle.put(src, "/opt/tools")
    assert module_bottle.read_text("/opt/tools/tool.sh") == "echo tool\n"
    # get of a directory keeps permission bits, never set-id bits (see test_transfer_safety).
    module_bottle.exec(
        "mkdir -p /srv/modes && touch /srv/modes/suid && chmod 4755 /srv/modes/suid "
        "&& touch /srv/modes/shared && chmod 0666 /srv/modes/shared"
    )
    module_bottle.get("/srv/modes", tmp_path / "modes")
    assert (tmp_path / "modes" / "suid").stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "modes" / "shared").stat().st_mode & 0o777 == 0o666


def test_unknown_user_is_a_clear_error(module_bottle: Bottle) -> None:
    with pytest.raises(SpecError, match="no such user in the guest: 'nobody-here'"):
        module_bottle.exec("true", user="nobody-here")
    with pytest.raises(SpecError, match="no such user in the guest: 54321"):
        module_bottle.exec("true", user=54321)
    assert module_bottle.check_output("id -u", user=65534) == "65534\n"


def test_write_goes_through_a_symlink(module_bottle: Bottle) -> None:
    module_bottle.exec("echo old > /tmp/target && ln -sf /tmp/target /tmp/link")
    module_bottle.write_text("/tmp/link", "new\n")
    assert module_bottle.check_output("readlink /tmp/link; cat /tmp/target") == "/tmp/target\nnew\n"


def test_wait_until_succeeds_does_not_hang_on_a_hanging_command(module_bottle: Bottle) -> None:
    started = time.monotonic()
    with pytest.raises(pytest_bottle.WaitTimeout):
        module_bottle.wait_until_succeeds("sleep 600", timeout=2)
    assert time.monotonic() - started < 10


def test_privileged_ports_map_to_free_ports_for_non_root(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    launch_mod = sys.modules["pytest_bottle.launch"]  # the package's `launch` attribute is the function

    monkeypatch.setattr(launch_mod.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(launch_mod, "_unprivileged_port_start", lambda: 1024)
    port = launch_mod._host_port("127.77.255.1", 22)
    assert port >= 1024
    assert launch_mod._host_port("127.77.255.1", 8080) == 8080
    monkeypatch.setattr(launch_mod.os, "geteuid", lambda: 0)
    assert launch_mod._host_port("127.77.255.1", 22) == 22


def test_put_and_get_follow_a_symlinked_directory(module_bottle: Bottle, tmp_path: Path) -> None:
    (tmp_path / "release-1").mkdir()
    (tmp_path / "release-1" / "app.txt").write_text("v1\n")
    (tmp_path / "current").symlink_to("release-1")
    module_bottle.put(tmp_path / "current", "/opt/linked")
    assert module_bottle.read_text("/opt/linked/app.txt") == "v1\n"
    module_bottle.exec("ln -sfn /opt/linked /opt/current")
    module_bottle.get("/opt/current", tmp_path / "back")
    assert (tmp_path / "back" / "app.txt").read_text() == "v1\n"


def test_a_failing_local_sink_fails_only_that_call(module_bottle: Bottle, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        module_bottle.exec("head -c 3000000 /dev/urandom > /tmp/big.bin")
        with pytest.raises(OSError) as info:
            module_bottle.get("/tmp/big.bin", small / "big.bin")
        assert info.value.errno == errno.ENOSPC
        assert not list(small.iterdir())  # no partial file left
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert module_bottle.check_output("echo still fine") == "still fine\n"


def test_an_aborted_upload_leaves_nothing_and_the_bottle_works(module_bottle: Bottle) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b"first part\n"
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        module_bottle._channel.call("write", path="/tmp/aborted.txt", data=chunks())
    module_bottle.wait_until_succeeds(
        "test ! -e /tmp/aborted.txt && ! ls /tmp/aborted.txt.bottle-* 2>/dev/null", timeout=10
    )
    assert module_bottle.check_output("echo ok") == "ok\n"


def test_timeout_holds_against_chatty_background_output(module_bottle: Bottle) -> None:
    started = time.monotonic()
    r = module_bottle.exec("(while true; do echo tick; sleep 0.01; done) & echo started", timeout=30)
    assert time.monotonic() - started < 5 and r.stdout.startswith("started")
    module_bottle.exec("pkill -f 'echo tick' 2>/dev/null; kill $(jobs -p) 2>/dev/null; true")
    module_bottle.exec(["python3", "-c", KILL_TICKERS])


KILL_TICKERS = """
import glob, os, signal
for path in glob.glob("/proc/[0-9]*/cmdline"):
    try:
        if b"echo tick" in open(path, "rb").read():
            os.kill(int(path.split("/")[2]), signal.SIGKILL)
    except OSError:
        pass
"""


def test_stdin_left_unread_does_not_leak_agent_threads(module_bottle: Bottle) -> None:
    def agent_threads() -> int:
        pid = module_bottle.check_output("systemctl show -p MainPID --value bottle-agent").strip()
        return int(module_bottle.check_output(f"grep Threads /proc/{pid}/status").split()[1])

    module_bottle.exec("head -c1", input=b"x" * 2_000_000)
    before = agent_threads()
    for _ in range(5):
        assert module_bottle.exec("head -c1", input=b"x" * 2_000_000).stdout == "x"
    assert agent_threads() <= before + 1
