"""Real OpenSSH access to a bottle: a per-cache client key, per-bottle host keys, a config file.

The host key is generated on the host and handed to the guest at the clone
handshake, so the known_hosts entry is pinned from the first connection —
no ``StrictHostKeyChecking=no``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import arguments
from .arguments import GuestPath, check_env, check_input, check_timeout, guest_path
from .errors import BottleError, ExecTimeout, SpecError
from .host.deps import require, which
from .host.locks import reporting_lock
from .host.paths import remove_tree, write_private
from .host.runstate import create_run_dir
from .results import OUTPUT_CAP, CappedOutput, Command, ExecResult, as_command, to_argv

CONFIG_TEMPLATE = """\
Host {name}
    HostName {host}
    Port {port}
    User root
    IdentityFile {identity}
    IdentitiesOnly yes
    UserKnownHostsFile {known_hosts}
    GlobalKnownHostsFile /dev/null
    HostKeyAlias {name}
    StrictHostKeyChecking yes
    CheckHostIP no
    BatchMode yes
    PasswordAuthentication no
    ConnectTimeout 60
    ServerAliveInterval 15
    ServerAliveCountMax 4
    LogLevel ERROR
    KexAlgorithms -sntrup*,mlkem*
"""
# KexAlgorithms: OpenSSH's default list without its post-quantum hybrids (a
# removal list: names this client does not know are no error).  sntrup761 cost the
# first connection into a bottle under emulation 0.3 s (bookworm) to 0.5 s (trixie)
# more (bench/releases.py), and the connection never leaves this host.  A user's
# -o KexAlgorithms=... comes first and wins.


def client_key(cache_dir: Path) -> Path:
    """The cache's ed25519 client key (mode 0600), created once."""
    keys = cache_dir / "keys"
    key = keys / "id_ed25519"
    if key.is_file() and key.with_suffix(".pub").is_file():
        return key
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    with reporting_lock(keys / ".lock", "the client key"):
        if not key.is_file():
            with _keygen("pytest-bottle", cache_dir / "run") as made:  # moved, not copied: see _keygen
                os.replace(made.with_suffix(".pub"), key.with_suffix(".pub"))
                os.replace(made, key)
    key.chmod(0o600)
    return key


def new_host_key(comment: str, scratch: Path) -> tuple[str, str] | None:
    """A fresh ed25519 host key pair (private, public); None without ssh-keygen.
    ``scratch``: see ``_key_pair``."""
    if which("ssh-keygen") is None:
        return None
    return _key_pair(comment, scratch)


def _key_pair(comment: str, scratch: Path) -> tuple[str, str]:
    """A fresh ed25519 key pair (private, public) from ssh-keygen."""
    with _keygen(comment, scratch) as path:
        return path.read_text(), path.with_suffix(".pub").read_text()


