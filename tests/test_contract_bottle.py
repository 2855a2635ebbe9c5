"""The `Bottle` contract of docs/reference.md, edge by edge (issue 12: contract with no test).

Every check here only reads the guest or writes under a path of its own, so
the tests share one bottle per module (and per xdist worker) in any order.
"""

from __future__ import annotations

import array
import errno
import os
import pickle
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import psutil
import pytest

import pytest_bottle
from pytest_bottle import (
    AgentError,
    Bottle,
    ExecError,
    ExecTimeout,
    OutputTimeout,
    ProcessTimeout,
    SpecError,
    WaitTimeout,
)
from pytest_bottle.errors import GuestIsADirectoryError, GuestOSError, GuestPermissionError
from pytest_bottle.images import get_recipe

# module_bottle follows the module's marker: a fixed image, whatever the run's default.
pytestmark = pytest.mark.bottle(image="debian-bookworm")


def _scratch(bottle: Bottle) -> str:
    """A guest directory no other test (or earlier run of this one) touched."""
    path = f"/tmp/contract-{uuid.uuid4().hex[:12]}"
    bottle.check_output(["mkdir", "-p", path])
    return path


# -- identity and history -----------------------------------------------------


def test_identity_members(module_bottle: Bottle) -> None:
    b = module_bottle
    assert re.fullmatch(r"btl-[0-9a-f]{8}", b.name)
    assert b.image == "debian-bookworm"
    assert b.accel in ("kvm", "tcg")
    assert b.lan_ip is None  # no lan= in the marker
    assert b.kept is False and b.closed is False
    assert psutil.Process(b.pid).name() == "qemu-system-x86_64"
    assert b.check_output("hostname").strip() == b.name


def test_history_keeps_the_last_20_commands(module_bottle: Bottle) -> None:
    b = module_bottle
    for i in range(22):
        b.exec(["echo", f"n{i}"])
    b.exec(["printf", "%s", "a b"])
    b.exec("exit 3")
    assert len(b.history) == 20 and b.history.maxlen == 20
    entries = list(b.history)
    assert [c for c, _, _ in entries[:2]] == ["echo n4", "echo n5"]  # the oldest 4 fell off
    (c1, rc1, d1), (c2, rc2, d2) = entries[-2:]
    assert (c1, rc1) == ("printf %s a b", 0) and (c2, rc2) == ("exit 3", 3)
    assert 0 < d1 < 30 and 0 < d2 < 30


def test_a_timed_out_command_is_recorded_with_the_kill_status(module_bottle: Bottle) -> None:
    with pytest.raises(ExecTimeout):
        module_bottle.exec("sleep 30", timeout=0.5)
    cmd, rc, seconds = module_bottle.history[-1]
    assert (cmd, rc) == ("sleep 30", -9) and 0.5 <= seconds < 15


def test_the_recipes_masked_units_are_masked(module_bottle: Bottle) -> None:
    units = get_recipe(module_bottle.image).masked_units
    assert "getty@tty1.service" in units and "ssh.service" not in units  # it stands for the socket
    state = module_bottle.exec(["systemctl", "is-enabled", *units]).stdout.split()
    assert state == ["masked"] * len(units)
    assert module_bottle.check_output(["systemctl", "is-enabled", "ssh.socket", "ssh"]) == "enabled\nenabled\n"


# -- exec edge cases ----------------------------------------------------------


def test_empty_argv_and_bad_timeouts_are_refused_before_anything_runs(module_bottle: Bottle) -> None:
    before = len(module_bottle.history), list(module_bottle.history)[-1:]
    empties: tuple[list[str], tuple[str, ...]] = ([], ())
    for empty in empties:
        with pytest.raises(SpecError, match="^cmd: an empty list is no command"):
            module_bottle.exec(empty)
        with pytest.raises(SpecError, match="^cmd: an empty list is no command"):
            module_bottle.spawn(empty)
    for call in (module_bottle.exec, module_bottle.spawn):  # said as a bad cmd, not in posix_spawnp's words
        with pytest.raises(SpecError, match=r"^cmd: the program \(the first argument\) is empty: \['', 'x'\]$"):
            call(["", "x"])
    for not_callable in ("nope", 3):
        with pytest.raises(SpecError, match="^on_output: must be a callable"):
            module_bottle.exec("touch /tmp/ran-anyway", on_output=not_callable)  # type: ignore[arg-type]
    for bad in (0, -1, 0.0, float("nan")):
        with pytest.raises(SpecError, match="timeout"):
            module_bottle.exec("true", timeout=bad)
    with pytest.raises(SpecError, match="cwd must be absolute"):
        module_bottle.exec("pwd", cwd="tmp")
    assert (len(module_bottle.history), list(module_bottle.history)[-1:]) == before  # nothing was sent
    assert module_bottle.exec("test -e /tmp/ran-anyway").returncode == 1


