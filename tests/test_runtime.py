"""The runtime against real VMs: exec, files, timeouts, faults (issue: VM runtime)."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from harness import HAS_THP, gone, processes_mentioning, run_isolated, thp_enabled

import pytest_bottle
from pytest_bottle import AgentError, Bottle, ExecError, ExecTimeout, SpecError, UnsafeTransfer


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


def test_the_guest_cpu_has_no_fast_string_flags_under_tcg(module_bottle: Bottle) -> None:
    # TCG emulates `rep stosb` a byte per step: with ERMS (or FSRM, FSRS...)
    # the guest's memset and memcpy would use it.  Under KVM: the host's CPU.
    flags = module_bottle.check_output("grep -m1 '^flags' /proc/cpuinfo").split()
    if module_bottle.accel == "tcg":
        assert not {"erms", "fsrm", "fzrm", "fsrs", "fsrc"} & set(flags), flags
    assert "sse2" in flags and "lm" in flags  # the rest of the model is still there


@pytest.mark.skipif(not HAS_THP, reason="no THP in this kernel")
def test_a_clone_gets_no_huge_pages_under_tcg(module_bottle: Bottle) -> None:
    # Huge pages would round an idle clone's translated code up to 2 MB steps
    # (module_bottle is a clone: restored from its seed).  That this process
    # gets its own flag back is tests/unit/test_process_identity.py's: here a
    # pre-start in another thread may hold it at any moment.
    assert module_bottle.pid is not None
    expected = "0" if module_bottle.accel == "tcg" else "1"
    assert thp_enabled(module_bottle.pid) == expected
    if module_bottle.accel == "tcg":
        rollup = Path(f"/proc/{module_bottle.pid}/smaps_rollup").read_text()
        assert re.search(r"^AnonHugePages:\s+0 kB", rollup, re.M), rollup


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


@pytest.mark.parametrize("name", ["n" * 255, "\u65e5" * 85], ids=["ascii", "multibyte"])
def test_a_file_name_of_the_longest_length_is_written_put_and_got(
    module_bottle: Bottle, tmp_path: Path, name: str
) -> None:
    # NAME_MAX is 255 bytes: the temporary names beside it must not be longer
    module_bottle.write_text(f"/tmp/{name}", "long\n")
    assert module_bottle.read_text(f"/tmp/{name}") == "long\n"
    (tmp_path / name).write_text("put\n")
    module_bottle.put(tmp_path / name, "/tmp/")
    assert module_bottle.read_text(f"/tmp/{name}") == "put\n"
    assert module_bottle.check_output(f"ls -A /tmp | grep -c {name[:20]}") == "1\n"  # no temporary left
    (tmp_path / name).unlink()
    module_bottle.get(f"/tmp/{name}", tmp_path / name)
    assert (tmp_path / name).read_text() == "put\n" and [p.name for p in tmp_path.iterdir()] == [name]
    module_bottle.exec(f"rm /tmp/{name}").check()


COUNT = """
import os, sys
n = 0
for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
        continue
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[:-1]
        state = open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        continue
    n += sys.argv[1].encode() in argv and state != "Z"  # zombies are dead, merely unreaped
print(n)
"""


def _count(bottle: Bottle, arg: str) -> int:
    """Live guest processes with ``arg`` as one of their arguments: a marker only
    this test uses, so other tests' leftovers (this bottle is shared) never count."""
    return int(bottle.check_output(["python3", "-c", COUNT, arg]))


def _marker() -> str:
    return f"{300 + secrets.randbelow(10**6) / 10**6:.6f}"  # a sleep argument nothing else uses


def test_timeout_kills_the_process_group_and_bottle_stays_usable(module_bottle: Bottle) -> None:
    a, b = _marker(), _marker()
    started = time.monotonic()
    with pytest.raises(ExecTimeout) as info:
        module_bottle.exec(f"sleep {a} & sleep {b}; echo never", timeout=1)
    assert time.monotonic() - started < 10
    assert isinstance(info.value, TimeoutError) and info.value.timeout == 1
    assert _count(module_bottle, a) == 0 and _count(module_bottle, b) == 0
    assert module_bottle.check_output("echo still here") == "still here\n"


