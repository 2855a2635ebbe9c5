"""Running a derived image's steps: restore the parent's build seed (its boot,
made once per parent) with egress, run each step through the agent, clean
up, power off.

The machine runs inside the tmp entry directory on a copy of the seed's disk
(the parent plus what its boot wrote), so the overlay it writes is rebased
onto the parent's disk at the end: ``disk.qcow2`` is then the new layer and
names its backing by a relative path, as a layer booted from the parent
would.  During the build the guest has egress (user networking, not
restricted) and a nameserver; what the build machine's identity left on the
disk (hostname, machine-id, resolv.conf, SSH host keys) is put back or
removed before it powers off, since every bottle gets its own at its handshake.
"""

from __future__ import annotations

import functools
import logging
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ..agent.channel import AgentChannel
from ..agent.client import SETUP_TIMEOUT, AgentClient
from ..agent.handshake import Handshake, NicSetup
from ..agent.streams import OutputTail
from ..agent.transfer import put
from ..errors import BootError, BootTimeout, BottleError, ImageBuildError
from ..host.deps import require, which
from ..lifecycle.boot import backing_name, forget_attempt, seed_fault, start_machine
from ..store.saved import SavedState, discard, in_use
from ..store.seeds import BUILD, BUILD_MAC, BUILD_NIC, USER_NET, ensure_seed
from ..vmm.backend import CONSOLE, DISK, Machine, console_tail
from ..vmm.qemu import Accel, MachineConfig, Restore
from . import builder, failures
from .cache import BuiltImage
from .copied import COPY_SKIP, tree_digest
from .guest_files import sshd_script
from .image import Copy, Image, Install, Run, Step, Write, count_steps

log = logging.getLogger(__name__)

BUILD_MEMORY_MB = 1024
# Not failures.CONSOLE, which ends the part of a log an error quotes.
FIRST_CONSOLE = "--- console of the boot before ---"
BUILD_CONSOLE_LINES = 2000  # a failed build's log has the whole boot, not the error's 60-line tail
BOOT_TIMEOUT = 300.0
STEP_TIMEOUT = 3600.0  # a step with no timeout of its own
REPLY_GRACE = 15.0  # past a step's timeout, for the guest to kill it and answer (a loaded host is slow)
OUTPUT_CAP = 1 << 20
TAIL_LINES = 40
MAC = BUILD_MAC  # the build seed's NIC already has it
BASE = "seed-disk.qcow2"  # the build seed's disk, copied: the machine's overlay sits on it until the rebase
NET = USER_NET
RESOLV_BUILD = "nameserver 10.0.2.3\n"
IDENTITY = ("hostname", "resolv.conf", "machine-id")
SAVED = "/run/bottle-build"
SSHD_FOUND = "pytest-bottle: sshd found"

# Saved before the handshake writes the build machine's identity, put back after the steps.
# Timers stop first: the handshake moves the restored clock from the build seed's boot to now,
# and a timer whose time passed meanwhile would run during the build (a cold boot runs none).
SAVE_IDENTITY = (
    "systemctl stop '*.timer' >/dev/null 2>&1 || :; "
    f"mkdir -p {SAVED} && for f in {' '.join(IDENTITY)}; do cp -a /etc/$f {SAVED}/ 2>/dev/null || :; done"
)
# /tmp is emptied at every boot anyway (bookworm's tmpfiles `D /tmp`, trixie's tmpfs); /var/tmp
# outlives boots on Debian, so what the steps left there stays (only the build
# boot's own PrivateTmp directories go).
CLEANUP = f"""set -u
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /tmp/* /var/tmp/systemd-private-*
rm -f /etc/ssh/ssh_host_*
for f in {" ".join(IDENTITY)}; do
  if [ -e {SAVED}/$f ] || [ -L {SAVED}/$f ]; then rm -f /etc/$f; cp -a {SAVED}/$f /etc/$f; fi
done
sync
fstrim -v / || true
sync
"""

Log = Callable[[str], None]