# A bad timeout must not wait: nan waited forever, None and "1" were a TypeError.
# 0 is one look for a GuestProcess (as Popen.wait(0)), and refused by the polling helpers.
BAD_WAITS: tuple[object, ...] = ("1", "3", float("nan"), float("inf"), -float("inf"), -1, True)


@pytest.mark.timeout(120)  # the old code waited forever for nan
def test_the_waiting_helpers_refuse_a_bad_timeout_at_once(module_bottle: Bottle) -> None:
    b = module_bottle
    with b.spawn("sleep 600") as p:
        before = list(b.history)
        started = time.monotonic()
        for bad in BAD_WAITS:
            with pytest.raises(SpecError, match="timeout must be 0 or a positive, finite number of seconds"):
                p.wait(bad)  # type: ignore[arg-type]
        for bad in (*BAD_WAITS, None):
            with pytest.raises(SpecError, match="timeout must be 0 or a positive, finite number of seconds"):
                p.wait_for_output("never", bad)  # type: ignore[arg-type]
        for bad in (*BAD_WAITS, 0, None):
            with pytest.raises(SpecError, match="timeout must be a positive, finite number of seconds"):
                b.wait_for_port(22, bad)  # type: ignore[arg-type]
            with pytest.raises(SpecError, match="timeout must be a positive, finite number of seconds"):
                b.wait_until_succeeds("true", bad)  # type: ignore[arg-type]
        with pytest.raises(SpecError, match=r"finite number of seconds \(below 1e9\), not 1000000000.0"):
            b.wait_until_succeeds("true", 1e9)  # the bound was not said
        assert time.monotonic() - started < 5  # at once: no try was made, nothing waited
        assert list(b.history) == before  # no command ran
        assert p.poll() is None  # wait() gave up on nothing: the process runs on
        with pytest.raises(ProcessTimeout):
            p.wait(0)  # one look: still running
        with pytest.raises(OutputTimeout):
            p.wait_for_output("never", 0)
        assert time.monotonic() - started < 5
        assert p.poll() is None  # and it runs on
        assert p.kill().wait(None).returncode == -9  # None: no deadline, as documented
        assert p.wait(0).returncode == -9  # ended: the result, at once
    with b.spawn(["echo", "ready"]) as q:
        q.wait(30)
        assert q.wait_for_output("ready", 0).group() == "ready"  # what came, searched once


def test_a_command_given_as_an_iterator_is_read_once(module_bottle: Bottle) -> None:
    """A map or generator was used up by the first look: the command ran, then
    its history (or a retry) saw an empty one and the call raised SpecError."""
    b = module_bottle
    r = b.exec(map(str, ["echo", "one", 1]))
    assert (r.stdout, r.args) == ("one 1\n", ["echo", "one", "1"])
    assert b.history[-1][:2] == ("echo one 1", 0)
    with b.spawn(iter(["sleep", "600"])) as p:
        assert p.args == ["sleep", "600"] and p.poll() is None
        assert b.history[-1][:2] == ("sleep 600", None)
    assert p.poll() == -9
    tries = b.exec("rm -f /tmp/iter-try")
    assert tries.ok
    flaky = (w for w in ["sh", "-c", "test -e /tmp/iter-try || { touch /tmp/iter-try; exit 1; }"])
    assert b.wait_until_succeeds(flaky, timeout=60).returncode == 0  # its second try had the command too
    assert b.ssh(iter(["echo", "via", "ssh"])).stdout == "via ssh\n"


def test_check_output_refuses_check_false_before_anything_runs(module_bottle: Bottle) -> None:
    """It was dropped, and the command checked anyway: subprocess.check_output makes it a TypeError too."""
    b = module_bottle
    before = list(b.history)
    for unchecked in (False, 0, None):
        with pytest.raises(
            TypeError, match=r"check_output\(\) always checks: check=.* \(use exec\(cmd, check=False\)\)"
        ):
            b.check_output("exit 3", check=unchecked)
    assert list(b.history) == before  # nothing ran
    assert b.check_output("echo ok", check=True) == "ok\n"  # check=True says what it does anyway
    with pytest.raises(ExecError):
        b.check_output("exit 3", check=True)


