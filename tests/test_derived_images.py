"""Derived images for real: built once per session (each build is a minute or
two under TCG), then bottles of them, a derived image of a derived image, a
failing step, and a cache hit."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import pytest_bottle
from pytest_bottle import HostDependencyError, Image, ImageBuildError, SpecError
from pytest_bottle.images import BuiltImage, ensure_image
from pytest_bottle.images.derived import entry_dir
from pytest_bottle.lifecycle.probe import accel_for
from pytest_bottle.store.saved import list_seeds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    (root / "bin").mkdir()
    (root / "index.html").write_text("<h1>hello from a derived image</h1>\n")
    (root / "bin" / "tool").write_text("#!/bin/sh\necho tool ran\n")
    (root / "bin" / "tool").chmod(0o750)
    (root / "secret").write_text("s\n")
    (root / "secret").chmod(0o600)
    return root


@pytest.fixture(scope="module")
def web(site: Path) -> Image:
    return (
        Image("debian-bookworm")
        .install("nginx-light")
        .copy(site, "/var/www/html")
        .write("/etc/app.conf", "x=1\n", mode=0o640)
        .write("/var/tmp/web-cache", "kept\n")  # /var/tmp outlives boots on Debian: the build keeps it too
        .run("systemctl enable nginx")
    )


@pytest.fixture(scope="module")
def web_built(web: Image, warm_cache: Path) -> BuiltImage:
    return ensure_image(web, warm_cache)


@pytest.fixture(scope="module")
def child(web: Image, site: Path, tmp_path_factory: pytest.TempPathFactory) -> Image:
    private = tmp_path_factory.mktemp("private")
    (private / "key").write_text("k\n")
    (private / "__pycache__").mkdir()
    (private / "__pycache__" / "key.cpython-311.pyc").write_bytes(b"host bytecode")
    (private / "scratch.tmp").write_text("left out by exclude\n")
    private.chmod(0o700)
    image = (  # a layer on web; its copies follow put()'s rules
        Image(web)
        .write("/etc/child", b"child\n")
        .run("echo derived > /etc/derived-marker")
        .run(["touch", "/etc/made from a list"])  # an argv, as exec takes one: the space is no separator
        .copy(site / "index.html", "/opt/drop/")  # a trailing /: inside that directory, made for it
        .copy(site / "index.html", "/opt/dot/.")  # as put() takes it: inside too, not a file /opt/dot
        .copy(
            private, "/opt/private", exclude=["*.tmp"]
        )  # a directory the copy makes is 0755, whatever the source's mode
    )
    # Python and pytest write these on the host as the run goes on: neither copied nor in the key.
    (private / "__pycache__" / "other.cpython-311.pyc").write_bytes(b"written after the Image was made")
    (private / ".pytest_cache").mkdir()
    return image


def test_a_bottle_of_a_derived_image_has_its_package_running(
    web: Image, web_built: BuiltImage, warm_cache: Path
) -> None:
    with pytest_bottle.launch(image=web) as b:
        assert b.image == web.display_name == web_built.name
        assert b.check_output("systemctl is-active nginx").strip() == "active"
        assert "hello from a derived image" in b.check_output(
            "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1/').read().decode())\""
        )
        # restored from the image's own work seed, not booted cold
        seeds = [s for s in list_seeds(warm_cache) if s.manifest["key_parts"]["image_key"] == web_built.key]
        assert seeds and all(s.manifest["key_parts"]["image"] == web.display_name for s in seeds)
        assert b.exec("ls /var/lib/apt/lists | grep -v -e '^lock$' -e '^partial$' -e '^auxfiles$'").stdout == ""


def test_write_and_copy_land_with_their_modes(web: Image, web_built: BuiltImage) -> None:
    with pytest_bottle.launch(image=web) as b:
        assert b.check_output("stat -c '%a %U' /etc/app.conf /var/www/html/bin/tool /var/www/html/secret").split("\n")[
            :3
        ] == ["640 root", "750 root", "600 root"]
        assert b.read_text("/etc/app.conf") == "x=1\n"
        assert b.read_text("/var/tmp/web-cache") == "kept\n"
        assert b.check_output("/var/www/html/bin/tool") == "tool ran\n"


def test_the_layer_rests_on_the_parent_and_is_small(web_built: BuiltImage) -> None:
    assert web_built.disk_format == "qcow2" and web_built.disk.name == "disk.qcow2"
    assert web_built.root is not None and web_built.kernel == web_built.root.kernel
    assert web_built.rootfs == web_built.root.rootfs and web_built.rootfs.is_file()  # the base's, under the layer
    assert web_built.manifest["parent"] == "debian-bookworm"
    assert web_built.manifest["steps"][0] == "apt-get install nginx-light"
    log = (web_built.path / "build.log").read_text()  # the update fetched the package lists, no translations
    assert " Packages " in log and "Translation-" not in log, log[:3000]
    assert web_built.disk.stat().st_blocks * 512 < web_built.root.rootfs.stat().st_blocks * 512 / 2


def test_a_derived_image_of_a_derived_image(child: Image, web_built: BuiltImage, warm_cache: Path) -> None:
    built = ensure_image(child, warm_cache)
    assert built.parent is not None and built.parent.key == web_built.key
    assert built.manifest["chain"][:2] == [child.key, web_built.key]
    with pytest_bottle.launch(image=child) as b:
        assert b.check_output("cat /etc/child /etc/derived-marker") == "child\nderived\n"
        assert b.check_output(["ls", "/etc/made from a list"]) == "/etc/made from a list\n"
        assert "hello from a derived image" in b.read_text("/opt/drop/index.html")
        assert "hello from a derived image" in b.read_text("/opt/dot/index.html")
        assert b.check_output("stat -c %a /opt/drop /opt/private; cat /opt/private/key") == "755\n755\nk\n"
        assert b.check_output("ls -A /opt/private") == "key\n"
        assert b.check_output("systemctl is-active nginx").strip() == "active"


def test_a_cache_hit_does_not_rebuild(web: Image, web_built: BuiltImage, warm_cache: Path) -> None:
    started = time.monotonic()
    again = ensure_image(web, warm_cache)
    elapsed = time.monotonic() - started
    assert again.created == web_built.created and again.path == web_built.path
    assert elapsed < 5  # no boot happened (a build is a minute or more)


FAILING = """
import sys
from pytest_bottle import Image, ImageBuildError
from pytest_bottle.images import ensure_image, failures
if len(sys.argv) > 3:
    failures.join_run(sys.argv[3])
