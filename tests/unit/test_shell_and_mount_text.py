"""Pure text helpers: remote shell quoting (checked by a real sh), and
/proc/self/mountinfo unescaping and the order mounts are detached in."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_bottle.errors import SpecError
from pytest_bottle.host.mounts import below, parse_mount_points, unescape_mount_field
from pytest_bottle.reports import keep_message
from pytest_bottle.ssh import check_user, remote_command

SHOW_ARGV = [sys.executable, "-c", "import os, sys; print(repr((sys.argv[1:], os.environ.get('K'))))"]


def _sh(line: str) -> subprocess.CompletedProcess[str]:
    """What a remote login shell does with the line ssh sends: ``sh -c``."""
    return subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=30, check=False)


def test_a_list_reaches_the_remote_program_word_for_word() -> None:
    args = ["a b", "it's", "", "~", "~/x", "$HOME", "`id`", "A=b", "*", "x\ny", "plain-word_1.2:3,4@5%+/="]
    r = _sh(remote_command([*SHOW_ARGV, *args], env={"K": "v w'~$HOME"}))
    assert r.returncode == 0, r.stderr
    assert r.stdout == repr((args, "v w'~$HOME")) + "\n"


@pytest.mark.parametrize("first", ["A=b", "if", "while", "fi", "!"])
def test_the_first_word_is_always_a_program_name(first: str) -> None:
    """Bare, ``A=b`` would be an assignment and ``if`` a keyword."""
    line = remote_command([first])
    assert line.startswith("'"), line
    r = _sh(line)
    assert r.returncode == 127, (line, r.returncode, r.stderr)  # "not found", not a syntax error


def test_a_string_is_the_remote_command_as_it_is() -> None:
    assert remote_command("echo $HOME | wc -c") == "echo $HOME | wc -c"
    assert remote_command("") == ":"  # no command: ssh would open a login shell
    assert _sh(remote_command("printenv K", env={"K": "a b"})).stdout == "a b\n"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="runuser, as root (sshd's session is)")
def test_cwd_and_user_lines_run_where_and_as_whom_they_say(tmp_path: Path) -> None:
    # The host's own sh, users and runuser stand in for the guest's.
    show = "id -un; pwd; echo $HOME; printenv K"
    weird = tmp_path / "it's a $dir \\t"
    weird.mkdir()
    (tmp_path / "link").symlink_to(weird)
    r = _sh(remote_command(show, {"K": "v w"}, cwd=str(tmp_path / "link")))  # the real directory, as exec's
    assert (r.returncode, r.stdout) == (0, f"root\n{weird}\n{os.environ.get('HOME', '')}\nv w\n"), r.stderr
    nobody = pwd.getpwuid(65534)
    home = nobody.pw_dir if os.path.isdir(nobody.pw_dir) else "/"
    r = _sh(remote_command(show, {"K": "v"}, user="65534"))  # digits: a uid
    assert (r.returncode, r.stdout) == (0, f"{nobody.pw_name}\n{home}\n{nobody.pw_dir}\nv\n"), r.stderr
    r = _sh(remote_command(show, cwd=str(weird), user=nobody.pw_name))  # 0700 under root's tmp_path
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"cannot change directory to {weird}: Permission denied\n")
    (tmp_path / "file").touch()
    reasons = {"none": "No such file or directory", "file": "Not a directory", "file/x": "Not a directory"}
    for cwd, why in ((tmp_path / name, reason) for name, reason in reasons.items()):
        for user in (None, nobody.pw_name):  # as exec: root's view of the path (nobody may not search tmp_path)
            r = _sh(remote_command(show, cwd=str(cwd), user=user))  # the reason exec's chdir would give
            assert (r.returncode, r.stdout, r.stderr) == (2, "", f"cannot change directory to {cwd}: {why}\n"), user
    for unknown in ("nobody-here; echo injected", " 0", "+0", "-0"):  # getent reads " 0" as uid 0
        r = _sh(remote_command("echo ran", user=unknown))
        assert (r.returncode, r.stdout, r.stderr) == (1, "", "no such user in the guest\n"), unknown


def test_ssh_users_are_names_or_uids_as_exec_reads_them() -> None:
    assert [check_user(u) for u in (None, "bob", 7, "12", "\u0662")] == [None, "bob", "7", "12", "2"]
    with pytest.raises(SpecError, match="no such user in the guest: '\u00b2'"):  # a digit, no number
        check_user("\u00b2")
    for bad in (True, -1, "", "a\0b", 1.5, b"bob"):
        with pytest.raises(SpecError, match="user must be a user name or a uid"):
            check_user(bad)


def test_bytes_are_utf8_text_as_exec_takes_them() -> None:
    """ssh(b"...") once sent the bytes' numbers as words ('101' 99 104...)."""
    assert remote_command(b"echo hi") == "echo hi"  # type: ignore[arg-type]
    r = _sh(remote_command([*SHOW_ARGV, b"a b", bytearray(b"\xc3\xa9")]))  # type: ignore[list-item]
    assert r.stdout == repr((["a b", "\u00e9"], None)) + "\n", r.stderr