def test_bad_env_mode_and_port_are_refused_before_anything_is_sent(module_bottle: Bottle) -> None:
    b = module_bottle
    d = _scratch(b)
    before = len(b.history), list(b.history)[-1:]
    for env in ({"N": 1}, {"HOME": None}, {"A=B": "x"}, {"": "x"}, {"K": "a\0b"}):
        with pytest.raises(SpecError, match="env"):
            b.exec("true", env=env)  # type: ignore[arg-type]
        with pytest.raises(SpecError, match="env"):
            b.spawn("true", env=env)  # type: ignore[arg-type]
    for user in (1.5, True, -1, "", "a\0b", ["root"]):  # were "no such user in the guest", or ran
        with pytest.raises(SpecError, match=r"user must be a user name or a uid \(an int >= 0\), not"):
            b.exec("true", user=user)  # type: ignore[arg-type]
        with pytest.raises(SpecError, match="user must be"):
            b.spawn("true", user=user)  # type: ignore[arg-type]
    for mode in ("644", -1, 0o17777, 1.5, True):
        with pytest.raises(SpecError, match="mode"):
            b.write_text(f"{d}/f", "x", mode=mode)  # type: ignore[arg-type]
    for port in (0, 70000, -1, "22", True):
        with pytest.raises(SpecError, match="port"):
            b.wait_for_port(port, timeout=1)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="absolute"):
        b.read_text(PurePosixPath("etc/hostname"))
    assert (len(b.history), list(b.history)[-1:]) == before  # no command was sent
    assert b.exec(["ls", "-A", d]).stdout == ""  # nor a file written
    assert b.exec("echo $N", env={"N": "1"}).stdout == "1\n"  # and the bottle is fine


def test_guest_paths_may_be_path_objects(module_bottle: Bottle, tmp_path: Path) -> None:
    b = module_bottle
    d = PurePosixPath(_scratch(b))
    b.write_text(d / "a.txt", "one\n", mode=0o600)
    assert b.read_text(d / "a.txt") == "one\n" and b.read_bytes(d / "a.txt") == b"one\n"
    assert b.check_output(["stat", "-c", "%a", str(d / "a.txt")]) == "600\n"
    assert b.exec("pwd", cwd=d).stdout == f"{d}\n"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "b.txt").write_text("two\n")
    b.put(tmp_path / "src", d / "tree")
    b.get(d / "tree", tmp_path / "back")
    assert (tmp_path / "back" / "b.txt").read_text() == "two\n"
    with b.spawn(["cat", "b.txt"], cwd=d / "tree") as p:
        assert p.wait(timeout=30).stdout == "two\n"


def test_missing_cwd_is_exit_code_2_with_a_message(module_bottle: Bottle) -> None:
    r = module_bottle.exec("pwd", cwd="/no/such/dir")
    assert r.returncode == 2 and "/no/such/dir" in r.stderr and r.stdout == ""
    r = module_bottle.exec(["pwd"], cwd="/no/such/dir", user="nobody")
    assert r.returncode == 2 and "/no/such/dir" in r.stderr


def test_a_user_enters_cwd_with_its_own_rights(module_bottle: Bottle) -> None:
    b = module_bottle
    d = _scratch(b)
    b.exec(f"mkdir {d}/closed {d}/open && chmod 700 {d}/closed && chmod 755 {d}/open", check=True)
    for run in (b.exec, lambda *a, **kw: b.spawn(*a, **kw).wait(timeout=30)):
        r = run(["pwd"], cwd=f"{d}/closed", user="nobody")
        assert (r.returncode, r.stdout) == (2, "")
        assert f"cannot change directory to {d}/closed: Permission denied" in r.stderr
        assert run(["pwd"], cwd=f"{d}/open", user="nobody").stdout == f"{d}/open\n"
    assert b.check_output(["pwd"], cwd=f"{d}/closed") == f"{d}/closed\n"  # root may
    # A home the user may not enter is skipped, as login does: the command starts in /.
    b.exec(
        "id shut >/dev/null 2>&1 || useradd --create-home shut; chmod 700 /home/shut; chown root /home/shut", check=True
    )
    assert b.check_output('pwd; echo "$HOME"', user="shut").splitlines() == ["/", "/home/shut"]


