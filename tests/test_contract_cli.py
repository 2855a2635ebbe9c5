"""The `bottle` command of docs/reference.md, run as users run it (issue 12)."""

from __future__ import annotations

import http.server
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import pytest_bottle
from pytest_bottle.host.paths import default_cache_dir
from pytest_bottle.host.runstate import RunRecord
from pytest_bottle.images import Recipe, ensure_image
from pytest_bottle.store.saved import SavedState
from pytest_bottle.store.seeds import SEED_VERSION, list_seeds
from pytest_bottle.vmm import accel

CACHE = default_cache_dir()


def cli(*args: str, cache: Path = CACHE, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={cache}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.fixture(scope="module")
def seed() -> SavedState:
    """A real work seed of the default image (made by starting a bottle)."""
    with pytest_bottle.launch() as b:
        b.exec("true")
    image = ensure_image("debian-bookworm", CACHE)
    wanted = {
        "image_key": image.key,
        "image_built": image.manifest.get("created"),
        "seed_version": SEED_VERSION,
        "accel": b.accel,
        "memory_mb": 512,
        "cpus": 1,
        "nics": 1,  # what launch() restores from; a LAN bottle's seed has 2
    }
    seeds = [s for s in list_seeds(CACHE) if wanted.items() <= s.manifest["key_parts"].items()]
    return max(seeds, key=lambda s: s.manifest["created"])


def _link_copy(src: Path, dst: Path, **manifest_changes: object) -> Path:
    """A copy of an image entry made of hard links (cheap), with its own manifest."""
    shutil.copytree(src, dst, copy_function=os.link)
    manifest = dict(json.loads((src / "manifest.json").read_text()), **manifest_changes)
    (dst / "manifest.json").unlink()  # never write through the link into the original
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _seed_entry(seed: SavedState, dst: Path, image: str | None = None) -> Path:
    """A seed entry as the cache lists it: the real seed's manifest (its image
    renamed if asked) beside empty files. Linking the real files would change
    their ctime, and with it the original's verification stamp."""
    dst.mkdir(parents=True)
    manifest = dict(seed.manifest)
    if image is not None:
        manifest["key_parts"] = dict(manifest["key_parts"], image=image)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    for name in ("disk.qcow2", "memory.state", "memory.ram", "console.log"):
        (dst / name).write_bytes(b"")
    return dst


@pytest.fixture
def private_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    (cache / "images").mkdir(parents=True)
    (cache / "seeds").mkdir()
    if (CACHE / "accel.json").exists():
        shutil.copy(CACHE / "accel.json", cache / "accel.json")
    return cache


def _strip_ages(text: str) -> str:
    return re.sub(r"\b\d+(\.\d+)?[mhd]\b", "AGE", text)


def test_seed_list_and_rm(seed: SavedState, private_cache: Path) -> None:
    seeds = private_cache / "seeds"
    mine = _seed_entry(seed, seeds / seed.path.name)
    other = _seed_entry(seed, seeds / "debian-bookworm-minimal-copy", image="debian-bookworm-minimal")
    listing = cli("seed", "list", cache=private_cache)
    assert listing.returncode == 0, listing.stderr
    # An empty name is no "all seeds": it said "seeds: nothing cached" and exited 0 with both cached.
    empty = cli("seed", "rm", "", cache=private_cache)
    assert (empty.returncode, empty.stdout) == (1, ""), empty
    assert (
        empty.stderr == "bottle: SpecError: bottle seed rm: '' is no image name (leave it out to remove every seed)\n"
    )
    assert mine.is_dir() and other.is_dir()
    assert _strip_ages(listing.stdout) == _strip_ages(cli("image", "list", cache=private_cache).stdout)
    assert "seed of debian-bookworm:" in listing.stdout and "seed of debian-bookworm-minimal:" in listing.stdout
    removed = cli("seed", "rm", "debian-bookworm-minimal", cache=private_cache)
    assert removed.returncode == 0 and removed.stdout == f"removed {other}\n", removed
    assert not other.exists() and mine.is_dir()
    assert "seed of debian-bookworm:" in cli("seed", "list", cache=private_cache).stdout
    assert cli("seed", "rm", cache=private_cache).stdout == f"removed {mine}\n"
    assert "seed of" not in cli("seed", "list", cache=private_cache).stdout
    again = cli("seed", "rm", "debian-bookworm", cache=private_cache)  # said, as image rm says it
    assert (again.returncode, again.stdout) == (0, "debian-bookworm: nothing cached\n"), again
    assert seed.path in [s.path for s in list_seeds(CACHE)]  # the real one is untouched


def test_image_rm_removes_every_key_and_the_seeds(seed: SavedState, private_cache: Path) -> None:
    real = ensure_image("debian-bookworm", CACHE)
    images = private_cache / "images"
    current = _link_copy(real.path, images / real.path.name)
    stale = _link_copy(real.path, images / "debian-bookworm-0123456789abcdef", key="0123456789abcdef")
    other = _link_copy(real.path, images / "debian-bookworm-minimal-0123456789abcdef", name="debian-bookworm-minimal")
    seeds = private_cache / "seeds"
    my_seed = _seed_entry(seed, seeds / seed.path.name)
    other_seed = _seed_entry(seed, seeds / "debian-bookworm-minimal-copy", image="debian-bookworm-minimal")
    r = cli("image", "rm", "debian-bookworm", cache=private_cache)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.splitlines()) == {f"removed {p}" for p in (current, stale, my_seed)}
    assert not current.exists() and not stale.exists() and not my_seed.exists()
    assert other.is_dir() and other_seed.is_dir()
    again = cli("image", "rm", "debian-bookworm", cache=private_cache)
    assert again.returncode == 0 and again.stdout == "debian-bookworm: nothing cached\n"
    assert real.rootfs.is_file()