@contextlib.contextmanager
def _keygen(comment: str, scratch: Path) -> Iterator[Path]:
    """The path of a fresh ed25519 private key (the public one beside it, ``.pub``).

    ssh-keygen writes the pair to files.  They are made in a run directory of
    their own under ``scratch`` (the cache's ``run``, or a seed's build
    directory), marked with this process as its owner and removed on the way
    out: one killed meanwhile leaves the private key where the sweep removes
    it, not in ``/tmp``.
    """
    d = create_run_dir(scratch / f"keygen-{secrets.token_hex(6)}")
    try:
        path = d / "key"
        argv = [require("ssh-keygen", "make SSH keys"), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            if os.strerror(errno.ENOSPC) in r.stderr:  # named by the start as any write without room
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            raise BottleError(f"ssh-keygen failed ({r.returncode}): {r.stderr.strip()}")
        yield path
    finally:
        remove_tree(d)


@dataclass(frozen=True)
class SshAccess:
    name: str
    host: str
    port: int
    identity: Path
    config_path: Path

    @classmethod
    def create(cls, name: str, host: str, port: int, identity: Path, host_public_key: str, run_dir: Path) -> SshAccess:
        known = run_dir / "known_hosts"
        keytype, keydata = host_public_key.split()[:2]
        write_private(known, f"{name} {keytype} {keydata}\n")  # its error names the file (a full disk)
        config = run_dir / "ssh_config"
        identity_value, known_value = config_path_value(identity), config_path_value(known)
        text = CONFIG_TEMPLATE.format(name=name, host=host, port=port, identity=identity_value, known_hosts=known_value)
        write_private(config, text)
        return cls(name, host, port, identity, config)

    def argv(self, *args: str | os.PathLike[str]) -> list[str]:
        words = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in args]
        for a in words:
            if not isinstance(a, str):  # else subprocess fails on it, far from here
                raise TypeError(f"ssh_argv() arguments are str or path-like, not {type(a).__name__}: {a!r}")
        return [require("ssh", "reach bottles over SSH"), "-F", str(self.config_path), self.name, *words]

    def run(
        self,
        cmd: Command,
        *,
        check: bool = False,
        input: str | bytes | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: GuestPath | None = None,
        user: str | int | None = None,
        **kw: Any,
    ) -> ExecResult:
        """``cmd`` through the ssh client; its arguments are checked as ``exec`` checks
        them, before the client starts (``timeout=None``: as long as it runs)."""
        if kw:
            raise TypeError(f"ssh() does not take {', '.join(kw)}")
        cmd = as_command(cmd)
        check_timeout(timeout)
        remote = remote_command(cmd, env, cwd=None if cwd is None else guest_path(cwd, "cwd"), user=check_user(user))
        data = check_input(input)
        started = time.monotonic()
        rc, out, err = _run_capped(self.argv("--", remote), data, timeout)
        if rc is None:
            raise ExecTimeout(cmd, float(timeout or 0), _text(out.value()), _text(err.value()))
        if user is not None and rc == NO_USER_RC and _text(err.value()) == NO_USER + "\n":
            raise SpecError(f"{NO_USER}: {user!r}", "ssh()")
        result = ExecResult(cmd, rc, out.value(), err.value(), time.monotonic() - started)
        return result.check() if check else result


def _run_capped(
    argv: list[str], data: bytes | None, timeout: float | None
) -> tuple[int | None, CappedOutput, CappedOutput]:
    """``argv``'s exit code (None: killed at ``timeout``) and its output, each
    stream kept up to ``OUTPUT_CAP`` (what comes is the guest sshd's to choose)."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = CappedOutput(OUTPUT_CAP), CappedOutput(OUTPUT_CAP)
    threads = [
        threading.Thread(target=_drain, args=(f, o), daemon=True) for f, o in ((proc.stdout, out), (proc.stderr, err))
    ]
    if data is not None:
        threads.append(threading.Thread(target=_feed, args=(proc.stdin, data), daemon=True))
    for t in threads:
        t.start()
    rc: int | None = None
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass  # rc None: killed at its timeout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in threads:
            t.join(5)
    return rc, out, err


def _drain(pipe: IO[bytes] | None, into: CappedOutput) -> None:
    assert pipe is not None
    with pipe:
        while chunk := os.read(pipe.fileno(), 1 << 16):
            into.add(chunk)


def _feed(pipe: IO[bytes] | None, data: bytes) -> None:
    assert pipe is not None
    with contextlib.suppress(OSError), pipe:  # a command that does not read it all: its business
        pipe.write(data)


def config_path_value(path: Path) -> str:
    """A path as an ssh_config value: ``%`` doubled (IdentityFile and
    UserKnownHostsFile expand %-tokens); double-quoted, with ``"`` and ``\\``
    escaped, only when it needs it (spaces), so that simple paths stay plain
    for tools that read the file themselves."""
    text = str(path)
    if "\n" in text:
        raise BottleError(f"a path with a newline cannot go into an ssh_config: {text!r}")
    text = text.replace("%", "%%")
    if not re.search(r'[\s"\\#\']', text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_user(user: object) -> str | None:
    """``exec``'s ``user=``: a name or a uid; the guest says whether it exists."""
    user = arguments.check_user(user, "ssh()")
    if user is None or isinstance(user, int):
        return None if user is None else str(user)
    if not user.isdigit():
        return user
    if user.isdecimal():  # digits are a uid, as exec reads them ("٢" too)
        return str(int(user))
    raise SpecError(f"{NO_USER}: {user!r}", "ssh()")  # "²": a digit, but no number