def test_commands_given_as_bytes_run_as_their_text(module_bottle: Bottle) -> None:
    b = module_bottle
    assert b.check_output(b"echo hi | tr h H") == "Hi\n"  # type: ignore[arg-type]
    assert b.check_output([b"printf", "%s-%s", bytearray(b"\xc3\xa9"), 3]) == "\u00e9-3"  # type: ignore[list-item]
    assert b.history[-1][0] == "printf %s-%s \u00e9 3"
    with pytest.raises(TypeError, match="UTF-8"):
        b.exec([b"echo", b"\xff"])  # type: ignore[list-item]
    with pytest.raises(SpecError, match="timeout"):
        b.exec("true", timeout="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="write_bytes"):
        b.write_text(f"{_scratch(b)}/f", b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="write_text"):
        b.write_bytes(f"{_scratch(b)}/f", "x")  # type: ignore[arg-type]


def test_not_executable_is_126(module_bottle: Bottle) -> None:
    d = _scratch(module_bottle)
    module_bottle.write_text(f"{d}/script", "#!/bin/sh\necho ran\n", mode=0o644)
    r = module_bottle.exec([f"{d}/script"])
    assert r.returncode == 126 and "script" in r.stderr and "ran" not in r.stdout
    r = module_bottle.exec([d])  # a directory is not a program either
    assert r.returncode == 126
    module_bottle.exec(["chmod", "755", f"{d}/script"], check=True)
    assert module_bottle.check_output([f"{d}/script"]) == "ran\n"


def test_a_program_that_cannot_run_for_another_reason_is_126_too(module_bottle: Bottle) -> None:
    """An executable with no #! line (ENOEXEC) or an argument list too long
    (E2BIG) raised GuestOSError, from wait_until_succeeds too, as a shell gives 126."""
    b, d = module_bottle, _scratch(module_bottle)
    b.write_text(f"{d}/bare", "echo ran\n", mode=0o755)
    cases = (([f"{d}/bare"], "Exec format error"), (["echo", "x" * 200_000], "Argument list too long"))  # > 128 KiB
    # (the compiled core's own answer, before any call it does not serve: test_agent_core_vm)
    results = [("exec", b.exec(argv), argv[0], said) for argv, said in cases]
    results += [("exec in a cwd", b.exec(argv, cwd="/tmp"), argv[0], said) for argv, said in cases]
    results += [("a process", b.spawn(argv).wait(timeout=60), argv[0], said) for argv, said in cases]
    for how, r, program, said in results:
        assert (r.returncode, r.stdout) == (126, "") and r.stderr == f"{program}: {said}\n", (how, r)
    for argv, _ in cases:
        with pytest.raises(WaitTimeout):
            b.wait_until_succeeds(argv, timeout=1)
    assert b.exec(["true"]).ok


ENV = 'echo "$HOME|$USER|$LOGNAME|$LANG|$PATH"; pwd'


def test_default_environment_and_home_per_user(module_bottle: Bottle) -> None:
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert module_bottle.check_output(ENV).splitlines() == [f"/root|root|root|C.UTF-8|{path}", "/root"]
    # nobody's home (/nonexistent) does not exist: the command starts in /.
    assert module_bottle.check_output(ENV, user="nobody").splitlines() == [
        f"/nonexistent|nobody|nobody|C.UTF-8|{path}",
        "/",
    ]
    # env adds to the defaults or overrides them.
    out = module_bottle.check_output(ENV + '; echo "$EXTRA"', env={"LANG": "C", "HOME": "/srv", "EXTRA": "x y"})
    assert out.splitlines() == [f"/srv|root|root|C|{path}", "/root", "x y"]


def test_user_gets_uid_gid_groups_home(module_bottle: Bottle) -> None:
    b = module_bottle
    b.exec(
        "id ctester >/dev/null 2>&1 || useradd --create-home --groups adm,audio --shell /bin/sh ctester",
        check=True,
    )
    want = b.check_output("echo $(id -u ctester) $(id -g ctester) $(getent group adm audio | cut -d: -f3)").split()
    uid, gid, adm, audio = want
    for user in ("ctester", int(uid)):
        out = b.check_output('id -u; id -g; id -G; echo "$HOME $USER $LOGNAME"; pwd', user=user).splitlines()
        assert out[0] == uid and out[1] == gid
        assert {gid, adm, audio} == set(out[2].split())
        assert out[3:] == ["/home/ctester ctester ctester", "/home/ctester"]
    # root's own supplementary groups do not leak into another user's command.
    assert b.check_output("id -G", user="nobody").split() == [b.check_output("id -g nobody").strip()]


# -- files --------------------------------------------------------------------


def test_text_encoding(module_bottle: Bottle) -> None:
    d = _scratch(module_bottle)
    module_bottle.write_text(f"{d}/latin", "café\n", encoding="latin-1")
    assert module_bottle.read_bytes(f"{d}/latin") == b"caf\xe9\n"
    assert module_bottle.read_text(f"{d}/latin", encoding="latin-1") == "café\n"
    with pytest.raises(UnicodeDecodeError):
        module_bottle.read_text(f"{d}/latin")  # utf-8 by default
    module_bottle.write_text(f"{d}/utf8", "café\n")
    assert module_bottle.read_bytes(f"{d}/utf8") == "café\n".encode()


def test_text_takes_pathlibs_errors_and_newline(module_bottle: Bottle) -> None:
    """read_text(errors=) and write_text(errors=, newline=) were a TypeError, encoding=None too."""
    b, d = module_bottle, _scratch(module_bottle)
    b.write_bytes(f"{d}/raw", b"caf\xe9\r\n")
    assert b.read_text(f"{d}/raw", errors="replace") == "caf\ufffd\r\n"  # exact: CRLF stays
    assert b.read_text(f"{d}/raw", None, "surrogateescape") == "caf\udce9\r\n"
    b.write_text(f"{d}/crlf", "a\nb\n", newline="\r\n")
    assert b.read_bytes(f"{d}/crlf") == b"a\r\nb\r\n"
    b.write_text(f"{d}/kept", "a\r\nb\n", newline="")
    assert b.read_bytes(f"{d}/kept") == b"a\r\nb\n"
    b.write_text(f"{d}/ascii", "café", encoding="ascii", errors="replace")
    assert b.read_bytes(f"{d}/ascii") == b"caf?"
    b.write_text(f"{d}/none", "é", encoding=None)
    assert b.read_text(f"{d}/none", encoding=None) == "é"
    with pytest.raises(ValueError, match="illegal newline value"):
        b.write_text(f"{d}/bad", "x", newline="\t")
    assert not b.exec(f"test -e {d}/bad").ok  # refused before anything was written


def test_guest_permission_errors(module_bottle: Bottle) -> None:
    # Write-only for everyone, root included: procfs checks the mode bits itself.
    with pytest.raises(GuestPermissionError) as info:
        module_bottle.read_bytes("/proc/sys/vm/drop_caches")
    err = info.value
    assert isinstance(err, PermissionError) and isinstance(err, GuestOSError)
    assert err.errno == errno.EACCES and err.filename == "/proc/sys/vm/drop_caches"
    assert isinstance(pickle.loads(pickle.dumps(err)), GuestPermissionError)
    d = _scratch(module_bottle)
    module_bottle.exec(["chattr", "+i", d], check=True)  # immutable: even root cannot add a file
    try:
        with pytest.raises(GuestPermissionError) as info:
            module_bottle.write_text(f"{d}/new.txt", "x")
        assert info.value.errno == errno.EPERM and info.value.filename == f"{d}/new.txt"  # not our temporary
    finally:
        module_bottle.exec(["chattr", "-i", d], check=True)
    assert module_bottle.check_output(["ls", "-A", d]) == ""  # no half-written file


def test_guest_is_a_directory_errors(module_bottle: Bottle) -> None:
    d = _scratch(module_bottle)
    with pytest.raises(GuestIsADirectoryError) as info:
        module_bottle.read_bytes(d)
    assert isinstance(info.value, IsADirectoryError) and info.value.errno == errno.EISDIR
    with pytest.raises(IsADirectoryError):
        module_bottle.read_text(d)
    with pytest.raises(GuestIsADirectoryError):
        module_bottle.write_bytes(d, b"not over a directory")
    with pytest.raises(GuestIsADirectoryError, match="cannot end with '/'"):  # as open(2) says
        module_bottle.write_text(f"{d}/file/", "never a file named 'file'")
    for name in (f"{d}/file/.", f"{d}/file/.."):  # nor "file", nor d itself
        with pytest.raises(GuestIsADirectoryError, match="cannot end with '/', '.' or '..'"):
            module_bottle.write_bytes(name, b"x")
    assert module_bottle.exec(["test", "-e", f"{d}/file"]).returncode == 1
    assert module_bottle.exec(["test", "-d", d]).ok
    parent, base = d.rsplit("/", 1)
    assert base + "\n" == module_bottle.check_output(f"ls -A {parent} | grep -F {base}")  # no temp file beside it


def test_reads_a_path_cannot_name_or_a_fifo_are_refused_at_once(module_bottle: Bottle, tmp_path: Path) -> None:
    """Reading (or get, or put) "f/" read f (open(2) says ENOTDIR); a FIFO's read waited for a writer until
    its timeout, left an agent thread behind and swallowed that writer's data;
    a bytes path was "must be absolute"."""
    d = _scratch(module_bottle)
    module_bottle.write_text(f"{d}/file", "x")
    for name in (f"{d}/file/", f"{d}/file/."):
        with pytest.raises(GuestOSError) as info:
            module_bottle.read_bytes(name)
        assert info.value.errno == errno.ENOTDIR, info.value
        with pytest.raises(GuestOSError) as info:  # get() copied the file, as `cp f/ x` would not
            module_bottle.get(name, tmp_path / "got")
        assert info.value.errno == errno.ENOTDIR and info.value.filename == f"{d}/file/", info.value
    assert not (tmp_path / "got").exists()
    (tmp_path / "local").write_text("x")
    for local in (f"{tmp_path}/local/", f"{tmp_path}/local/."):
        with pytest.raises(NotADirectoryError):  # as open() takes it; put() sent the file
            module_bottle.put(local, f"{d}/put")
    assert module_bottle.exec(["test", "-e", f"{d}/put"]).returncode == 1
    module_bottle.get(f"{d}/", tmp_path / "dir")  # a directory with its "/" is copied as ever
    module_bottle.put(f"{tmp_path}/dir/", f"{d}/back")
    assert module_bottle.read_text(f"{d}/back/file") == "x" and (tmp_path / "dir" / "file").read_text() == "x"
    module_bottle.exec(["mkfifo", f"{d}/fifo"], check=True)
    started = time.monotonic()
    with pytest.raises(GuestOSError, match="Is a FIFO") as fifo:
        module_bottle.read_text(f"{d}/fifo", timeout=60)
    assert time.monotonic() - started < 10 and fifo.value.errno == errno.EINVAL, fifo.value
    assert module_bottle.exec(f"timeout 5 sh -c 'echo kept > {d}/fifo' & cat {d}/fifo").stdout == "kept\n"
    with pytest.raises(SpecError, match="must be a str or a path object, not bytes"):
        module_bottle.read_bytes(f"{d}/file".encode())  # type: ignore[arg-type]


def test_kernel_files_and_devices_are_written_in_place(module_bottle: Bottle) -> None:
    b = module_bottle
    old = b.read_text("/proc/sys/vm/swappiness")
    try:
        b.write_text("/proc/sys/vm/swappiness", "17\n")
        assert b.read_text("/proc/sys/vm/swappiness") == "17\n"
    finally:
        b.write_text("/proc/sys/vm/swappiness", old)
    b.write_bytes("/dev/null", b"x" * 300_000)  # a device, not replaced by a file
    assert b.check_output(["stat", "-c", "%F", "/dev/null"]) == "character special file\n"
    with pytest.raises(GuestOSError) as info:  # no such kernel file: nothing is created
        b.write_text("/proc/sys/vm/no_such_knob", "1")
    assert info.value.errno == errno.ENOENT


def test_a_file_where_a_parent_directory_must_be_is_enotdir(module_bottle: Bottle, tmp_path: Path) -> None:
    d = _scratch(module_bottle)
    module_bottle.write_text(f"{d}/file", "x")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "src").write_text("y")
    writes: list[Callable[[], object]] = [
        lambda: module_bottle.write_text(f"{d}/file/inner", "x"),
        lambda: module_bottle.put(tmp_path / "tree" / "src", f"{d}/file/inner"),
        lambda: module_bottle.put(tmp_path / "tree", f"{d}/file/dir"),
    ]
    for write in writes:
        with pytest.raises(GuestOSError) as info:
            write()
        assert info.value.errno == errno.ENOTDIR and str(info.value.filename).startswith(f"{d}/file"), info.value
    assert module_bottle.read_text(f"{d}/file") == "x"