def test_image_list_shows_the_current_entry_beside_a_stale_one(private_cache: Path) -> None:
    real = ensure_image("debian-bookworm", CACHE)
    images = private_cache / "images"
    _link_copy(real.path, images / real.path.name)
    _link_copy(real.path, images / "debian-bookworm-ffffffffffffffff", key="ffffffffffffffff")
    listing = cli("image", "list", cache=private_cache).stdout.splitlines()
    (line,) = [row for row in listing if row.startswith("debian-bookworm ")]
    assert line.split()[1] == real.key and "(stale)" not in line, line
    assert any(row.split()[:3] == ["stale", "entry", "ffffffffffffffff"] for row in listing), listing


OFFLINE = 'Recipe(name="contract-offline", packages=("python3",), mirror="http://127.0.0.1:9/debian")'
WITH_RECIPE = (
    "import sys\nfrom pytest_bottle.images import Recipe, register\nregister({recipe})\n"
    "from pytest_bottle.cli import main\nsys.exit(main(sys.argv[1:]))\n"
)


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    # `true` has gone before the CLI writes: its first write meets a closed pipe.
    line = f"{shlex.quote(sys.executable)} -m pytest_bottle.cli --cache-dir={shlex.quote(str(CACHE))} image list"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered: the write comes at the end
    r = subprocess.run(
        ["bash", "-c", f"{line} | true; echo rc=${{PIPESTATUS[0]}} >&2"], capture_output=True, text=True, env=env
    )
    assert r.stderr.strip().splitlines() == ["rc=141"], r.stderr  # 128 + SIGPIPE, and nothing else said


def _closed(args: str, streams: str, cache: Path = CACHE) -> subprocess.CompletedProcess[str]:
    """The CLI run by a shell with ``streams`` closed (``>&-``, ``2>&-``, ``<&-``)."""
    line = f"{shlex.quote(sys.executable)} -m pytest_bottle.cli --cache-dir={shlex.quote(str(cache))} {args}"
    return subprocess.run(["bash", "-c", f"{line} {streams}"], capture_output=True, text=True, timeout=300)


def test_closed_standard_streams_are_like_dev_null(private_cache: Path) -> None:
    for streams in (">&-", "<&- >&-", ">&- 2>&-"):  # was a traceback: sys.stdout is None
        r = _closed("image list", streams, private_cache)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (streams, r)
    r = _closed("image rm no-such-image", ">&-", private_cache)
    assert r.returncode == 1 and "bottle: ImageNotFound: unknown image 'no-such-image'" in r.stderr, r
    r = _closed("image rm no-such-image", "2>&-", private_cache)
    assert (r.returncode, r.stderr) == (1, ""), r


