"""The ``bottle`` command: doctor, run, shell, ps, stop, sweep; ``image`` and ``seed`` are in
``image_cli`` (export|import|key in ``transfer_cli``), ``snapshot`` in ``snapshot_cli``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from . import image_cli, snapshot_cli
from .arguments import check_timeout
from .errors import BottleError, SpecError, UnsafeDirectory, error_line
from .host import deps as hostdeps
from .host import progress, signals
from .host.paths import check_cache, check_cache_place, default_cache_dir, state_dir, tree_size
from .host.runstate import RunRecord
from .host.sweep import SweepReport, stop_vm, sweep
from .image_cli import age, mb
from .images import list_images
from .images.derived import list_derived
from .spec import DEFAULT_IMAGE, check_host_memory, resolve
from .store.seeds import BUILD, list_seeds
from .user_images import find_images
from .vmm import accel as accel_mod

# Without these nothing works; the rest only matters for SSH, LANs or disk space.
REQUIRED = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4", "unshare")


def cmd_doctor(args: argparse.Namespace) -> int:
    ok = True
    print("host programs:")
    for program, package in hostdeps.PROVIDERS.items():
        path = hostdeps.which(program)
        ok &= path is not None or program not in REQUIRED
        print(f"  {'ok ' if path else 'MISSING'} {program:20} {path or f'apt-get install {package}'}")
    cc, missing = hostdeps.core_toolchain()  # optional: without it the Python agent serves every restore
    fix = "" if missing.startswith("not an") else ": apt-get install gcc libc6-dev (then images get the agent's core)"
    where = cc or f"{missing}{fix}"
    print(f"  {'ok ' if cc else 'absent '} {'cc (optional)':20} {where}")
    have_qemu = hostdeps.which("qemu-system-x86_64") is not None
    print(f"qemu: {accel_mod.qemu_version() if have_qemu else 'not installed'}")
    why = accel_mod.kvm_usable()
    # As a run decides: no verdict for this run (a definite one, or this xdist run's inconclusive one).
    if args.probe and ok and have_qemu and why is None and accel_mod.cached_verdict(args.cache_dir) is None:
        try:
            check_cache(args.cache_dir)
            _probe_kvm(args.cache_dir)
        except (BottleError, OSError) as e:
            print(f"probing KVM failed: {type(e).__name__}: {e}")
            ok = False
    stored = accel_mod.stored_verdict(args.cache_dir) if have_qemu else None  # verdicts are per QEMU version
    verdict = stored[0] if stored else None
    if not have_qemu:
        print("accelerator: none until QEMU is installed (apt-get install qemu-system-x86)")
    elif why:
        print(f"accelerator: tcg ({why})")
    elif verdict and not verdict.definite:
        print(f"accelerator: tcg for the last run ({verdict.reason}); the next run probes KVM again")
    elif verdict:
        print(f"accelerator: {verdict.accel} ({verdict.reason})")
    else:
        print(
            "accelerator: /dev/kvm opens; not probed yet (the first bottle with accel=auto boots a KVM test VM;"
            " `bottle doctor --probe` does it now)"
        )
    try:
        check_cache(args.cache_dir)
        check_cache_place(args.cache_dir)  # "none yet" must not promise one that can never be made
    except UnsafeDirectory as e:
        print(f"cache: {args.cache_dir}: cannot be used: {e.reason}")
        ok = False
    else:
        _show_cache(args.cache_dir)
    records = RunRecord.load_all()
    print(f"run state: {state_dir()} ({len(records)} VM record(s))")
    return 0 if ok else 1


def _probe_kvm(cache_dir: Path) -> None:
    """``doctor --probe``: boot the default image once under KVM, as the first
    bottle with ``accel=auto`` would (building the image first if needed)."""
    from .images import ensure_image
    from .lifecycle.probe import accel_for

    boot = f"at most {accel_mod.PROBE_TIMEOUT:.0f} s, after building it if needed"
    print(f"probing KVM: booting {DEFAULT_IMAGE} once under KVM ({boot})", flush=True)

    def progress(stage: str, elapsed: float) -> None:
        print(f"[{elapsed:6.1f}s] {stage}", flush=True)

    image = ensure_image(DEFAULT_IMAGE, cache_dir, progress=progress)
    quiet = logging.getLogger(accel_mod.__name__)  # its "using TCG" warning is the report's accelerator line
    level = quiet.level
    if not quiet.isEnabledFor(logging.DEBUG):
        quiet.setLevel(logging.ERROR)
    try:
        accel_for("auto", image, cache_dir)
    finally:
        quiet.setLevel(level)


def _show_cache(cache_dir: Path) -> None:
    if not cache_dir.exists():
        print(f"cache: {cache_dir} (none yet: the first bottle or build makes it)")
        return
    print(f"cache: {cache_dir} ({mb(tree_size(cache_dir))})")
    for image in list_images(cache_dir):
        print(f"  image {image.name} {image.key} built {age(image.created)} ago")
    for d in list_derived(cache_dir):
        stale = f" (stale: {d.stale})" if d.stale else ""
        print(
            f"  image {d.manifest.get('name')} {d.key[:16]} derived from {d.manifest.get('parent')}, "
            f"{mb(d.size)}, used {age(d.last_used)} ago{stale}"
        )
    for seed in list_seeds(cache_dir):
        kp = seed.manifest["key_parts"]
        print(
            f"  seed  {seed.path.name} ({kp['accel']}, {kp['memory_mb']}M, {kp['cpus']} cpu"
            f"{', for builds of derived images' if kp.get('purpose') == BUILD else ''}) "
            f"{mb(tree_size(seed.path))}, made in {seed.manifest.get('creation_seconds')}s"
        )


def cmd_run(args: argparse.Namespace) -> int:
    from .lifecycle.launch import start_bottle

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("bottle run: no command given (bottle run -- CMD...)", file=sys.stderr)
        return 2
    written = args.timeout
    if written is not None:  # a str: "abc" is a bad value (exit 125), not a usage error (exit 2)
        try:
            args.timeout = float(written)
        except ValueError:
            pass  # check_timeout names it
    try:
        check_timeout(args.timeout)  # before a bottle starts
    except SpecError:
        raise SpecError(
            f"bad timeout: the command's timeout must be a positive, finite number of seconds, not {written!r}",
            "bottle run",
        ) from None
    if args.snapshot is not None:  # "" too: an empty $SNAP is no snapshot, not "no --snapshot"
        from .snapshot_cli import run_snapshot

        return run_snapshot(args, command)
    find_images(args.image, args.source)  # its stderr is the command's: no hint there
    values = {
        "image": args.image,
        "memory": args.memory,
        "cpus": args.cpus,
        "network": args.network,
        "boot": args.boot,
        "accel": args.accel,
        "cache_dir": args.cache_dir,
    }
    spec = resolve([("bottle run", values)])
    check_host_memory(spec.memory_mb, "bottle run" if args.memory is not None else "", args.memory)
    with start_bottle(spec) as b:
        return snapshot_cli.run_and_print(b, command, args.timeout)


# `bottle run` exits with its command's code: its own failures (an unknown
# image, a bad value, a VM that does not start) take 125, as `docker run`'s
# do, so that a script can tell them from the command's 1.
OWN_ERROR = 125

SHELL_TARGET = "a kept bottle (`bottle ps`) or a saved snapshot (`bottle snapshot list`)"


def cmd_shell(args: argparse.Namespace) -> int:
    from .shell import open_target, run_shell

    if args.name is None:  # argparse would say the optional command is required too
        args.usage_error(f"the following arguments are required: name: the name of {SHELL_TARGET}")
    if not args.name:
        args.usage_error(f"argument name: it is empty; give the name of {SHELL_TARGET}")
    command = list(args.command)[1:] if args.command[:1] == ["--"] else list(args.command)
    if len(command) == 1:  # one CMD through the shell, as `bottle run` and ssh do: 'a; b', 'x | y'
        command = ["/bin/sh", "-c", command[0]]
    with open_target(args.name, args.cache_dir) as agent:
        return run_shell(agent, command or None)


def cmd_ps(args: argparse.Namespace) -> int:
    for rec in RunRecord.load_all():
        # A kept bottle's owner is its QEMU: once that is gone, so is the bottle.
        state = ("kept" if rec.extra.get("kept") else "live") if rec.owner_alive() else "orphaned"
        if state == "live" and rec.qemu_pid is None:  # its QEMU is not started yet
            state = "starting"
        qemu = "-" if rec.qemu_pid is None else rec.qemu_pid
        print(f"{rec.name:14} {state:9} qemu pid {qemu}  owner pid {rec.owner_pid}  {rec.run_dir}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    records = {r.name: r for r in RunRecord.load_all()}
    status = 0
    for name in args.names:
        rec = records.get(name)
        if rec is None:  # the other names are still stopped
            show_error(BottleError(f"no VM named {name!r} (see bottle ps)"))
            status = 1
            continue
        report = SweepReport()
        if stop_vm(rec, report):
            print(f"stopped {name}")
        else:
            show_error(BottleError(f"{name} was not stopped: {'; '.join(report.skipped)}"))
            status = 1
    return status


def cmd_sweep(args: argparse.Namespace) -> int:
    try:
        check_cache(args.cache_dir)
        refused = None
    except UnsafeDirectory as e:  # the host-wide part (dead owners' VMs, leases, state) does not need it
        refused = e
    report = sweep([args.cache_dir] if refused is None else [], include_kept=args.kept)
    print(report.summary(details=False))
    for item in report.vms + [str(p) for p in report.processes] + report.leases + report.paths:
        print(f"  {item}")
    for item in report.skipped:
        print(f"  left {item}")
    if refused is not None:
        show_error(refused)
        return 1
    return 0


CACHE_HELP = "default: $XDG_CACHE_HOME/pytest-bottle; ~ is expanded"


def _cache_path(value: str) -> Path:
    """As pytest's --bottle-cache-dir: a shell leaves ``--cache-dir=~/x`` as it is."""
    if not value.strip():  # not the working directory, as Path("") would be
        raise argparse.ArgumentTypeError(f"must be a path, not {value!r}")
    return Path(os.path.expanduser(value))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bottle", description="pytest-bottle: real Linux microVMs for tests")
    p.add_argument("--cache-dir", type=_cache_path, default=None, help=CACHE_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    doctor_help = "host dependencies, accelerator verdict, cache"
    doctor = sub.add_parser("doctor", help=doctor_help, description=doctor_help)
    doctor.add_argument(
        "--probe",
        action="store_true",
        help="if KVM has no verdict yet, boot a test VM now (building the image if needed)",
    )
    doctor.set_defaults(fn=cmd_doctor)
    image_cli.add_parsers(sub)

    run = sub.add_parser("run", help="boot a bottle, run a command, print its output, exit with its code")
    run.add_argument("--image", default=None, help="a built-in image, or one named in --from")
    run.add_argument("--from", dest="source", metavar="FILE|MODULE", help=image_cli.FROM_HELP)
    run.add_argument("--memory", default=None, help="guest memory, e.g. 512M or 1G (default 512M)")
    run.add_argument("--cpus", default=None, help="virtual CPUs, 1 to 64 (default 1)")
    run.add_argument(
        "--network", default=None, metavar="{none,nat}", help="none: no way out (default); nat: the guest may reach out"
    )
    run.add_argument(
        "--boot",
        default=None,
        metavar="{snapshot,cold}",
        help="snapshot: restore a seed (default); cold: a full boot of the image",
    )
    run.add_argument(
        "--accel", default=None, metavar="{auto,kvm,tcg}", help="auto (default) uses KVM where a test boot works"
    )
    run.add_argument("--timeout", default=None, help="the command's timeout in seconds (none by default)")
    run.add_argument(
        "--snapshot", metavar="NAME", default=None, help="run in a fork of this snapshot (bottle snapshot list)"
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="[--] CMD ...: the command and its arguments")
    run.set_defaults(fn=cmd_run)

    sh = sub.add_parser(
        "shell",
        help="an interactive shell (a terminal in the guest) in a kept bottle or a snapshot",
        # argparse would show the optional command as a required "..."
        usage="%(prog)s [-h] [--cache-dir CACHE_DIR] [-v] name [-- CMD ...]",
    )
    sh.add_argument("name", nargs="?", help=SHELL_TARGET)  # missing or empty: cmd_shell says what it is
    sh.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD... instead of root's login shell")
    sh.set_defaults(fn=cmd_shell, usage_error=sh.error)
    snapshot_cli.add_parser(sub)
    ps_help = "VMs with a run-state record on this host"
    sub.add_parser("ps", help=ps_help, description=ps_help).set_defaults(fn=cmd_ps)
    stop_help = "stop VMs by name (e.g. ones kept by --bottle-keep)"
    stop = sub.add_parser("stop", help=stop_help, description=stop_help)
    stop.add_argument("names", nargs="+", metavar="name", help="a VM's name, as bottle ps shows it")
    stop.set_defaults(fn=cmd_stop)
    sweep_help = "remove leaked state of dead sessions"
    sw = sub.add_parser("sweep", help=sweep_help, description=sweep_help)
    sw.add_argument("--kept", action="store_true", help="also stop VMs kept by --bottle-keep")
    sw.set_defaults(fn=cmd_sweep)
    _after_the_subcommand_too(p)
    return p


def _after_the_subcommand_too(parser: argparse.ArgumentParser) -> None:
    """``--cache-dir`` and ``-v`` after a subcommand as well (``bottle image list
    --cache-dir X``); SUPPRESS leaves the value given before it when not given again.
    (A command's own arguments, as ``run -- CMD...``, are never read as them.)"""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(c): c for c in action.choices.values()}.values():
                sub.add_argument("--cache-dir", type=_cache_path, default=argparse.SUPPRESS, help=CACHE_HELP)
                sub.add_argument(
                    "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
                )
                _after_the_subcommand_too(sub)