def test_deep_missing_parents_are_made_as_mkdir_p_makes_them(module_bottle: Bottle, tmp_path: Path) -> None:
    """1,500 missing levels were an AgentError (the agent's RecursionError)."""
    d = _scratch(module_bottle)
    deep = f"{d}/" + "a/" * 1500
    (tmp_path / "src").write_text("y")
    module_bottle.write_text(f"{deep}x", "x")
    module_bottle.put(tmp_path / "src", f"{deep}b/c/src")
    assert module_bottle.read_text(f"{deep}x") + module_bottle.read_text(f"{deep}b/c/src") == "xy"
    with pytest.raises(GuestOSError) as info:  # past PATH_MAX, as mkdir -p says
        module_bottle.write_text(f"{d}/" + "b/" * 2100 + "x", "x")
    assert info.value.errno == errno.ENAMETOOLONG, info.value
    module_bottle.exec(["rm", "-rf", f"{d}/a", f"{d}/b"], check=True)


def test_a_write_through_a_dangling_link_makes_no_directory_for_its_target(module_bottle: Bottle) -> None:
    """It made the link target's missing parents; a shell redirect says ENOENT."""
    b, d = module_bottle, _scratch(module_bottle)
    b.exec(["ln", "-s", f"{d}/nodir/target", f"{d}/link"], check=True)
    with pytest.raises(GuestOSError) as info:
        b.write_text(f"{d}/link", "t")
    assert info.value.errno == errno.ENOENT and info.value.filename == f"{d}/link", info.value
    assert b.exec(["test", "-e", f"{d}/nodir"]).returncode == 1
    b.exec(["ln", "-s", f"{d}/there", f"{d}/link2"], check=True)  # a missing file in a directory that is there
    b.write_text(f"{d}/link2", "t")
    assert b.read_text(f"{d}/there") == "t" and b.exec(["test", "-L", f"{d}/link2"]).ok
    b.write_text(f"{d}/new/parents/x", "x")  # a path's own missing parents are still made
    assert b.read_text(f"{d}/new/parents/x") == "x"