def provision(
    image: Image,
    parent: BuiltImage,
    cache_dir: Path,
    tmp: Path,
    progress: builder.Progress | None = None,
    accel: Accel = "tcg",
) -> bool:
    """Leave in ``tmp`` the layer ``disk.qcow2``: ``parent`` with ``image``'s steps applied,
    booted with ``accel`` (the one its bottles use).  Returns whether the layer has sshd."""
    _check_sources(image)
    started = time.monotonic()
    name = f"build-{image.key[:12]}"
    with open(tmp / "build.log", "w") as logf:

        def note(line: str) -> None:
            logf.write(line + "\n")
            logf.flush()
            if progress is not None:
                progress(line, time.monotonic() - started)

        logf.write(f"building {image.display_name} on {parent.name} ({count_steps(image)})\n")  # the task says it

        def again(first: BootError, run_dir: Path) -> None:
            note(f"the build machine: {first.reason}; booting it once more")
            _log_console(logf, run_dir / CONSOLE, FIRST_CONSOLE)

        try:
            machine, channel, seed = _restore(parent, cache_dir, tmp, name, accel, again, image.display_name)
        except BootError as e:
            if (tmp / CONSOLE).exists():  # the restore's
                _log_console(logf, tmp / CONSOLE)
            else:  # the seed's boot: its console went with its tmp entry
                logf.write(f"\n{failures.CONSOLE}\n{e.console_tail}\n")
            raise ImageBuildError(image.display_name, f"the build machine: {e.reason}", _tail(e.console_tail)) from None
        logf.write(f"restored the build seed {seed.path.name}\n")
        try:
            agent = AgentClient(channel)
            _shell(agent, SAVE_IDENTITY, logf, "save identity", 60)
            nics = [NicSetup(MAC, MAC, ip=NET["ip"], gateway=NET["gateway"])]
            agent.setup(Handshake.fresh(name, nics, baked={"resolv_conf": RESOLV_BUILD}), timeout=SETUP_TIMEOUT)
            try:  # steps on a half-booted machine race its own units (apt's locks, for one)
                agent.settle(timeout=BOOT_TIMEOUT, quiet=0)
            except BootTimeout as e:
                raise ImageBuildError("", f"the build machine: {e.reason}") from None
            _run_steps(image, agent, logf, note)
            has_sshd = _set_up_sshd(agent, parent, logf, note)
            note("cleaning up: apt caches and lists, temporary files, fstrim")
            _shell(agent, CLEANUP, logf, "clean up", 600)
            _power_off(agent, machine, logf)
        except ImageBuildError as e:
            _log_console(logf, machine.console_log)
            raise ImageBuildError(e.name if e.name else image.display_name, e.reason, e.log_tail) from None
        finally:
            machine.stop()
            channel.close()
        note("folding the seed's boot into the layer")
        try:
            _rebase(tmp / DISK, parent, tmp, image.display_name)
        except ImageBuildError as e:
            note(e.reason)
            raise
    for leftover in tmp.iterdir():  # the machine's run files: only the layer and the log stay
        if leftover.name not in ("disk.qcow2", "build.log") and (leftover.is_file() or leftover.is_socket()):
            leftover.unlink()
    return has_sshd


def _restore(
    parent: BuiltImage,
    cache_dir: Path,
    tmp: Path,
    name: str,
    accel: Accel,
    again: Callable[[BootError, Path], None],
    image_name: str,
) -> tuple[Machine, AgentChannel, SavedState]:
    """The build machine: the parent's build seed restored in ``tmp`` (made
    first if need be), its disk a copy of the seed's.  A seed that does not
    restore is made again once, as for a bottle."""
    root = parent.root or parent
    for attempt in (1, 2):
        state = ensure_seed(parent, accel, BUILD_MEMORY_MB, 1, 1, cache_dir, purpose=BUILD, on_retry=again)
        try:
            with in_use(state):  # no pruner removes it before the copy and QEMU have its files
                _copy_disk(state, parent, tmp, image_name)
                cfg = MachineConfig(
                    kernel=root.kernel,
                    initrd=root.initrd,
                    disk=parent.disk,
                    disk_format=parent.disk_format,
                    memory_mb=BUILD_MEMORY_MB,
                    accel=accel,
                    nics=(BUILD_NIC,),
                    restore=Restore(state.memory, tmp / BASE, state.ram, state.console),
                )
                return (*start_machine(cfg, tmp, name, BOOT_TIMEOUT), state)
        except BootError as e:
            fault = seed_fault(state, e)
            if attempt == 2 or fault is None:
                raise
            discard(state, fault)
            forget_attempt(tmp)
            (tmp / BASE).unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _copy_disk(state: SavedState, parent: BuiltImage, tmp: Path, image_name: str) -> None:
    """The seed's disk in ``tmp``, naming the parent's disk from there (a
    rename of the same backing file: its contents do not change)."""
    shutil.copyfile(state.disk, tmp / BASE)
    rename = ["rebase", "-u", "-f", "qcow2", "-F", parent.disk_format, "-b", backing_name(parent.disk, tmp)]
    _qemu_img([*rename, str(tmp / BASE)], image_name)


