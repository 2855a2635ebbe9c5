"""Build an image: mmdebstrap → directory → ``mkfs.ext4 -d`` → raw ext4 + kernel + initrd.

Everything happens inside one mmdebstrap run (format ``null``) whose hooks lay
the guest files in and write the artifacts out, so the same code path works as
root and, through ``--mode=unshare``, as an ordinary user.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import ImageBuildError
from ..host.deps import require
from ..host.groups import killed_with_owner
from ..vmm.process import die_with
from .guest_files import write_early_files, write_guest_files
from .recipes import BUILDER_VERSION, Recipe
from .sources import host_sources

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]

CUSTOMIZE = """\
set -eu
root="$1"
out={out}
dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${{Package}}\\t${{Version}}\\n' > "$out/packages.tsv"
kver=$(ls "$root/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -n 1)
[ -n "$kver" ] || {{ echo "E: the image has no kernel in /boot" >&2; exit 1; }}
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$out/initrd.img"
echo "$kver" > "$out/kernel-version"
# The agent's bytecode, compiled by the guest's own python3.
chroot "$root" python3 -m compileall -q /usr/lib/pytest-bottle
# systemd's ConditionNeedsUpdate units (sysusers, the journal's catalog, ldconfig)
# run at the first boot after /usr changed, and trixie's at every cold boot (a
# seed, a derived build, boot="cold"): 1.7 s of CPU.  The packages' scripts have
# done their work already (run again, they change no byte): stamps as new as
# /usr say so, as on a stock machine after its first boot.
for d in etc var; do
  echo "TIMESTAMP_NSEC=$(date -r "$root/usr" +%s%N)" > "$root/$d/.updated"
  touch -r "$root/usr" "$root/$d/.updated"
done
# Host keys and machine-id are per bottle: handed out at the clone handshake.
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
# mmdebstrap undoes its build-time measures only after this hook; the image
# is made here, so undo them now (services must start on install in a bottle).
rm -f "$root/usr/sbin/policy-rc.d"
if [ -e "$root/sbin/start-stop-daemon.REAL" ]; then
  mv "$root/sbin/start-stop-daemon.REAL" "$root/sbin/start-stop-daemon"
fi
rm -rf "$root"/var/lib/apt/lists/*_* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/tmp/*
mv "$root/etc/apt/apt.conf.d/00mmdebstrap" "$out/00mmdebstrap"
echo "I: creating ext4 image"
# mkfs.ext4 -d must not copy the /proc, /sys and /dev mmdebstrap mounted for
# its hooks: unmount them in a private mount namespace.
unshare --mount --propagation private sh {mkfs} "$root" "$out/rootfs.ext4" {size}
mv "$out/00mmdebstrap" "$root/etc/apt/apt.conf.d/00mmdebstrap"  # mmdebstrap removes it itself
"""

# Run by CUSTOMIZE in its own mount namespace: $1 root, $2 image file, $3 size.
MKFS = r"""set -eu
# /proc/self/mounts writes a space or tab in a path as \040 or \011 (a cache
# dir may have spaces): compare escaped, unescape for umount.
R=$(printf '%s/' "$1" | sed -e 's/ /\\040/g' -e 's/\t/\\011/g') \
  awk 'index($2, ENVIRON["R"]) == 1 {print $2}' /proc/self/mounts | sort -r |
  while read -r m; do umount -l "$(printf '%b' "$m")"; done
mkfs.ext4 -q -F -L bottle-root -d "$1" "$2" "$3"
"""

TAIL_LINES = 40


def build(recipe: Recipe, out: Path, progress: Progress | None = None) -> dict[str, object]:
    """Build ``recipe`` into the empty directory ``out``; return its manifest."""
    mmdebstrap = require("mmdebstrap", "build images")
    require("mkfs.ext4", "build images")
    unshare = require("unshare", "build images")
    started = time.monotonic()
    argv = _mmdebstrap_argv(mmdebstrap, recipe, _prepare_work(recipe, out))
    if os.geteuid() == 0:
        # As root mmdebstrap mounts proc, sysfs, devpts and a bind of the host's
        # /dev/shm under its root: in a mount namespace of its own they end with its
        # last process, so a build killed with -9 leaves none for an `rm -rf` of the
        # cache to delete through.  (As a user, --mode=unshare has its own already.)
        argv = [unshare, "--mount", "--propagation", "private", *argv]  # it execs: the pid stays mmdebstrap's
    log_path = out / "build.log"
    log.debug("building %s: %s", recipe.name, argv)
    rc = _run_logged(argv, out / ".work" / "tmp", log_path, progress, started)
    if rc != 0:
        raise ImageBuildError(recipe.name, f"mmdebstrap exited with {rc}", _tail(log_path), str(log_path))
    missing = [f for f in ("rootfs.ext4", "vmlinuz", "initrd.img") if not (out / f).is_file()]
    if missing:
        raise ImageBuildError(
            recipe.name, f"the build produced no {', '.join(missing)}", _tail(log_path), str(log_path)
        )
    return _manifest(recipe, out, started)


def _prepare_work(recipe: Recipe, out: Path) -> Path:
    """Lay out ``out/.work``: the files the hooks copy in, and the scripts they run."""
    work = out / ".work"
    pre, files, tmp = work / "pre", work / "files", work / "tmp"
    for d in (pre, files, tmp):
        d.mkdir(parents=True)
    write_early_files(recipe, pre)
    write_guest_files(recipe, files)
    (work / "mkfs.sh").write_text(MKFS)
    customize = CUSTOMIZE.format(
        out=shlex.quote(str(out)), mkfs=shlex.quote(str(work / "mkfs.sh")), size=recipe.disk_size
    )
    (work / "customize.sh").write_text(customize)
    return work


def _mmdebstrap_argv(mmdebstrap: str, recipe: Recipe, work: Path) -> list[str]:
    mirrors: list[str] = []
    if recipe.mirror:
        mirrors = [recipe.mirror]
    elif sources := host_sources(recipe.suite):
        (work / "host.sources").write_text(sources)
        mirrors = [str(work / "host.sources")]
    return [
        mmdebstrap,
        f"--mode={'root' if os.geteuid() == 0 else 'unshare'}",
        f"--variant={recipe.variant}",
        f"--include={','.join(recipe.packages)}",
        # mmdebstrap splits these like a shell: paths are quoted (a cache dir may have spaces).
        f"--setup-hook=sync-in {shlex.quote(str(work / 'pre'))} /",
        f"--customize-hook=sync-in {shlex.quote(str(work / 'files'))} /",
        f'--customize-hook=sh {shlex.quote(str(work / "customize.sh"))} "$1"',
        recipe.suite,
        "/dev/null",
        *mirrors,
    ]


def _run_logged(argv: list[str], tmp: Path, log_path: Path, progress: Progress | None, started: float) -> int:
    """Run mmdebstrap with its output in ``log_path`` and its "I:" lines as progress; its exit code."""
    env = dict(os.environ, TMPDIR=str(tmp), LC_ALL="C.UTF-8")
    env.pop("DEBIAN_FRONTEND", None)
    with open(log_path, "w") as logf:
        logf.write("$ " + " ".join(argv) + "\n")
        logf.flush()
        with subprocess.Popen(  # closes its pipe on the way out, whichever way that is
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            # A group of its own, killed with us (host.groups): apt, dpkg and the packages'
            # scripts too.  What it mounted goes with its mount namespace (above).
            process_group=0,
            preexec_fn=functools.partial(die_with, os.getpid(), signal.SIGKILL),
        ) as proc:
            assert proc.stdout is not None
            try:
                with killed_with_owner(proc.pid):
                    for line in proc.stdout:
                        logf.write(line)
                        if progress and line.startswith("I: "):
                            progress(line[3:].strip(), time.monotonic() - started)
                    _exited(proc, None)  # not reaped yet: its group id is not free while the watcher is armed
            except BaseException:  # interrupted: stop the build before its directory goes
                _end_group(proc)
                raise
            return proc.wait()


def _exited(proc: subprocess.Popen[str], timeout: float | None) -> bool:
    """Whether ``proc`` has exited (within ``timeout``, None: wait), without reaping it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    flags = os.WEXITED | os.WNOWAIT
    if deadline is None:
        os.waitid(os.P_PID, proc.pid, flags)
        return True
    while os.waitid(os.P_PID, proc.pid, flags | os.WNOHANG) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _end_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the build's group (mmdebstrap then unmounts what it mounted; a
    terminal's Ctrl-C does not reach the group), SIGKILL to what is left after 60 s."""
    if proc.returncode is None:  # not reaped: the group id is still its own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        _exited(proc, 60)
        with contextlib.suppress(ProcessLookupError):  # its children, or itself if it did not stop
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _manifest(recipe: Recipe, out: Path, started: float) -> dict[str, object]:
    packages = dict(line.split("\t", 1) for line in (out / "packages.tsv").read_text().splitlines() if "\t" in line)
    (out / "packages.tsv").unlink()
    return {
        "name": recipe.name,
        "key": recipe.key(),
        "builder_version": BUILDER_VERSION,
        "recipe": json.loads(json.dumps(recipe.__dict__, default=list)),
        "kernel_version": (out / "kernel-version").read_text().strip(),
        "sizes": {f: (out / f).stat().st_size for f in ("rootfs.ext4", "vmlinuz", "initrd.img")},
        "allocated_bytes": (out / "rootfs.ext4").stat().st_blocks * 512,
        "build_seconds": round(time.monotonic() - started, 2),
        "created": time.time(),
        "packages": packages,
    }


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-TAIL_LINES:])
    except OSError:
        return ""