def test_background_process_does_not_hold_exec(module_bottle: Bottle) -> None:
    mark = _marker()
    started = time.monotonic()
    r = module_bottle.exec(f"sleep {mark} & echo $!")
    assert time.monotonic() - started < 5
    # Still running after exec returned (polled: the fork may not have exec'd sleep yet).
    module_bottle.wait_until_succeeds(["python3", "-c", COUNT + "sys.exit(n != 1)", mark], timeout=10)
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
    with pytest.raises(
        TimeoutError, match=f"^a listen on TCP port 8766 in {module_bottle.name} did not happen within 1 s$"
    ):
        module_bottle.wait_for_port(8766, timeout=1)


def test_wait_for_port_keeps_its_timeout_while_the_guest_does_not_answer(bottle: Bottle) -> None:
    """Each look asked the agent with 30 s of its own: a stalled guest held a
    2 s wait 30 s and ended it with AgentTimeout, not WaitTimeout."""
    qemu = psutil.Process(bottle.pid)
    qemu.suspend()  # SIGSTOP: the guest stands still, its channel stays open
    try:
        started = time.monotonic()
        with pytest.raises(pytest_bottle.WaitTimeout, match="the agent did not answer") as info:
            bottle.wait_for_port(8765, timeout=2)
        took = time.monotonic() - started
    finally:
        qemu.resume()
    assert 2 <= took < 4, (took, info.value)
    bottle.exec("nohup python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1 &")
    bottle.wait_for_port(8765, timeout=60)  # the looks it gave up on did not break the channel
    assert bottle.check_output("echo still here") == "still here\n"


def test_console_log_has_the_boot(module_bottle: Bottle) -> None:
    log = module_bottle.console_log
    assert "Linux version" in log
    # The seed's boot is marked as such: a restore's boot error must not read as this bottle's own boot.
    mark = f"[pytest-bottle: {module_bottle.name} restored from"
    marks = [line for line in log.splitlines() if line.startswith(mark)]
    assert len(marks) == 1 and log.index("Linux version") < log.index(marks[0]), marks
    assert re.search(rf"restored from {re.escape(module_bottle.image)}-\d+m\d+c\d+n-[0-9a-f]{{16}};", marks[0]), marks


# Each command waits until all five have started: serialised execs cannot pass.
RENDEZVOUS = """
mkdir -p {d} && touch {d}/$1
i=0
while [ "$(ls {d} | wc -l)" -lt 5 ]; do
    i=$((i+1)); [ $i -gt 300 ] && exit 9
    sleep 0.1
done
echo $1
"""


def test_concurrent_execs_from_threads(module_bottle: Bottle) -> None:
    results: dict[int, str] = {}
    script = RENDEZVOUS.format(d=f"/tmp/rendezvous-{secrets.token_hex(4)}")

    def run(i: int) -> None:
        results[i] = module_bottle.check_output(["sh", "-c", script, "sh", str(i)], timeout=60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i}\n" for i in range(5)}