try:
    ensure_image(Image("debian-bookworm-minimal").write("/etc/x", "x").run(sys.argv[2]), sys.argv[1])
except ImageBuildError as e:
    print(e.log_path)
    print(e.reason)
"""


def test_a_failing_step_names_it_and_caches_nothing(warm_cache: Path) -> None:
    # A verbose step (1.6 MB, past the 1 MiB kept of a stream) says why it failed at its end.
    run = f"seq -f 'line %g' 150000; echo failing-output; exit 3 # {uuid.uuid4().hex[:8]}"
    bad = Image("debian-bookworm-minimal").write("/etc/x", "x").run(run)
    final = entry_dir(warm_cache, bad)
    with pytest.raises(ImageBuildError) as e:
        ensure_image(bad, str(warm_cache))  # a str as well: it failed on its lock's path (str / str)
    err = e.value
    assert f"step 2/2 (run {run}) exited with 3" in str(err)
    assert err.log_tail.endswith("line 150000\nfailing-output"), err.log_tail[-300:]
    assert err.log_path is not None and Path(err.log_path).is_file()
    log = Path(err.log_path).read_text()  # all of it
    assert "\nline 1\nline 2\n" in log and "\nline 150000\nfailing-output\n[exit 3]\n" in log
    assert not final.exists()
    assert not list(final.parent.glob(f".tmp-{final.name}-*"))
    # This process does not try again (a run's later tests get the error at once) ...
    started = time.monotonic()
    with pytest.raises(ImageBuildError, match="it failed earlier in this process") as again:
        ensure_image(bad, warm_cache)
    assert time.monotonic() - started < 5 and again.value.log_path == err.log_path
    assert "failing-output" in again.value.log_tail
    # ... but nothing was kept: a new process builds again,
    run_id = uuid.uuid4().hex
    out = subprocess.run([sys.executable, "-c", FAILING, str(warm_cache), run, run_id], capture_output=True, text=True)
    log_path, reason = out.stdout.splitlines()[:2]
    assert log_path != err.log_path and Path(log_path).is_file() and "exited with 3" in reason, out
    assert "failed earlier" not in reason
    # ... and a later process of the same pytest run (an xdist worker) takes its failure, not a build.
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", FAILING, str(warm_cache), run, run_id], capture_output=True, text=True)
    assert time.monotonic() - started < 20, "it built again"
    later_log, later_reason = out.stdout.splitlines()[:2]
    assert later_log == log_path and "exited with 3" in later_reason, out
    assert later_reason.endswith("(it failed earlier in another process of this run)"), later_reason


def test_a_step_past_its_timeout_says_it_was_killed(warm_cache: Path) -> None:
    """The reason said "exited with -1"; only the log said it was killed."""
    run = f"echo started; sleep 60 # {uuid.uuid4().hex[:8]}"
    with pytest.raises(ImageBuildError) as e:
        ensure_image(Image("debian-bookworm-minimal").run(run, timeout=5), warm_cache)
    assert e.value.reason == f"step 1/1 (run {run}) was killed after its timeout of 5 s", e.value.reason
    assert e.value.log_tail.endswith("started\n(killed after 5 s)"), e.value.log_tail


def test_ensure_image_refuses_what_is_not_an_image(warm_cache: Path) -> None:
    for bad in (5, None, ["debian-bookworm"]):  # 5 was "unknown image 5", as if a name
        with pytest.raises(SpecError, match=r"ensure_image\(\): image must be an image name or an Image, not"):
            ensure_image(bad, warm_cache)  # type: ignore[arg-type]


def test_a_build_for_tcg_bottles_boots_with_tcg_and_probes_no_kvm(tmp_path: Path, warm_cache: Path) -> None:
    """``accel="tcg"`` is what a derived image's build boots with too: it
    probed KVM (and said KVM failed) whatever the bottles asked for."""
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(warm_cache / "images", cache / "images")  # and no accel.json: a probe would write one
    bad = Image("debian-bookworm").run(f"exit 3 # {uuid.uuid4().hex[:8]}")
    with pytest.raises(ImageBuildError, match="exited with 3"):
        pytest_bottle.launch(image=bad, accel="tcg", cache_dir=cache)
    assert not (cache / "accel.json").exists() and not (cache / "accel.lock").exists()
    assert not list(cache.glob("run/kvm-probe-*"))


def test_a_build_for_kvm_bottles_on_a_host_without_kvm_is_no_build_failure(warm_cache: Path) -> None:
    """``accel="kvm"`` where KVM does not work is a HostDependencyError before
    the build, as for a bottle of a built image; it was an ImageBuildError,
    recorded, so a TCG bottle of that image got "it failed earlier"."""
    if accel_for("auto", ensure_image(Image("debian-bookworm"), warm_cache), warm_cache).accel == "kvm":
        pytest.skip("KVM works on this host: a build under KVM is no error")
    bad = Image("debian-bookworm").run(f"exit 3 # {uuid.uuid4().hex[:8]}")
    with pytest.raises(HostDependencyError, match="KVM"):
        ensure_image(bad, warm_cache, accel="kvm")
    assert not entry_dir(warm_cache, bad).exists()
    with pytest.raises(ImageBuildError, match="exited with 3") as failed:
        ensure_image(bad, warm_cache, accel="tcg")
    assert "failed earlier" not in failed.value.reason, failed.value


def test_a_derived_build_on_a_host_without_qemu_is_a_host_dependency_error(warm_cache: Path) -> None:
    # Its parent is cached; the build machine cannot start. In a process of its own (PATH is process-wide).
    # Twice the same: no failure recorded for the image, and no failed-build log kept.
    code = (
        "import sys; from pathlib import Path; from pytest_bottle import HostDependencyError, Image\n"
        "from pytest_bottle.images import ensure_image\n"
        "image = Image('debian-bookworm').write('/etc/x', sys.argv[2])\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        ensure_image(image, Path(sys.argv[1]), accel='tcg')\n"
        "    except HostDependencyError as e:\n"
        "        print(type(e).__name__, e.missing)\n"
    )
    token = uuid.uuid4().hex
    r = subprocess.run(
        [sys.executable, "-c", code, str(warm_cache), token],
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH="/nonexistent"),
        timeout=120,
    )
    final = entry_dir(warm_cache, Image("debian-bookworm").write("/etc/x", token))
    assert not final.exists() and not list((warm_cache / "logs").glob(f"{final.name}-failed-*.log"))
    # qemu-img first, unless an overlay template of the parent is cached already
    said = r.stdout.splitlines()
    assert len(said) == 2 and said[0] == said[1], r.stdout + r.stderr
    assert said[0] in ("HostDependencyError qemu-img", "HostDependencyError qemu-system-x86_64"), r.stderr


def test_two_processes_wanting_a_failing_image_try_it_once(warm_cache: Path) -> None:
    run = f"echo failing-once; exit 4 # {uuid.uuid4().hex[:8]}"
    racers = [
        subprocess.Popen([sys.executable, "-c", FAILING, str(warm_cache), run], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = sorted(r.communicate(timeout=600)[0].splitlines()[:2] for r in racers)
    assert outs[0][0] == outs[1][0] and Path(outs[0][0]).is_file(), outs  # one build, one log
    assert all("exited with 4" in reason for _, reason in outs), outs
    assert sum("while this one waited" in reason for _, reason in outs) == 1, outs
    assert Path(outs[0][0]).read_text().rstrip().endswith("exited with 4")  # its reason, for the waiter


def test_a_copy_source_changed_after_the_image_was_made_is_refused_before_any_boot(
    tmp_path: Path, warm_cache: Path
) -> None:
    src = tmp_path / "app.conf"
    src.write_text("one\n")
    image = Image("debian-bookworm").copy(src, "/etc/app.conf")
    src.write_text("two\n")  # the key hashed "one"
    started = time.monotonic()
    with pytest.raises(ImageBuildError, match="the source changed after the Image was made"):
        ensure_image(image, warm_cache)
    assert time.monotonic() - started < 20  # refused before a machine booted
    assert not entry_dir(warm_cache, image).exists()


RACER = """
import sys
from pytest_bottle import Image
from pytest_bottle.images import ensure_image
built = ensure_image(Image("debian-bookworm-minimal").write("/etc/race", sys.argv[2]), sys.argv[1])
print(built.path, built.created)
"""


def test_two_processes_wanting_a_new_image_build_it_once(warm_cache: Path) -> None:
    """Both get the same entry; without the cross-process lock each would build
    and the second commit would replace the first (another ``created``)."""
    token = uuid.uuid4().hex
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(warm_cache), token], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [r.communicate(timeout=600)[0].split() for r in racers]
    assert all(r.returncode == 0 for r in racers), outs
    assert outs[0] == outs[1] and len(outs[0]) == 2, outs
    entry = Path(outs[0][0])
    assert [p.name for p in entry.parent.glob(f"*{entry.name}*")] == [entry.name]  # no tmp entry left


CHILD_CONFTEST = """
from pytest_bottle import Image
Image("debian-bookworm-minimal").write("/etc/marker", "m\\n", mode=0o604).named("marked")
"""

CHILD_TESTS = """
import pytest
from pytest_bottle.images.image import NAMED