# What the line says, and its exit, when getent knows no such user; the
# host then raises exec's SpecError, naming the user as it was given.
NO_USER, NO_USER_RC = "no such user in the guest", 1


def remote_command(
    cmd: Command, env: Mapping[str, str] | None = None, *, cwd: str | None = None, user: str | None = None
) -> str:
    """The line the remote shell runs: a string as it is, a list quoted word
    by word.  The first word is quoted even where it need not be: bare,
    ``A=b`` would be an assignment and ``if`` a keyword, not a program.
    ``env`` is exported first, so that the whole line sees it, as with ``exec``.

    ``cwd`` and ``user`` as ``exec`` has them: sshd logs in as root, so the line
    changes directory (exit 2 if it cannot, as ``exec``), and for ``user`` runs
    as that user through ``runuser`` (``HOME``, ``USER``, ``LOGNAME`` theirs), in
    their home unless ``cwd`` says otherwise (``/`` if they have none they may
    enter).  A name of digits is a uid, as with ``exec``."""
    argv = to_argv(cmd)  # exec's checks: bytes are UTF-8 text, an empty list is no command
    if isinstance(cmd, (str, bytes, bytearray)):
        remote = argv[-1]
    else:
        words = [shlex.quote(a) for a in argv]
        if words[0] == argv[0]:
            words[0] = f"'{words[0]}'"  # shlex left it bare, so it holds no quote
        remote = " ".join(words)
    env = check_env(env)
    for name in env:
        if not SHELL_NAME.fullmatch(name):
            raise SpecError(f"ssh env: {name!r} is not a shell variable name (letters, digits, _)")
    if env:
        remote = "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + "; " + remote
    remote = remote or ":"  # no command at all would have ssh open a login shell; exec("") runs nothing
    # -P: the real directory, as exec's chdir gives it (/var/run is /run).
    # printf, not echo: dash's echo would read backslashes in the path.  sh's
    # cd gives no errno; exec's message ends with chdir's strerror, and a stat
    # that follows links as chdir does ends its own with the same one.  As exec
    # does, root looks at the path first; then a user who cannot enter it is
    # refused with "Permission denied".
    check = ""
    if cwd is not None:
        failed, q = shlex.quote(f"cannot change directory to {cwd}"), shlex.quote(cwd)
        why = (
            f"if why=$(LC_ALL=C stat -L -- {q} 2>&1 >/dev/null); then "
            f"if [ -d {q} ]; then why='Permission denied'; else why='Not a directory'; fi; "
            "else why=${why##*: }; fi"
        )
        check = f"cd -P -- {q} 2>/dev/null || {{ {why}; printf '%s: %s\\n' {failed} \"$why\" >&2; exit 2; }}"
        if user is None:
            return f"{check}; {remote}"
        denied = shlex.quote(f"cannot change directory to {cwd}: Permission denied")
        remote = f"cd -P -- {q} 2>/dev/null || {{ printf '%s\\n' {denied} >&2; exit 2; }}; {remote}"
        check += "; "
    elif user is not None:
        remote = f'cd -P -- "$HOME" 2>/dev/null || cd /; {remote}'
    if user is None:
        return remote
    # getent takes " 0" or "+0" for uid 0 too: a name must come back as itself.
    key, unknown = shlex.quote(user), f"{{ printf '%s\\n' {shlex.quote(NO_USER)} >&2; exit {NO_USER_RC}; }}"
    same = "" if user.isdigit() else f' && [ "${{pw%%:*}}" = {key} ]'
    lookup = f"pw=$(getent passwd -- {key}){same} || {unknown}"
    return f'{lookup}; {check}exec runuser -u "${{pw%%:*}}" -- /bin/sh -c {shlex.quote(remote)}'