def test_write_bytes_takes_any_buffer_and_refuses_text_before_sending(module_bottle: Bottle) -> None:
    module_bottle.write_bytes("/tmp/buffer", array.array("B", b"abc"))
    assert module_bottle.read_bytes("/tmp/buffer") == b"abc"
    with pytest.raises(TypeError):
        module_bottle.write_bytes("/tmp/text", "abc")  # type: ignore[arg-type]
    # Refused on the host: nothing reached the guest, and the channel still serves.
    assert module_bottle.exec(["test", "-e", "/tmp/text"]).returncode == 1
    assert module_bottle.read_bytes("/tmp/buffer") == b"abc"


def test_put_into_a_trailing_slash_directory(module_bottle: Bottle, tmp_path: Path) -> None:
    src = tmp_path / "tool.sh"
    src.write_text("echo tool\n")
    src.chmod(0o750)
    d = _scratch(module_bottle)
    module_bottle.put(src, f"{d}/new/sub/")  # created, and the file goes inside
    assert module_bottle.check_output(["stat", "-c", "%a %U %F", f"{d}/new/sub/tool.sh"]) == "750 root regular file\n"
    assert module_bottle.read_text(f"{d}/new/sub/tool.sh") == "echo tool\n"
    module_bottle.put(src, f"{d}/plain")  # no slash, no directory there: the file becomes dst
    assert module_bottle.read_text(f"{d}/plain") == "echo tool\n"