@pytest.mark.bottle(image=NAMED["marked"])
def test_marker(bottle):
    assert bottle.image == "marked" and bottle.read_text("/etc/marker") == "m\\n"

def test_option(bottle):
    assert bottle.image == "marked"
    assert bottle.check_output("stat -c %a /etc/marker") == "604\\n"
"""


def test_a_named_image_in_a_marker_and_by_option(pytester: pytest.Pytester, warm_cache: Path) -> None:
    pytester.makeconftest(CHILD_CONFTEST)
    pytester.makepyfile(test_child=CHILD_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:randomly", "--bottle-image=marked", f"--bottle-cache-dir={warm_cache}"
    )
    result.assert_outcomes(passed=2)


# The parent layer alone is built again (rebuild_before would rebuild the shared base image under it too).
REBUILD = """
import sys
from pathlib import Path
from pytest_bottle import Image
from pytest_bottle.images import ensure_image
from pytest_bottle.images.derived import remove_derived
parent = Image("debian-bookworm-minimal").run(sys.argv[2])
assert remove_derived(Path(sys.argv[1]), "derived-" + parent.key)
ensure_image(parent, sys.argv[1])
"""


def test_a_parent_rebuilt_while_a_layer_is_built_on_it_leaves_no_layer_on_the_wrong_disk(warm_cache: Path) -> None:
    """The layer is a diff of the parent's disk as it was: published on a parent
    rebuilt meanwhile (same path), the process that built it would boot it on
    the new disk."""
    step = f"echo parent > /etc/parent-step # {uuid.uuid4().hex[:8]}"
    parent = Image("debian-bookworm-minimal").run(step)
    go = socket.socket()  # listens once the parent is rebuilt: the child's step waits for it (NAT: 10.0.2.2)
    go.bind(("127.0.0.1", 0))
    wait = f"import socket,time\nwhile True:\n try: socket.create_connection(('10.0.2.2', {go.getsockname()[1]}), 2); break\n except OSError: time.sleep(0.3)"
    child = Image(parent).run(
        f"timeout 300 python3 -c {shlex.quote(wait)}; echo child > /etc/child-step"
    )  # a layer on it
    ensure_image(parent, warm_cache)
    final = entry_dir(warm_cache, child)
    got: dict[str, BaseException] = {}

    def build_child() -> None:
        try:
            ensure_image(child, warm_cache)
        except BaseException as e:
            got["error"] = e

    builder = threading.Thread(target=build_child)
    builder.start()
    deadline = time.monotonic() + 120
    while not list(final.parent.glob(f".tmp-{final.name}-*")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the child's build has begun
    rebuilt = subprocess.run([sys.executable, "-c", REBUILD, str(warm_cache), step], capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    go.listen()
    builder.join(300)
    go.close()
    assert not builder.is_alive()
    error = got.get("error")
    assert isinstance(error, ImageBuildError), got
    assert "was rebuilt or removed (by another process) while this image was built on it" in str(error)
    assert not final.exists() and not list(final.parent.glob(f".tmp-{final.name}-*"))
