"""The ``bottle`` command: doctor, image build|list|rm|prune|export|import|key, seed list|rm, snapshot list|rm|prune,
run, shell, ps, stop, sweep."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import runpy
import signal
import sys
import time
from pathlib import Path

from . import snapshot_cli, transfer_cli
from .arguments import check_days, check_timeout
from .errors import BottleError, ImageNotFound, SpecError
from .host import deps as hostdeps
from .host import progress, signals
from .host.paths import default_cache_dir, state_dir, tree_size
from .host.runstate import RunRecord
from .host.sweep import SweepReport, stop_vm, sweep
from .images import RECIPES, BuiltImage, ensure_image, list_images, prune_images, remove_image
from .images.cache import prune_logs
from .images.derived import list_derived, prune_derived, remove_derived
from .images.image import check_pull_template, register_provided
from .spec import check_host_memory, resolve
from .store import unsettled
from .store.gc import prune_seeds, remove_seeds
from .store.saved import seeds_dir
from .store.seeds import list_seeds
from .vmm import accel as accel_mod


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _age(t: float) -> str:
    s = time.time() - t
    return f"{s / 86400:.1f}d" if s > 86400 else f"{s / 3600:.1f}h" if s > 3600 else f"{s / 60:.0f}m"


# Without these nothing works; the rest only matters for SSH, LANs or disk space.
REQUIRED = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4", "unshare")


def cmd_doctor(args: argparse.Namespace) -> int:
    ok = True
    print("host programs:")
    for program, package in hostdeps.PROVIDERS.items():
        path = hostdeps.which(program)
        ok &= path is not None or program not in REQUIRED
        print(f"  {'ok ' if path else 'MISSING'} {program:20} {path or f'apt-get install {package}'}")
    have_qemu = hostdeps.which("qemu-system-x86_64") is not None
    print(f"qemu: {accel_mod.qemu_version() if have_qemu else 'not installed'}")
    why = accel_mod.kvm_usable()
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
        print("accelerator: /dev/kvm opens; not probed yet (the first bottle with accel=auto boots a KVM test VM)")
    size = tree_size(args.cache_dir) if args.cache_dir.exists() else 0
    print(f"cache: {args.cache_dir} ({_mb(size)})")
    for image in list_images(args.cache_dir):
        print(f"  image {image.name} {image.key} built {_age(image.created)} ago")
    for seed in list_seeds(args.cache_dir):
        kp = seed.manifest["key_parts"]
        print(
            f"  seed  {seed.path.name} ({kp['accel']}, {kp['memory_mb']}M, {kp['cpus']} cpu) "
            f"{_mb(tree_size(seed.path))}, made in {seed.manifest.get('creation_seconds')}s"
        )
    records = RunRecord.load_all()
    print(f"run state: {state_dir()} ({len(records)} VM record(s))")
    return 0 if ok else 1


def _load_images(source: str) -> None:
    """Run a Python file (``path.py``) or import a module (``pkg.images``)
    that defines images: what it names with ``.named()``, and what its
    ``pytest_bottle_images()`` returns, become buildable by name."""
    if source.endswith(".py") or os.sep in source:
        if not os.path.isfile(source):
            raise SpecError(f"--from {source}: no such file")
        namespace = _run_file(os.path.abspath(source))
    else:
        sys.path.insert(0, os.getcwd())
        try:
            namespace = vars(importlib.import_module(source))
        except ModuleNotFoundError as e:
            if e.name is None or not (source == e.name or source.startswith(e.name + ".")):
                raise  # the module itself imports something missing: its traceback says where
            raise SpecError(
                f"--from {source}: no module named {e.name!r} (give a .py file or an importable module)"
            ) from None
    hook = namespace.get("pytest_bottle_images")
    if callable(hook):
        register_provided(hook(), f"pytest_bottle_images() in {source}")


def _run_file(path: str) -> dict[str, object]:
    """Run ``path`` as pytest imports a conftest (its default "prepend" mode):
    the first directory above it without an ``__init__.py`` goes first on
    ``sys.path``, and a file inside a package is imported by its dotted name,
    so its imports (``from images_def import X``, ``from tests.images_def
    import X``, ``from .images_def import X``) work as they do under pytest."""
    base, parts = os.path.dirname(path), [os.path.splitext(os.path.basename(path))[0]]
    while os.path.isfile(os.path.join(base, "__init__.py")):
        base, package = os.path.split(base)
        parts.insert(0, package)
    sys.path.insert(0, base)
    if len(parts) == 1:
        return runpy.run_path(path, run_name="__bottle_images__")
    return vars(importlib.import_module(".".join(parts)))


def cmd_image_build(args: argparse.Namespace) -> int:
    started = time.time()
    if args.source:
        _load_images(args.source)

    def progress(stage: str, elapsed: float) -> None:
        print(f"[{elapsed:6.1f}s] {stage}", flush=True)

    rebuild_before = started if args.rebuild else None
    image = ensure_image(args.name, args.cache_dir, rebuild_before=rebuild_before, progress=progress, pull=args.pull)
    if args.rebuild:
        remove_seeds(args.cache_dir, args.name)
    m = image.manifest
    print(f"{image.name} {image.key}: {image.path} (built in {m['build_seconds']}s, log {image.path / 'build.log'})")
    return 0


def _pull_url(value: str) -> str:
    try:
        return check_pull_template(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_image_list(args: argparse.Namespace) -> int:
    cached: dict[str, list[BuiltImage]] = {}
    for i in list_images(args.cache_dir):
        cached.setdefault(i.name, []).append(i)
    print(f"{'NAME':28} {'KEY':18} {'SIZE':>9} {'AGE':>6}  DESCRIPTION")
    for name, recipe in sorted(RECIPES.items()):
        entries = cached.pop(name, [])
        # The entry of the current key is the image; any other is a leftover for ``prune``.
        current = next((i for i in entries if i.key == recipe.key()), None)
        image = current or max(entries, key=lambda i: i.created, default=None)
        size = _mb(tree_size(image.path)) if image else "-"
        age = _age(image.created) if image else "-"
        key = (image.key if image else recipe.key()) + ("" if current or not image else " (stale)")
        print(f"{name:28} {key:18} {size:>9} {age:>6}  {recipe.description}{'' if image else ' (not built)'}")
        for old in entries:
            if old is not image:
                print(f"  stale entry {old.key} {_mb(tree_size(old.path))} {_age(old.created)} (bottle image prune)")
    derived = list_derived(args.cache_dir)
    if derived:
        print(f"\n{'DERIVED IMAGE':40} {'PARENT':28} {'SIZE':>9} {'USED':>6}  STEPS")
    for d in derived:
        m = d.manifest
        label = f"{m.get('name')} ({d.key[:12]})" if not str(m.get("name", "")).endswith(d.key[:12]) else m.get("name")
        steps = len(m.get("steps", []))
        stale = f" (stale: {d.stale}; bottle image prune)" if d.stale else ""
        print(f"{label!s:40} {m.get('parent')!s:28} {_mb(d.size):>9} {_age(d.last_used):>6}  {steps}{stale}")
    for seed in list_seeds(args.cache_dir):
        kp = seed.manifest["key_parts"]
        print(
            f"  seed of {kp['image']}: {kp['accel']} {kp['memory_mb']}M {kp['cpus']}cpu {kp['nics']}nic "
            f"{_mb(tree_size(seed.path))} {_age(seed.manifest['created'])}"
        )
    return 0


def cmd_image_rm(args: argparse.Namespace) -> int:
    removed = remove_derived(args.cache_dir, args.name)  # a derived image's name or key, then a recipe's
    if not removed:
        try:
            removed = remove_image(args.name, args.cache_dir) + remove_seeds(args.cache_dir, args.name)
        except ImageNotFound as e:  # the cached derived images are names rm takes too
            derived = sorted({str(d.manifest.get("name") or d.path.name) for d in list_derived(args.cache_dir)})
            raise ImageNotFound(args.name, [*e.known, *derived]) from None
        if removed:  # what was built on it rests on nothing now
            removed += remove_derived(args.cache_dir, args.name, root=True)
    for p in removed:
        print(f"removed {p}")
    if not removed:
        print(f"{args.name}: nothing cached")
    return 0


# "What nothing used lately" (DESIGN): a derived image rebuilds on its next use.
DERIVED_UNUSED_DAYS = 7.0


def cmd_image_prune(args: argparse.Namespace) -> int:
    check_days(args.older_than, "bottle image prune")
    cache = args.cache_dir
    sizes = {i.path: tree_size(i.path) for i in list_images(cache)}
    rows = [(p, sizes.get(p, 0), "image of an old recipe") for p in prune_images(cache)]
    rows += prune_derived(cache, args.older_than)
    current = {i.name: i for i in list_images(cache)}  # what is left is current
    layers = {d.key: d for d in list_derived(cache)}
    for seed in list_seeds(cache):  # seeds of derived images still cached are current too
        kp = seed.manifest["key_parts"]
        if (layer := layers.get(kp.get("image_key"))) is not None:
            current[kp["image"]] = BuiltImage(kp["image"], layer.key, layer.path, layer.manifest)
    rows += [(r.path, r.size, r.why) for r in prune_seeds(cache, current)]
    builds = {unsettled.build(i) for i in list_images(cache)} | {unsettled.build(d) for d in list_derived(cache)}
    gone = unsettled.prune(seeds_dir(cache), builds)
    rows += [(p, 0, "a seed that did not settle, of an image build no longer cached") for p in gone]
    rows += [(p, size, "old failed-build log") for p, size in prune_logs(cache)]
    for path, size, why in rows:
        print(f"removed {path} ({_mb(size)}): {why}")
    freed = sum(size for _, size, _ in rows)
    print(f"pruned {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}, freed {_mb(freed)}")
    return 0


def cmd_seed_rm(args: argparse.Namespace) -> int:
    for p in remove_seeds(args.cache_dir, args.image):
        print(f"removed {p}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .lifecycle.launch import start_bottle

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("bottle run: no command given (bottle run -- CMD...)", file=sys.stderr)
        return 2
    check_timeout(args.timeout)  # before a bottle starts
    if args.snapshot:
        from .snapshot_cli import run_snapshot

        return run_snapshot(args, command)
    if args.source:
        _load_images(args.source)
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


SHELL_TARGET = "a kept bottle (`bottle ps`) or a saved snapshot (`bottle snapshot list`)"


def cmd_shell(args: argparse.Namespace) -> int:
    from .shell import open_target, run_shell

    if args.name is None:  # argparse would say the optional command is required too
        args.usage_error(f"the following arguments are required: name: the name of {SHELL_TARGET}")
    if not args.name:
        args.usage_error(f"argument name: it is empty; give the name of {SHELL_TARGET}")
    command = list(args.command)[1:] if args.command[:1] == ["--"] else list(args.command)
    with open_target(args.name, args.cache_dir) as agent:
        return run_shell(agent, command or None)


def cmd_ps(args: argparse.Namespace) -> int:
    for rec in RunRecord.load_all():
        # A kept bottle's owner is its QEMU: once that is gone, so is the bottle.
        state = ("kept" if rec.extra.get("kept") else "live") if rec.owner_alive() else "orphaned"
        print(f"{rec.name:14} {state:9} qemu pid {rec.qemu_pid}  owner pid {rec.owner_pid}  {rec.run_dir}")
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
    report = sweep([args.cache_dir], include_kept=args.kept)
    print(report.summary(details=False))
    for item in report.vms + [str(p) for p in report.processes] + report.leases + report.paths:
        print(f"  {item}")
    for item in report.skipped:
        print(f"  left {item}")
    return 0


FROM_HELP = "a Python file or module defining images (Image(...).named(NAME), or pytest_bottle_images())"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bottle", description="pytest-bottle: real Linux microVMs for tests")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $XDG_CACHE_HOME/pytest-bottle")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="host dependencies, accelerator verdict, cache").set_defaults(fn=cmd_doctor)

    image = sub.add_parser("image", help="build, list or remove images").add_subparsers(dest="sub", required=True)
    b = image.add_parser("build", help="build an image (cached)")
    b.add_argument("name", help="a built-in image, or one named in --from")
    b.add_argument("--from", dest="source", metavar="FILE|MODULE", help=FROM_HELP)
    b.add_argument("--rebuild", action="store_true", help="build again even if cached (and drop its seeds)")
    b.add_argument("--pull", metavar="URL", type=_pull_url, help="pull it from this URL ({name}, {key}) if not cached")
    b.set_defaults(fn=cmd_image_build)
    image.add_parser("list", help="known images, what is built, and seeds").set_defaults(fn=cmd_image_list)
    prune_help = "remove old images, stale seeds and old failed-build logs; print what was freed"
    pr = image.add_parser("prune", help=prune_help)
    pr.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        default=DERIVED_UNUSED_DAYS,
        help=f"remove derived images (and their seeds) unused for DAYS (default {DERIVED_UNUSED_DAYS:g})",
    )
    pr.set_defaults(fn=cmd_image_prune)
    r = image.add_parser("rm", help="remove an image and its seeds from the cache")
    r.add_argument("name")
    r.set_defaults(fn=cmd_image_rm)
    transfer_cli.add_parsers(image, _load_images)

    seed = sub.add_parser("seed", help="list or remove work seeds").add_subparsers(dest="sub", required=True)
    seed.add_parser("list", help="seeds in the cache").set_defaults(fn=cmd_image_list)
    sr = seed.add_parser("rm", help="remove seeds (of one image, or all)")
    sr.add_argument("image", nargs="?")
    sr.set_defaults(fn=cmd_seed_rm)

    run = sub.add_parser("run", help="boot a bottle, run a command, print its output, exit with its code")
    run.add_argument("--image", default=None, help="a built-in image, or one named in --from")
    run.add_argument("--from", dest="source", metavar="FILE|MODULE", help=FROM_HELP)
    run.add_argument("--memory", default=None)
    run.add_argument("--cpus", default=None)
    run.add_argument("--network", default=None, choices=["none", "nat"])
    run.add_argument("--boot", default=None, choices=["snapshot", "cold"])
    run.add_argument("--accel", default=None, choices=["auto", "kvm", "tcg"])
    run.add_argument("--timeout", type=float, default=None, help="command timeout in seconds")
    run.add_argument(
        "--snapshot", metavar="NAME", default=None, help="run in a fork of this snapshot (bottle snapshot list)"
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="[--] CMD ...: the command and its arguments")
    run.set_defaults(fn=cmd_run)

    sh = sub.add_parser(
        "shell",
        help="an interactive shell (a terminal in the guest) in a kept bottle or a snapshot",
        usage="%(prog)s [-h] name [-- CMD ...]",  # argparse would show the optional command as a required "..."
    )
    sh.add_argument("name", nargs="?", help=SHELL_TARGET)  # missing or empty: cmd_shell says what it is
    sh.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD... instead of root's login shell")
    sh.set_defaults(fn=cmd_shell, usage_error=sh.error)
    snapshot_cli.add_parser(sub)
    sub.add_parser("ps", help="VMs with a run-state record on this host").set_defaults(fn=cmd_ps)
    stop = sub.add_parser("stop", help="stop VMs by name (e.g. ones kept by --bottle-keep)")
    stop.add_argument("names", nargs="+")
    stop.set_defaults(fn=cmd_stop)
    sw = sub.add_parser("sweep", help="remove leaked state of dead sessions")
    sw.add_argument("--kept", action="store_true", help="also stop VMs kept by --bottle-keep")
    sw.set_defaults(fn=cmd_sweep)
    return p


def show_error(e: BottleError) -> None:
    """How every subcommand reports an error: ``bottle: ExecTimeout: ...``."""
    print(f"bottle: {type(e).__name__}: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.cache_dir = (args.cache_dir or default_cache_dir()).absolute()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    if args.fn is not cmd_run:  # progress goes with the stage lines on stdout; run's stdout is the guest's
        progress.install(progress.Reporter(progress.cli_sink))
    if args.fn in (cmd_run, cmd_shell):  # they hold a VM: `timeout`, `kill` or a closed terminal must stop it
        signals.unwind_on(signal.SIGTERM, signal.SIGHUP)
    try:
        rc = int(args.fn(args))
        sys.stdout.flush()  # a short listing sits in the buffer: a closed pipe shows here, not at exit
        return rc
    except BottleError as e:
        show_error(e)
        return 1
    except KeyboardInterrupt as e:
        return signals.exit_status(e)
    except BrokenPipeError:  # `bottle image list | head`: the reader has had enough
        # Python's own flush at exit would fail again and say so.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