def test_bad_run_timeouts_and_prune_ages_are_refused_before_any_work(tmp_path: Path) -> None:
    empty = tmp_path / "cache"  # a bottle started here would build an image first: minutes
    for args in (("--timeout", "nan"), ("--timeout", "0"), ("--timeout", "-1"), ("--timeout", "-1", "--snapshot", "s")):
        r = cli("run", *args, "--", "true", cache=empty, timeout=60)
        assert r.returncode == 125 and "timeout must be a positive, finite number" in r.stderr, r
        assert r.stderr.startswith("bottle: SpecError: bottle run: bad timeout: ") and repr(args[1]) in r.stderr, r
    for days in ("nan", "-1", "inf"):  # nan kept nothing: every derived image went
        for kind in ("image", "snapshot"):
            r = cli(kind, "prune", "--older-than", days, cache=empty, timeout=60)
            assert r.returncode == 1 and "--older-than must be a finite number of days >= 0" in r.stderr, r
    r = cli("run", "--memory", "100T", "--", "true", cache=empty, timeout=60)  # as written, then in MiB
    assert r.returncode == 125 and r.stderr.startswith(
        "bottle: SpecError: bottle run: bad memory: '100T' (104857600M) is more than this host has ("
    ), r.stderr
    # An empty $SNAP in `bottle run --snapshot "$SNAP"` names no snapshot: it does not boot a default bottle.
    r = cli("run", "--snapshot", "", "--", "true", cache=empty, timeout=60)
    assert (
        r.returncode == 125 and r.stderr.startswith("bottle: SnapshotError: ") and "a snapshot name is" in r.stderr
    ), r
    assert not (empty / "images").exists() and not (empty / "seeds").exists()