def test_a_dst_ending_in_dot_means_inside_that_directory_both_ways(module_bottle: Bottle, tmp_path: Path) -> None:
    """'d/.' and 'd/..' name a directory, as 'd/' does: put and get made a file named 'd'."""
    src = tmp_path / "tool.sh"
    src.write_text("echo tool\n")
    d = _scratch(module_bottle)
    module_bottle.put(src, f"{d}/new/.")
    module_bottle.put(src, f"{d}/up/sub/..")
    for where in ("new", "up"):
        assert module_bottle.check_output(["stat", "-c", "%F", f"{d}/{where}/tool.sh"]) == "regular file\n"
    module_bottle.get(f"{d}/new/tool.sh", f"{tmp_path}/out/.")
    assert (tmp_path / "out").is_dir() and (tmp_path / "out" / "tool.sh").read_text() == "echo tool\n"
    module_bottle.get(f"{d}/new/tool.sh", tmp_path / "made" / "..")  # a path object keeps its '..'
    assert (tmp_path / "made").is_dir() and (tmp_path / "tool.sh").read_text() == "echo tool\n"


def test_a_file_put_never_lands_in_a_directory_of_its_own_name(module_bottle: Bottle, tmp_path: Path) -> None:
    """As cp refuses it: put("h1", "d/") with a directory d/h1 wrote d/h1/h1."""
    src = tmp_path / "h1"
    src.write_text("x")
    d = _scratch(module_bottle)
    module_bottle.exec(["mkdir", "-p", f"{d}/h1"], check=True)
    for dst in (f"{d}/", d):
        with pytest.raises(GuestIsADirectoryError) as info:
            module_bottle.put(src, dst)
        assert info.value.filename == f"{d}/h1", info.value
    assert module_bottle.check_output(["find", d]).split() == [d, f"{d}/h1"]


def test_guest_write_errors_name_the_file(module_bottle: Bottle, tmp_path: Path) -> None:
    """A full disk's ENOSPC and a /proc file's EIO named no file."""
    d = _scratch(module_bottle)
    module_bottle.exec(f"mkdir {d}/small && mount -t tmpfs -o size=64k tmpfs {d}/small", check=True)
    try:
        big = b"x" * 300_000
        (tmp_path / "tree").mkdir()
        (tmp_path / "tree" / "big").write_bytes(big)
        (tmp_path / "big").write_bytes(big)
        writes: list[tuple[Callable[[], None], str]] = [
            (lambda: module_bottle.write_bytes(f"{d}/small/one", big), f"{d}/small/one"),
            (lambda: module_bottle.put(tmp_path / "big", f"{d}/small/two"), f"{d}/small/two"),
            (lambda: module_bottle.put(tmp_path / "tree", f"{d}/small/tree"), f"{d}/small/tree/big"),
        ]
        for write, named in writes:
            with pytest.raises(GuestOSError) as info:
                write()
            assert info.value.errno == errno.ENOSPC and info.value.filename == named, info.value
        with pytest.raises(GuestOSError) as info:
            module_bottle.write_bytes("/proc/version", b"x")
        assert info.value.filename == "/proc/version", info.value
    finally:
        module_bottle.exec(f"umount {d}/small", check=True)
    with pytest.raises(FileNotFoundError) as got:  # the local side: the file asked for, not our temporary
        module_bottle.get("/etc/hostname", "/proc/no-such-file")
    assert got.value.filename == "/proc/no-such-file", got.value


def test_a_missing_relative_put_source_names_its_absolute_path(
    module_bottle: Bottle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative to the working directory, as open(): the error says where it looked."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").write_text("x")
    d = _scratch(module_bottle)
    module_bottle.put("here", f"{d}/here")
    assert module_bottle.read_text(f"{d}/here") == "x"
    with pytest.raises(FileNotFoundError) as info:
        module_bottle.put("payload", f"{d}/p")
    assert info.value.filename == str(tmp_path / "payload") and str(tmp_path / "payload") in str(info.value)