def test_vm_killed_during_exec_raises_agent_error_quickly(bottle: Bottle) -> None:
    killed_at: list[float] = []

    def kill() -> None:
        os.kill(bottle.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    threading.Timer(0.5, kill).start()
    with pytest.raises(AgentError):
        bottle.exec("sleep 60")
    assert killed_at and time.monotonic() - killed_at[0] < 3
    with pytest.raises(AgentError):
        bottle.exec("true")


NEVER_CLOSED = """
import os, signal, pytest_bottle
b = pytest_bottle.launch()
print(b.exec("echo hi").stdout, end="", flush=True)
os.kill(b.pid, signal.SIGKILL)  # QEMU gone under a live QMP session, as at a test's end without close()
"""


NEVER_CLOSED_ALIVE = """
import sys, pytest_bottle
b = pytest_bottle.launch(detached=sys.argv[1] == "detached")
print(b.pid, b.console_log_path.parent, b.exec("echo hi").stdout, flush=True)
"""


FORKED = """
import os, pytest_bottle
b = pytest_bottle.launch()
child = os.fork()
if child == 0:
    raise SystemExit(0)  # a normal exit of a forked child: its exit handlers must leave b alone
os.waitpid(child, 0)
print(b.exec("echo still").stdout, b.console_log_path.parent.exists(), flush=True)
b.close()
"""


def test_a_bottle_never_closed_ends_quietly_with_its_process(warm_cache: Path) -> None:
    assert run_isolated(FORKED).stdout == "still\n True\n"
    got = run_isolated(NEVER_CLOSED)
    assert got.stdout == "hi\n"
    assert "never retrieved" not in got.stderr and "Traceback" not in got.stderr, got.stderr
    for how in ("attached", "detached"):  # closed at exit: nothing is left for a sweep
        got = run_isolated(NEVER_CLOSED_ALIVE, how)
        pid, run_dir, hi = got.stdout.split()
        assert hi == "hi" and "Traceback" not in got.stderr and "pending" not in got.stderr, got.stderr
        assert not Path(run_dir).exists(), how
        assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE, how


def test_two_threads_closing_at_once_each_return_only_once_the_vm_is_gone(
    bottle_factory: Callable[..., Bottle],
) -> None:
    """The second caller of close() waits for the first one's release instead of
    returning at once (a test's watchdog thread and its finalizer, say)."""
    for _ in range(2):
        b = bottle_factory()
        b._resources._stack.callback(time.sleep, 0.5)  # the first release, slow: runs before QEMU is stopped
        together = threading.Barrier(2)
        seen: list[tuple[bool, bool]] = []  # (QEMU running, run dir there) as each close() returned
        threads = [threading.Thread(target=_close_and_look, args=(b, together, seen), daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert seen == [(False, False), (False, False)], seen


def _close_and_look(b: Bottle, together: threading.Barrier, seen: list[tuple[bool, bool]]) -> None:
    pid, run_dir = b.pid, b.console_log_path.parent
    together.wait()
    b.close()
    seen.append((not gone(pid, within=0.05), run_dir.exists()))


def test_close_is_idempotent_and_leaves_nothing(bottle: Bottle) -> None:
    pid = bottle.pid
    run_dir = bottle.console_log_path.parent
    assert run_dir.is_dir() and psutil.pid_exists(pid)
    bottle.exec("echo console-mark >/dev/console", check=True)
    bottle.close()
    bottle.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not run_dir.exists()
    assert bottle.closed
    assert "Linux version" in bottle.console_log and "console-mark" in bottle.console_log  # kept as it was
    with pytest.raises(AgentError, match=f"bottle {bottle.name} was closed"):
        bottle.exec("true")
    with pytest.raises(AgentError, match=f"bottle {bottle.name} was closed"):  # its port may be another's now
        bottle.address(22)
    for reach in (lambda: bottle.ssh("true"), lambda: bottle.ssh_argv(), lambda: bottle.ssh_config):
        with pytest.raises(AgentError, match=f"bottle {bottle.name} was closed"):  # its ssh_config is gone
            reach()


def test_invalid_arguments_fail_before_anything_boots(tmp_path: Path) -> None:
    cache = tmp_path / "cache"  # a VM or a build would name it: see the check below
    started = time.monotonic()
    for kwargs in ({"memory": -1}, {"cpus": 0}, {"memory": "lots"}, {"network": "wifi"}, {"bogus": 1}):
        with pytest.raises(SpecError):
            pytest_bottle.launch(cache_dir=cache, **kwargs).close()
    # Under pytest, the errors a marker gives for the same values: both also pytest.UsageErrors.
    with pytest.raises(pytest.UsageError, match=r"^launch\(\): bad cpus"):
        pytest_bottle.launch(cache_dir=cache, cpus=0).close()
    with pytest.raises(pytest.UsageError, match=r"^launch\(\): unknown image 'no-such-image'; known images: ") as e:
        pytest_bottle.launch(image="no-such-image", cache_dir=cache).close()
    assert isinstance(e.value, pytest_bottle.ImageNotFound) and e.value.name == "no-such-image"
    assert time.monotonic() - started < 2
    assert not processes_mentioning(str(cache)) and not processes_mentioning(str(cache), "mmdebstrap")
    assert not (cache / "run").exists() and not (cache / "images").exists()


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
    # get of a directory keeps permission bits, never set-id or group/other-write bits (see test_transfer_safety).
    module_bottle.exec(
        "mkdir -p /srv/modes && touch /srv/modes/suid && chmod 4755 /srv/modes/suid "
        "&& touch /srv/modes/shared && chmod 0666 /srv/modes/shared"
    )
    module_bottle.get("/srv/modes", tmp_path / "modes")
    assert (tmp_path / "modes" / "suid").stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "modes" / "shared").stat().st_mode & 0o777 == 0o644


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


PORTS = """
import os, socket, sys
import pytest_bottle
launch = sys.modules["pytest_bottle.lifecycle.resources"]  # host ports are picked there
alias = "127.77.255.1"

def free(lo, hi):
    for port in range(lo, hi):
        try:
            for host in ("0.0.0.0", alias):  # nothing on any address, nor on the alias
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise SystemExit("no free port in %d..%d" % (lo, hi))

real_root = os.geteuid() == 0
high = free(20000, 30000)
os.geteuid = lambda: 1000  # this process only: nothing else runs in it
launch._unprivileged_port_start = lambda: 1024
low = launch._host_port(alias, 22)
assert low >= 1024, low
assert launch._host_port(alias, high) == high
if real_root:  # binding a low port needs it
    os.geteuid = lambda: 0
    privileged = free(600, 1000)
    assert launch._host_port(alias, privileged) == privileged
print("ok")
"""


def test_privileged_ports_map_to_free_ports_for_non_root() -> None:
    # Patching geteuid is process-wide: done in a process where no pre-start thread runs.
    assert run_isolated(PORTS).stdout == "ok\n"


def test_put_and_get_follow_a_symlinked_directory(module_bottle: Bottle, tmp_path: Path) -> None:
    (tmp_path / "release-1").mkdir()
    (tmp_path / "release-1" / "app.txt").write_text("v1\n")
    (tmp_path / "current").symlink_to("release-1")
    module_bottle.put(tmp_path / "current", "/opt/linked")
    assert module_bottle.read_text("/opt/linked/app.txt") == "v1\n"
    module_bottle.exec("ln -sfn /opt/linked /opt/current")
    module_bottle.get("/opt/current", tmp_path / "back")
    assert (tmp_path / "back" / "app.txt").read_text() == "v1\n"


def test_get_keeps_absolute_links_within_the_tree_as_relative_ones(module_bottle: Bottle, tmp_path: Path) -> None:
    """As Debian's sites-enabled links are: to an absolute path inside the
    directory fetched.  A link elsewhere in the guest is skipped, and named."""
    module_bottle.exec(
        "rm -rf /srv/app && mkdir -p /srv/app/available /srv/app/enabled && echo on > /srv/app/available/site"
        " && ln -s /srv/app/available/site /srv/app/enabled/site && ln -s /etc/hostname /srv/app/enabled/host",
        check=True,
    )
    with pytest.raises(UnsafeTransfer, match="a symlink to an absolute path") as info:
        module_bottle.get("/srv/app", tmp_path / "app")
    assert info.value.skipped == ("./enabled/host",)
    assert os.readlink(tmp_path / "app" / "enabled" / "site") == "../available/site"
    assert (tmp_path / "app" / "enabled" / "site").read_text() == "on\n"


SINK = """
import errno, subprocess, sys
from pathlib import Path
import pytest_bottle
small = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
with pytest_bottle.launch() as b:
    b.exec("head -c 3000000 /dev/urandom > /tmp/big.bin", check=True)
    try:
        b.get("/tmp/big.bin", small / "big.bin")
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    else:
        raise AssertionError("a get into a full filesystem succeeded")
    assert not list(small.iterdir()), list(small.iterdir())  # no partial file left
    assert b.check_output("echo still fine") == "still fine\\n"
print("ok")
"""


def test_a_failing_local_sink_fails_only_that_call(tmp_path: Path, warm_cache: Path) -> None:
    # A 1 MB tmpfs in a mount namespace of its own: nothing stays mounted if this
    # dies; as non-root a user namespace grants the mount.
    prefix = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.insert(1, "--map-root-user")
        if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
            pytest.skip("needs root or unprivileged user namespaces to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    assert run_isolated(SINK, str(small), prefix=tuple(prefix)).stdout == "ok\n"
    assert not list(small.iterdir())


def test_an_aborted_upload_leaves_nothing_and_the_bottle_works(module_bottle: Bottle) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"first part\n"
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        module_bottle._channel.call("write", path="/tmp/aborted.txt", data=chunks())
    module_bottle.wait_until_succeeds(
        "test ! -e /tmp/aborted.txt && ! ls /tmp/.aborted.txt.bottle-* 2>/dev/null", timeout=10
    )
    assert module_bottle.check_output("echo ok") == "ok\n"


KILL_BY_ARG = """
import os, signal, sys
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if sys.argv[1].encode() in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0") and int(pid) != os.getpid():
            os.kill(int(pid), signal.SIGKILL)
    except OSError:
        pass
"""


def test_background_chatter_neither_holds_exec_nor_stretches_a_timeout(module_bottle: Bottle) -> None:
    ticker = "while true; do echo tick; sleep 0.01; done"
    mark = f"ticker-{secrets.token_hex(4)}"  # the ticker's $0: only this test's tickers have it
    started = time.monotonic()
    r = module_bottle.exec(f"sh -c '{ticker}' {mark} & echo started", timeout=30)
    assert time.monotonic() - started < 5 and r.stdout.startswith("started")
    module_bottle.wait_until_succeeds(["python3", "-c", COUNT + "sys.exit(n != 1)", mark], timeout=10)
    module_bottle.exec(["python3", "-c", KILL_BY_ARG, mark], check=True)
    module_bottle.wait_until_succeeds(["python3", "-c", COUNT + "sys.exit(n)", mark], timeout=10)
    # A command that outlives its timeout while chatter floods its output still
    # ends on time, and its whole process group (the ticker too) goes with it.
    mark = f"ticker-{secrets.token_hex(4)}"
    started = time.monotonic()
    with pytest.raises(ExecTimeout):
        module_bottle.exec(f"sh -c '{ticker}' {mark} & sleep {_marker()}", timeout=2)
    assert time.monotonic() - started < 10
    assert _count(module_bottle, mark) == 0


def test_stdin_left_unread_does_not_leak_agent_threads(module_bottle: Bottle) -> None:
    def agent_threads() -> int:
        pid = module_bottle.check_output("systemctl show -p MainPID --value bottle-agent").strip()
        return int(module_bottle.check_output(f"grep Threads /proc/{pid}/status").split()[1])

    module_bottle.exec("head -c1", input=b"x" * 2_000_000)
    before = agent_threads()
    for _ in range(8):
        assert module_bottle.exec("head -c1", input=b"x" * 2_000_000).stdout == "x"
    # A leak is a thread per call; a worker that has sent its reply but not yet
    # counted itself idle when the next call comes makes one more, once in a while.
    assert agent_threads() <= before + 2