def _rebase(layer: Path, parent: BuiltImage, tmp: Path, image_name: str) -> None:
    """Fold what the seed's boot wrote into ``layer`` and put it on the parent's disk."""
    if not parent.disk.is_file():  # removed meanwhile: ensure_derived says so, and records nothing
        raise ImageBuildError(image_name, f"its parent's disk {parent.disk} is gone")
    fold = ["rebase", "-f", "qcow2", "-F", parent.disk_format, "-b", backing_name(parent.disk, tmp)]
    _qemu_img([*fold, str(layer)], image_name)
    (tmp / BASE).unlink()


def _qemu_img(args: list[str], image_name: str) -> None:
    r = subprocess.run([require("qemu-img", "build derived images"), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise ImageBuildError(image_name, f"qemu-img {args[0]} failed: {r.stderr.strip()[-500:]}")


def _log_console(logf: IO[str], path: Path, header: str = failures.CONSOLE) -> None:
    """The machine's whole console (up to 64 KiB, a boot's is ~30 KB) into the build log."""
    logf.write(f"\n{header}\n" + console_tail(path, BUILD_CONSOLE_LINES) + "\n")


def _check_sources(image: Image) -> None:
    """What a ``.copy`` sends must be what its key hashed when the Image was
    made: else the layer would be cached under a key that does not describe it."""
    for index, step in enumerate(image.steps, 1):
        _check_source(image, index, step)


def _check_source(image: Image, index: int, step: Step) -> None:
    if isinstance(step, Copy) and tree_digest(step.src, step.exclude) != step.digest:
        raise ImageBuildError(
            image.display_name,
            f"step {index}/{len(image.steps)} ({step.describe()}): the source changed after the Image was made; "
            "make the Image again (its key then covers what is copied)",
        )


def _run_steps(image: Image, agent: AgentClient, logf: IO[str], note: Log) -> None:
    updated = False
    count = len(image.steps)
    for index, step in enumerate(image.steps, 1):
        note(f"step {index}/{count}: {step.describe()}")
        try:
            if isinstance(step, Install) and not updated:
                _shell(agent, f"apt-get {_apt_options()} update", logf, "apt-get update", 900)
                updated = True
            _step(agent, step, logf)
            _check_source(image, index, step)  # after its copy: what went in is what the key hashed
        except _StepFailed as e:
            raise ImageBuildError(
                image.display_name,
                f"step {index}/{count} ({step.describe()}) {e.how()}",
                _tail(e.output),
            ) from None
        except ImageBuildError:
            raise
        except BottleError as e:  # a write or copy refused, an agent timeout: still name the step
            raise ImageBuildError(
                image.display_name, f"step {index}/{count} ({step.describe()}) failed: {type(e).__name__}: {e}"
            ) from None


def _set_up_sshd(agent: AgentClient, parent: BuiltImage, logf: IO[str], note: Log) -> bool:
    """Whether the layer has sshd.  One the steps installed on a parent without
    it runs as the root images' does, each bottle with its own host key."""
    setup = "" if parent.has_sshd else sshd_script(parent.recipe)
    try:
        found = _shell(agent, f"[ -x /usr/sbin/sshd ] || exit 0\n{setup}echo {SSHD_FOUND}", logf, "set up sshd", 120)
    except _StepFailed as e:
        raise ImageBuildError("", f"setting up the sshd the steps installed {e.how()}", _tail(e.output)) from None
    has_sshd = SSHD_FOUND in found.splitlines()
    if has_sshd and setup:
        note("sshd: one per connection, as in the root images (the bottles get SSH access)")
    return has_sshd


class _StepFailed(Exception):
    def __init__(self, rc: int, output: str, killed_after: float | None = None) -> None:
        super().__init__(rc, output)
        self.rc, self.output, self.killed_after = rc, output, killed_after

    def how(self) -> str:
        """How it ended, for the error's reason."""
        if self.killed_after is not None:
            return f"was killed after its timeout of {self.killed_after:g} s"
        return f"exited with {self.rc}"


def _step(agent: AgentClient, step: Step, logf: IO[str]) -> None:
    if isinstance(step, Install):
        packages = " ".join(shlex.quote(p) for p in step.packages)
        command = f"apt-get {_apt_options()} install -y --no-install-recommends {packages}"
        _shell(agent, command, logf, step.describe(), STEP_TIMEOUT)
    elif isinstance(step, Run):
        _shell(agent, step.command, logf, step.describe(), step.timeout or STEP_TIMEOUT, dict(step.env))
    elif isinstance(step, Write):
        _mkdir_parent(agent, step.path, logf)
        agent.write(step.path, step.data, mode=step.mode, timeout=120)
    elif isinstance(step, Copy):
        _copy(agent, step, logf)


def _copy(agent: AgentClient, step: Copy, logf: IO[str]) -> None:
    """As ``Bottle.put`` does it (a trailing ``/`` means inside), except that a
    directory ``dst`` it makes is 0755: a source in a 0700 temporary
    directory must not make ``/srv/site`` unreadable to a service's user."""
    if step.src.is_dir():
        _shell(agent, f"mkdir -p {shlex.quote(step.dst)}", logf, "mkdir", 60)
    logf.write(f"copy {step.src} -> {step.dst}\n")
    put(agent, step.src, step.dst, STEP_TIMEOUT, COPY_SKIP + step.exclude)


def _mkdir_parent(agent: AgentClient, path: str, logf: IO[str]) -> None:
    parent = path.rstrip("/").rsplit("/", 1)[0] or "/"
    _shell(agent, f"mkdir -p {shlex.quote(parent)}", logf, "mkdir", 60)


def _shell(
    agent: AgentClient, command: str, logf: IO[str], what: str, timeout: float, env: dict[str, str] | None = None
) -> str:
    """Run ``command`` as root with ``/bin/sh -c``; its output goes to the log
    as it comes, all of it, stdout and stderr as they came; ``_StepFailed`` if it
    fails.  Returns the output (its last ``OUTPUT_CAP`` bytes)."""
    logf.write(f"$ {command}\n")
    run_env = {"DEBIAN_FRONTEND": "noninteractive", **(env or {})}
    tail = OutputTail(OUTPUT_CAP)  # a verbose step says why it failed at its end, past any first MiB

    def seen(stream: str, text: str) -> None:
        logf.write(text)
        tail.add(text.encode())

    run = agent.exec(
        ["/bin/sh", "-c", command], env=run_env, cwd="/", user=None, timeout=timeout, stdin=None, cap=OUTPUT_CAP,
        on_output=seen, all_output=True,  # a step killed at its timeout: its last words are in the log too
    )  # fmt: skip
    reply = run.finish(REPLY_GRACE, what)
    output = tail.text()
    logf.write("" if output.endswith("\n") or not output else "\n")
    rc = -1 if reply.timed_out else reply.rc
    logf.write(f"[exit {rc}{' (timed out)' if reply.timed_out else ''}]\n")
    logf.flush()
    if rc != 0:
        killed = timeout if reply.timed_out else None
        if killed is not None:  # its last words, then why they were the last
            output += ("\n" if output and not output.endswith("\n") else "") + f"(killed after {timeout:g} s)"
        raise _StepFailed(rc, output, killed)
    return output


def _power_off(agent: AgentClient, machine: Machine, logf: IO[str]) -> None:
    """A clean shutdown: the file system unmounted, QEMU exits (-no-reboot)."""
    logf.write("powering off\n")
    agent.exec(
        ["/bin/sh", "-c", "(sleep 0.2; systemctl poweroff) >/dev/null 2>&1 &"],
        env={},
        cwd="/",
        user=None,
        timeout=30,
        stdin=None,
        cap=OUTPUT_CAP,
    ).finish(REPLY_GRACE, "poweroff")
    if machine.wait(BOOT_TIMEOUT) is None:
        raise ImageBuildError("", "the build machine did not power off", console_tail(machine.console_log))


@functools.cache
def _apt_options() -> str:
    """The host's apt says archives may be past their Valid-Until (a snapshot
    archive): the guest, which uses the host's sources, needs the same."""
    apt_config = which("apt-config")
    if apt_config is None:
        return ""
    try:
        out = subprocess.run(
            [apt_config, "shell", "V", "Acquire::Check-Valid-Until"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return "-o Acquire::Check-Valid-Until=false" if "false" in out.lower() else ""


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-TAIL_LINES:])