def test_an_empty_local_path_names_no_file(
    module_bottle: Bottle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ``open("")``: ``put("", d)`` copied the working directory, ``get(f, "")`` wrote into it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").write_text("x")
    d = _scratch(module_bottle)
    with pytest.raises(FileNotFoundError) as info:
        module_bottle.put("", f"{d}/p")
    assert info.value.filename == "" and module_bottle.exec(["test", "-e", f"{d}/p"]).returncode == 1
    module_bottle.write_text(f"{d}/f", "y")
    with pytest.raises(FileNotFoundError):
        module_bottle.get(f"{d}/f", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_get_into_an_existing_local_directory(module_bottle: Bottle, tmp_path: Path) -> None:
    d = _scratch(module_bottle)
    module_bottle.write_text(f"{d}/report.txt", "content\n", mode=0o640)
    (tmp_path / "out").mkdir()
    module_bottle.get(f"{d}/report.txt", tmp_path / "out")
    got = tmp_path / "out" / "report.txt"
    assert got.read_text() == "content\n" and got.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.txt"]  # no temporary file left
    module_bottle.get(f"{d}/report.txt", f"{tmp_path}/new/dir/")  # a trailing '/': inside, made as put() does
    assert (tmp_path / "new" / "dir" / "report.txt").read_text() == "content\n"


# -- errors -------------------------------------------------------------------


def test_exec_error_message_keeps_the_last_2000_characters(module_bottle: Bottle) -> None:
    noisy = "import sys; sys.{0}.write('x' * 3000 + 'y' * 2000); sys.exit(5)"
    with pytest.raises(ExecError) as info:
        module_bottle.exec(["python3", "-c", noisy.format("stderr")], check=True)
    e = info.value
    assert e.returncode == 5 and len(e.stderr) == 5000 and e.stdout == ""
    assert str(e).split("--- stderr ---\n", 1)[1] == "y" * 2000
    # Without stderr the message ends with stdout instead.
    with pytest.raises(ExecError) as info:
        module_bottle.check_output(["python3", "-c", noisy.format("stdout")])
    assert str(info.value).split("--- stdout ---\n", 1)[1] == "y" * 2000
    assert "x" not in str(info.value).split("\n", 1)[1]


# -- ssh() ----------------------------------------------------------------------


def test_ssh_options(module_bottle: Bottle) -> None:
    b = module_bottle
    before = list(b.history)
    # Prepended as assignments: the command's environment has them (not the calling shell's expansions).
    env = {"FOO": "a b", "BAR": "it's"}
    assert b.ssh("printenv FOO BAR", env=env).stdout == "a b\nit's\n"
    assert b.ssh(["sh", "-c", 'echo "$FOO|$BAR"'], env=env).stdout == "a b|it's\n"
    with pytest.raises(ExecError) as info:
        b.ssh("echo bad >&2; exit 3", check=True)
    assert info.value.returncode == 3 and info.value.stderr == "bad\n"
    started = time.monotonic()
    with pytest.raises(ExecTimeout) as timeout:
        b.ssh("sleep 60", timeout=2)
    assert isinstance(timeout.value, TimeoutError) and time.monotonic() - started < 15
    for kw in ({"on_output": print}, {"bogus": 1}):  # exec's cwd= and user= it takes (test_ssh)
        with pytest.raises(TypeError):
            b.ssh("true", **kw)
    assert b.ssh("pwd; id -un", cwd="/tmp", user="nobody").stdout == "/tmp\nnobody\n"
    assert list(b.history) == before  # ssh() goes around the agent and its history
    b.exec("pkill -x sleep || true")


def test_ssh_failure_of_ssh_itself_is_255(module_bottle: Bottle) -> None:
    b = module_bottle
    b.exec(["systemctl", "stop", "ssh.socket"], check=True)  # nothing listens: connection refused
    try:
        r = b.ssh("echo never")
        assert r.returncode == 255 and r.stdout == "" and r.stderr
    finally:
        b.exec(["systemctl", "start", "ssh.socket"], check=True)
    assert b.ssh("echo back").stdout == "back\n"


def test_a_forked_child_neither_uses_nor_closes_its_parents_bottle(no_spare_starting: None) -> None:
    with pytest_bottle.launch() as b:
        pid = os.fork()
        if pid == 0:  # the child: a call is refused at once, a close lets go of nothing
            code = 1
            try:
                b.exec("true")
            except AgentError as e:
                code = 0 if f"belongs to process {os.getppid()}" in str(e) else 2
            except BaseException:
                code = 3
            try:
                b.close()
            except BaseException:
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # the parent's bottle: its VM, channel and files untouched by the child's close()
        assert b.check_output(["echo", "still", "mine"]).strip() == "still mine"
        assert b.alive() and b.console_log_path.exists()