@pytest.mark.parametrize(
    ("cmd", "error"), [([], SpecError), ([b"\xff"], TypeError), (b"\xff", TypeError), (3, TypeError)]
)
def test_a_command_exec_refuses_ssh_refuses(cmd: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        remote_command(cmd)  # type: ignore[arg-type]


def test_env_reaches_the_whole_line_as_exec_env_does() -> None:
    line = remote_command('echo "$K"; cd /tmp && printenv K', env={"K": "it's $x"})
    assert _sh(line).stdout == "it's $x\nit's $x\n"


@pytest.mark.parametrize("env", [{"A B": "x"}, {"1A": "x"}, {"A=B": "x"}, {"": "x"}, {"A": 1}, {"A": "x\0y"}])
def test_env_that_a_shell_cannot_take_is_refused_before_ssh_runs(env: dict[str, object]) -> None:
    with pytest.raises(SpecError):
        remote_command("true", env=env)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "path"),
    [
        ("/plain/path", "/plain/path"),
        ("/cache\\040dir/with\\040spaces", "/cache dir/with spaces"),
        ("/tab\\011and\\012newline", "/tab\tand\nnewline"),
        ("/back\\134slash", "/back\\slash"),
        ("/not\\08octal\\x", "/not\\08octal\\x"),
    ],
)
def test_mount_fields_are_unescaped(field: str, path: str) -> None:
    assert unescape_mount_field(field) == path


def test_unescaping_undoes_what_the_kernel_writes() -> None:
    """The kernel's mangle(): space, tab, newline and backslash as 3-digit octal."""
    odd = "/a dir\twith\\ all\nof them"
    escaped = "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in odd)
    assert "\\" not in escaped.replace("\\040", "").replace("\\011", "").replace("\\012", "").replace("\\134", "")
    assert unescape_mount_field(escaped) == odd


MOUNTINFO = b"""\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
43 27 0:39 / /c\\040dir/.tmp-x-1/r/dev/pts rw,nosuid - devpts none rw,mode=620
44 27 0:27 / /c\\040dir/.tmp-x-1/r/dev/shm rw,relatime - tmpfs tmpfs rw
45 27 0:22 / /c\\040dir/.tmp-x-1/r/sys ro,nosuid - sysfs sys rw
46 27 0:40 / /c\\040dir/.tmp-x-1/r/proc ro,relatime - proc proc ro
47 46 0:41 / /c\\040dir/.tmp-x-1/r/proc/sys/fs/binfmt_misc rw - binfmt_misc binfmt_misc rw
48 45 0:42 / /c\\040dir/.tmp-x-1/r/sys rw - tmpfs tmpfs rw
49 27 0:43 / /c\\040dir/.tmp-x-10/r/proc rw - proc proc rw
50 27 0:44 / /c\\040dir/.tmp-x-1 rw - tmpfs tmpfs rw
51 27 0:45 / /back\\134slash\\011tab rw - tmpfs tmpfs rw
52 27 0:46 / /odd\rcr\x0bvt\x0cff\x1cfs\x1dgs\x1ers\xc2\x85nel\xe2\x80\xa8ls\xe2\x80\xa9ps\xffraw rw - tmpfs t rw
"""


def test_mountinfo_mount_points_are_read_unescaped() -> None:
    points = parse_mount_points(MOUNTINFO)
    assert points[0] == "/" and points[1] == "/c dir/.tmp-x-1/r/dev/pts"
    assert points[-2] == "/back\\slash\ttab" and len(points) == 11


def test_mountinfo_lines_end_at_a_newline_only() -> None:
    """The kernel leaves all but space, tab, newline and backslash raw: a
    \\r, \\x0b, \\x0c, \\x1c-\\x1e, U+0085, U+2028/9 (all line ends to
    ``splitlines``) or a byte that is not UTF-8 is part of the name."""
    odd = "/odd\rcr\x0bvt\x0cff\x1cfs\x1dgs\x1ers\x85nel\u2028ls\u2029ps" + os.fsdecode(b"\xffraw")
    assert parse_mount_points(MOUNTINFO)[-1] == odd
    assert os.fsencode(odd).endswith(b"\xffraw")


def test_mounts_below_a_path_come_deepest_first_once_per_mount() -> None:
    """Children before their parents (a parent detached first would take the
    children's paths away); a point with two mounts on it comes twice (each
    detach by path takes the top one).  Neither the path itself nor a
    sibling sharing its prefix (-10) counts."""
    r = "/c dir/.tmp-x-1/r"
    order = below(parse_mount_points(MOUNTINFO), "/c dir/.tmp-x-1/")
    assert order[:3] == [f"{r}/proc/sys/fs/binfmt_misc", f"{r}/dev/shm", f"{r}/dev/pts"]
    assert sorted(order[3:]) == [f"{r}/proc", f"{r}/sys", f"{r}/sys"]
    assert below(parse_mount_points(MOUNTINFO), "/c dir/.tmp-x-1") == order
    assert below(parse_mount_points(MOUNTINFO), "/c dir/.tmp-x") == []


@pytest.mark.parametrize("socket", ["/run/x/agent.sock", None])
def test_the_keep_message_offers_a_shell_only_if_the_agent_is_served(socket: str | None) -> None:
    kept = SimpleNamespace(
        name="btl-1", pid=7, console_log_path="c.log", ssh_config="ssh.cfg", agent_socket=socket, kept=True
    )
    text = keep_message(kept)  # type: ignore[arg-type]
    assert ("bottle shell btl-1" in text) == (socket is not None) and "bottle stop btl-1" in text
    stopped = keep_message(SimpleNamespace(name="btl-2", kept=False))  # type: ignore[arg-type]
    assert stopped.startswith("btl-2: not kept: it had stopped") and "bottle stop" not in stopped