def test_shell_usage_shows_the_command_as_optional_and_what_the_name_is() -> None:
    r = cli("shell", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "usage: bottle shell [-h] [--cache-dir CACHE_DIR] [-v] name [-- CMD ...]"
    missing = cli("shell")  # the name is what is required, and what it names
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[-1] == (
        "bottle shell: error: the following arguments are required: name: "
        "the name of a kept bottle (`bottle ps`) or a saved snapshot (`bottle snapshot list`)"
    ), missing.stderr
    empty = cli("shell", "")  # a usage error, not an invalid snapshot name
    assert empty.returncode == 2
    assert empty.stderr.splitlines()[-1] == (
        "bottle shell: error: argument name: it is empty; "
        "give the name of a kept bottle (`bottle ps`) or a saved snapshot (`bottle snapshot list`)"
    ), empty.stderr


def test_image_build_rebuild_builds_again(private_cache: Path) -> None:
    recipe: Recipe = eval(OFFLINE)
    entry = private_cache / "images" / f"{recipe.name}-{recipe.key()}"
    entry.mkdir()
    for name in ("rootfs.ext4", "vmlinuz", "initrd.img", "build.log"):
        (entry / name).write_bytes(b"old")
    manifest = {"name": recipe.name, "key": recipe.key(), "created": time.time() - 3600, "build_seconds": 1.0}
    (entry / "manifest.json").write_text(json.dumps(manifest))

    def build(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", WITH_RECIPE.format(recipe=OFFLINE), f"--cache-dir={private_cache}"]
        return subprocess.run([*argv, "image", "build", *args], capture_output=True, text=True, timeout=600)

    cached = build("contract-offline")
    assert cached.returncode == 0, cached.stderr
    # Found, not built: it says so (it said "built in 1.0s" as if it had just built it).
    told = f"contract-offline {recipe.key()}: {entry} (found in the cache: built 1.0h ago in 1.0s, log {entry / 'build.log'})\n"
    assert cached.stdout == told
    again = build("contract-offline", "--rebuild")
    # It ran mmdebstrap (progress as "[seconds] stage") against the recipe's mirror, which fails.
    assert again.returncode == 1
    assert re.search(r"^\[ *\d+\.\ds\] \S", again.stdout, re.M), again.stdout
    assert again.stderr.startswith("bottle: ImageBuildError: building image 'contract-offline' failed"), again.stderr
    assert "127.0.0.1:9" in again.stderr
    assert json.loads((entry / "manifest.json").read_text()) == manifest  # the cached entry is kept


@pytest.fixture
def host_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_run_boot_memory_cpus_network_options(private_cache: Path, host_server: int) -> None:
    ensure_image("debian-bookworm", CACHE)
    (private_cache / "images").rmdir()
    (private_cache / "images").symlink_to(CACHE / "images")
    fetch = (
        f"import urllib.request; urllib.request.urlopen('http://10.0.2.2:{host_server}/', timeout=10); print('egress')"
    )
    script = f"nproc; awk '/MemTotal/ {{print $2}}' /proc/meminfo; python3 -c \"{fetch}\""
    r = cli(
        "run",
        "--boot",
        "cold",
        "--memory",
        "768M",
        "--cpus",
        "2",
        "--network",
        "nat",
        "--",
        script,
        cache=private_cache,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cpus, mem_kb, egress = r.stdout.split()
    assert cpus == "2" and 600_000 < int(mem_kb) <= 768 * 1024 and egress == "egress"
    assert list_seeds(private_cache) == []  # booted cold: no seed was made


def test_run_command_forms_exit_codes_and_verbose(seed: SavedState) -> None:
    r = cli("run", "--accel", "tcg", "--", "echo $((6*7)); exit 4")  # one argument: through /bin/sh -c
    assert (r.returncode, r.stdout, r.stderr) == (4, "42\n", "")
    r = cli("-v", "run", "--accel", "tcg", "--", "cat", "/proc/sys/kernel/randomize_va_space")
    assert r.returncode == 0 and r.stdout == "0\n"  # 0: the guest runs under TCG
    assert "clone handshake took" in r.stderr  # -v: debug logging
    for args in (("run",), ("run", "--")):
        r = cli(*args)
        assert r.returncode == 2 and "no command given" in r.stderr
    started = time.monotonic()
    r = cli("run", "--accel", "tcg", "--timeout", "2", "--", "echo so far; echo err >&2; sleep 60")
    assert r.returncode == 124 and r.stdout == "so far\n", r  # as coreutils' timeout, with the output so far
    # the output so far once (the error's own message would repeat it)
    said = "command 'echo so far; echo err >&2; sleep 60' timed out after 2 s and was killed"
    assert r.stderr == f"err\nbottle: ExecTimeout: {said}\n", r.stderr
    assert time.monotonic() - started < 60
    r = _closed("run --accel tcg -- 'echo out; echo err >&2; exit 3'", ">&-")  # stdout closed: as /dev/null
    assert (r.returncode, r.stderr) == (3, "err\n"), r
    r = cli("run", "--accel", "tcg", "--", "echo before; kill -9 $$")
    assert (r.returncode, r.stdout) == (128 + 9, "before\n")  # killed by a signal: as a shell says it
    r = cli("run", "--image", "no-such-image", "--", "true")
    assert r.returncode == 125 and r.stderr.startswith("bottle: ImageNotFound: unknown image 'no-such-image'")
    r = cli("run", "--memory", "lots", "--", "true")
    assert r.returncode == 125 and r.stderr.startswith("bottle: SpecError: bottle run: bad memory"), r.stderr
    verdict = accel.cached_verdict(CACHE)
    kvm_works = accel.kvm_usable() is None and verdict is not None and verdict.accel == "kvm"
    r = cli("run", "--accel", "kvm", "--", "true")
    if kvm_works:
        assert r.returncode == 0
    else:
        assert r.returncode == 125 and r.stderr.startswith(
            "bottle: HostDependencyError: missing on this host: a working KVM"
        )


def _signal_a_run(argv: list[str], sig: int, times: int = 1) -> tuple[int, str, RunRecord]:
    """Start `bottle run -- sleep 120` (by ``argv``), send ``sig`` well into the
    command (``times`` times, 50 ms apart); its exit status, stderr and the
    record its VM had."""
    proc = subprocess.Popen(
        [*argv, f"--cache-dir={CACHE}", "run", "--", "sleep", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (mine := [r for r in RunRecord.load_all() if r.owner_pid == proc.pid and r.qemu_pid]):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(3)  # well into the command
        for i in range(times):
            time.sleep(0.05 * (i > 0))
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, (out, err)
    (record,) = mine
    return proc.returncode, err, record


def _nothing_left(record: RunRecord) -> None:
    assert record.qemu_pid is not None and _gone(record.qemu_pid)
    assert not Path(record.run_dir).exists()
    assert record.name not in {r.name for r in RunRecord.load_all()}


def test_ctrl_c_stops_the_bottle_and_gives_130(seed: SavedState) -> None:
    # As from a terminal: SIGINT raises KeyboardInterrupt.  A run started in the
    # background of a shell without job control inherits SIGINT ignored, and so
    # would the CLI (Python leaves an ignored SIGINT ignored).
    at_a_terminal = "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    at_a_terminal += "runpy.run_module('pytest_bottle.cli', run_name='__main__')"
    rc, _, record = _signal_a_run([sys.executable, "-c", at_a_terminal], signal.SIGINT)
    assert rc == 130
    _nothing_left(record)


@pytest.mark.parametrize(("sig", "times"), [(signal.SIGTERM, 1), (signal.SIGHUP, 2)], ids=["SIGTERM", "SIGHUP twice"])
def test_sigterm_and_sighup_stop_the_bottle_like_ctrl_c(seed: SavedState, sig: signal.Signals, times: int) -> None:
    # `timeout`, `kill`, a closed terminal (which sends SIGHUP twice: the second
    # must not cut the cleanup short): unwound like Ctrl-C, not killed with the
    # VM left to a sweep.  Both at their default, even if this run inherited
    # them ignored (nohup).
    at_default = "import runpy, signal; [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGHUP, signal.SIGTERM)]; "
    at_default += "runpy.run_module('pytest_bottle.cli', run_name='__main__')"
    rc, err, record = _signal_a_run([sys.executable, "-c", at_default], sig, times)
    assert rc == 128 + sig and "Traceback" not in err, err  # as a shell reports a death by the signal
    _nothing_left(record)


def test_sigterm_during_an_image_build_removes_what_the_build_made(tmp_path: Path, warm_cache: Path) -> None:
    # A cancelled CI job sends SIGTERM: the build's tmp entry and its QEMU went only at the next sweep.
    name = f"sigterm-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / "imgs.py").write_text(
        f"from pytest_bottle import Image\nSLOW = Image('debian-bookworm').run('sleep 300').named({name!r})\n"
    )
    at_default = "import runpy, signal; signal.signal(signal.SIGTERM, signal.SIG_DFL); "
    at_default += "runpy.run_module('pytest_bottle.cli', run_name='__main__')"
    argv = [sys.executable, "-c", at_default, f"--cache-dir={CACHE}", "image", "build", name, "--from", "imgs.py"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    qemus: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while not any(
            "step 1/1" in (log.read_text(errors="replace") if log.is_file() else "")
            for log in (CACHE / "images").glob(f".tmp-derived-*-{proc.pid}*/build.log")
        ):  # its machine is running the step
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        qemus = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name().startswith("qemu")]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, (out, err)
    assert qemus and all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in qemus)
    assert not list((CACHE / "images").glob(f".tmp-derived-*-{proc.pid}*"))


def test_an_empty_cache_dir_is_a_usage_error_not_the_working_directory(tmp_path: Path) -> None:
    for value in ("", " "):
        r = subprocess.run(
            [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={value}", "doctor"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2 and f"argument --cache-dir: must be a path, not {value!r}" in r.stderr, r
        assert list(tmp_path.iterdir()) == []


def test_an_unusable_cache_dir_is_a_bottle_error(tmp_path: Path, no_spare_starting: None) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    mine = {r.name for r in RunRecord.load_all() if r.owner_pid == os.getpid()}
    for cache, reason in (
        (Path("/proc/x"), "it cannot be made (No such file or directory)"),
        (afile / "sub", f"{afile} on its path is not a directory"),
    ):
        message = f"refusing to use {cache}: {reason};"
        r = cli("run", "--", "true", cache=cache)  # one line, not an OSError's traceback
        assert (r.returncode, r.stdout) == (125, "") and r.stderr.startswith(f"bottle: UnsafeDirectory: {message}")
        assert "Traceback" not in r.stderr, r.stderr
        with pytest.raises(pytest_bottle.UnsafeDirectory) as e:
            pytest_bottle.launch(cache_dir=cache)
        assert isinstance(e.value, pytest_bottle.BottleError) and str(e.value).startswith(message), e.value
    assert afile.read_text() == "" and list(tmp_path.iterdir()) == [afile]  # nothing made, nothing left
    assert {r.name for r in RunRecord.load_all() if r.owner_pid == os.getpid()} == mine


def test_every_command_that_reads_the_cache_refuses_an_unusable_one_and_makes_none(tmp_path: Path) -> None:
    """Not an empty listing for a cache that is there but unusable; nothing made for one not there yet."""
    afile, missing = tmp_path / "afile", tmp_path / "no" / "cache"
    afile.write_text("")
    commands = (["image", "list"], ["image", "prune"], ["image", "rm", "debian-bookworm"], ["seed", "list"], ["sweep"])
    for args in commands:
        r = cli(*args, cache=afile, timeout=60)
        assert r.returncode == 1, (args, r)
        assert f"bottle: UnsafeDirectory: refusing to use {afile}: it is not" in r.stderr, (args, r)
        assert cli(*args, cache=missing, timeout=60).returncode in (0, 1)  # rm: "nothing cached" is 1
    # the host-wide part still ran (it may sweep what the other worker's kill tests left for a moment)
    assert re.match(r"(nothing to sweep|swept \d+ VM record)", cli("sweep", cache=afile, timeout=60).stdout)
    r = cli("doctor", cache=afile, timeout=60)
    assert r.returncode == 1 and f"cache: {afile}: cannot be used: it is not a directory" in r.stdout, r
    assert "run state: " in r.stdout  # it goes on after the cache
    r = cli("doctor", cache=missing, timeout=60)
    assert f"cache: {missing} (none yet" in r.stdout, r
    if os.geteuid() == 0:  # a read-only mount, in a mount namespace of the doctor's own: gone with it
        ro = tmp_path / "ro"
        ro.mkdir()
        doctor = f"{shlex.quote(sys.executable)} -m pytest_bottle.cli --cache-dir={ro}/cache doctor"
        script = f"mount -t tmpfs -o ro,size=1m tmpfs {ro} && exec {doctor}"
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        # it said "none yet: the first bottle or build makes it", and every bottle then failed to make it
        said = f"cache: {ro}/cache: cannot be used: it cannot be made: {ro} is on a read-only file system"
        assert r.returncode == 1 and said in r.stdout, r
        ro.rmdir()
    r = cli("shell", "no-such-bottle", cache=afile, timeout=60)  # a snapshot would be read from it
    assert r.returncode == 1 and "UnsafeDirectory" in r.stderr, r
    assert afile.read_text() == "" and list(tmp_path.iterdir()) == [afile]  # and nothing was made


def test_doctor_names_the_optional_compiler_of_the_agents_core(tmp_path: Path) -> None:
    """Without gcc and a static libc, images get no compiled core and restores are
    slower; doctor did not say so (it lists what the host needs)."""
    bare = subprocess.run(  # a PATH without cc: every program is missing, the compiler only "absent"
        [sys.executable, "-m", "pytest_bottle.cli", f"--cache-dir={tmp_path}", "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(tmp_path)},
    )
    assert bare.returncode == 1 and "MISSING qemu-img" in bare.stdout, bare
    if platform.machine() == "x86_64":  # elsewhere the host's compiler would build for another machine
        assert (
            "absent  cc (optional)        no C compiler: apt-get install gcc libc6-dev (then images get" in bare.stdout
        )
    else:
        assert "absent  cc (optional)        not an x86_64 host\n" in bare.stdout
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is not None and os.path.exists("/usr/lib/x86_64-linux-gnu/libc.a"):  # as scripts/bootstrap installs
        assert f"ok  cc (optional)        {cc}\n" in cli("doctor", cache=tmp_path, timeout=60).stdout


def test_cache_dir_and_verbose_may_follow_the_subcommand(tmp_path: Path) -> None:
    """`bottle image list --cache-dir X` was "unrecognized arguments" (exit 2)."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for args in (["image", "list"], ["image", "rm", "x"], ["snapshot", "list"], ["seed", "list"]):
        r = cli(*args, f"--cache-dir={afile}", "-v", cache=tmp_path / "other", timeout=60)  # the later one wins
        assert r.returncode == 1 and f"bottle: UnsafeDirectory: refusing to use {afile}: it is not" in r.stderr, r
    r = cli("run", "--cache-dir", str(afile), "--", "true", cache=tmp_path / "other", timeout=60)
    assert r.returncode == 125 and f"refusing to use {afile}" in r.stderr, r
    # `~` is expanded as pytest's --bottle-cache-dir expands it (it named ./~/afile, and `run` would make it).
    argv = [sys.executable, "-m", "pytest_bottle.cli", "image", "list", "--cache-dir=~/afile"]
    home = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert f"refusing to use {afile}: it is not" in home.stderr, home
    assert list(tmp_path.iterdir()) == [afile]  # the other cache was never made


def test_a_bad_run_option_value_exits_125_as_its_other_own_errors(tmp_path: Path) -> None:
    """Not 1: a script must tell run's own failure from its command's exit 1 (docker run's 125)."""
    for option, value in (("--network", "bogus"), ("--boot", "warm"), ("--accel", "fast"), ("--timeout", "abc")):
        r = cli("run", option, value, "--", "true", cache=tmp_path / "cache", timeout=60)
        assert r.returncode == 125 and r.stderr.startswith("bottle: SpecError: "), r
        assert option.removeprefix("--") in r.stderr and repr(value) in r.stderr, r
    helped = " ".join(cli("run", "--help", timeout=60).stdout.split())
    assert "--network {none,nat} none: no way out (default)" in helped, helped
    for option in ("--memory MEMORY guest memory", "--cpus CPUS virtual CPUs", "--boot {snapshot,cold} snapshot:"):
        assert option in helped, helped
    r = cli("image", timeout=60)  # a group without its subcommand: the error names what is missing
    assert r.returncode == 2 and "the following arguments are required: subcommand" in r.stderr, r


@pytest.fixture
def isolated(seed: SavedState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_spare_starting: None) -> Path:
    """A run-state directory and a cache of this test's own, so that `sweep --kept`
    cannot touch another test's kept VM (or run directory). The seed is copied."""
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    cache = tmp_path / "cache"
    (cache / "seeds").mkdir(parents=True)
    (cache / "images").symlink_to(CACHE / "images")
    for name in ("accel.json", "keys"):
        if (CACHE / name).exists():
            subprocess.run(["cp", "-a", str(CACHE / name), str(cache)], check=True)
    subprocess.run(["cp", "-a", "--sparse=always", str(seed.path), str(cache / "seeds")], check=True)
    return cache


def test_ps_shows_a_vm_whose_qemu_is_not_started_yet_as_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # it said "live ... qemu pid None"
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(tmp_path / "state"))
    rec = RunRecord.create("btl-starting1", tmp_path / "run")  # owned by this live process, as a start is
    out = cli("ps").stdout
    assert re.search(rf"^btl-starting1\s+starting\s+qemu pid -  owner pid {os.getpid()}  ", out, re.M), out
    rec.qemu_pid = os.getpid()  # any live pid: ps only reads the record
    rec.save()
    assert re.search(rf"^btl-starting1\s+live\s+qemu pid {os.getpid()}  ", cli("ps").stdout, re.M)


def test_stop_unknown_name_and_sweep_kept(isolated: Path, seed: SavedState) -> None:
    names: list[str] = []
    try:
        a = pytest_bottle.launch(cache_dir=isolated, detached=True)  # keep() needs a QEMU that may outlive us
        names.append(a.name)
        a.keep()
        assert a.kept and a.closed
        r = cli("stop", "btl-00000000", a.name, cache=isolated)
        assert r.returncode == 1  # said as every subcommand says an error
        assert r.stderr == "bottle: BottleError: no VM named 'btl-00000000' (see bottle ps)\n", r.stderr
        assert r.stdout == f"stopped {a.name}\n" and _gone(a.pid)  # the known one is stopped anyway
        b = pytest_bottle.launch(cache_dir=isolated, detached=True)
        names.append(b.name)
        b.keep()
        assert re.search(rf"^{b.name}\s+kept\s", cli("ps").stdout, re.M)
        plain = cli("sweep", cache=isolated)
        assert plain.returncode == 0 and b.name not in plain.stdout and not _gone(b.pid)
        kept = cli("sweep", "--kept", cache=isolated)
        assert kept.returncode == 0 and f"  {b.name}\n" in kept.stdout, kept.stdout
        assert _gone(b.pid) and b.name not in {r.name for r in RunRecord.load_all()}
        assert not b.console_log_path.parent.exists()
        assert [s.manifest for s in list_seeds(isolated)] == [seed.manifest]  # both restored from the copy
    finally:  # a failure must not leave a kept VM running
        left = {r.name for r in RunRecord.load_all()} & set(names)
        if left:
            cli("stop", *left, cache=isolated)