# Commands that check the cache themselves, or use none: ps, stop; shell's kept
# bottles; sweep's host-wide part; run makes it (and says "no command" first).
OWN_CACHE_CHECK = (cmd_doctor, cmd_ps, cmd_stop, cmd_shell, cmd_sweep, cmd_run)


def show_error(e: BottleError) -> None:
    print(error_line(e), file=sys.stderr)


def _open_standard_fds() -> None:
    """``bottle ... >&-``: a closed stdin, stdout or stderr becomes /dev/null.  Left closed,
    the next file opened here would take its number, and every child (QEMU, mmdebstrap,
    ssh-keygen) would write its output into that file; and Python has no ``sys.stdout``."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "w", closefd=False))  # lives as long as the process


def main(argv: list[str] | None = None) -> int:
    _open_standard_fds()
    args = build_parser().parse_args(argv)
    args.cache_dir = (args.cache_dir or default_cache_dir()).absolute()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    if args.fn is not cmd_run:  # progress goes with the stage lines on stdout; run's stdout is the guest's
        progress.install(progress.Reporter(progress.cli_sink))
    # `timeout`, `kill`, a cancelled CI job or a closed terminal unwind as Ctrl-C does:
    # a VM stops, a build or an export removes its temporary files
    signals.unwind_on(signal.SIGTERM, signal.SIGHUP)
    try:
        if args.fn not in OWN_CACHE_CHECK:
            check_cache(args.cache_dir)  # one there but unusable is an error, not an empty listing
        rc = int(args.fn(args))
        sys.stdout.flush()  # a short listing sits in the buffer: a closed pipe shows here, not at exit
        return rc
    except BottleError as e:
        show_error(e)
        return OWN_ERROR if args.fn is cmd_run else 1
    except KeyboardInterrupt as e:
        return signals.exit_status(e)
    except BrokenPipeError:  # `bottle image list | head`: the reader has had enough
        # Python's own flush at exit would fail again and say so.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
