"""The derived-image value: immutability, keys, relative sources, construction errors (no VM)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from pytest_bottle import Image, ImageBuildError, ImageNotFound, SpecError
from pytest_bottle.images import get_recipe
from pytest_bottle.images import image as image_mod
from pytest_bottle.images.image import Install, Run

BASE = Image("debian-bookworm")


@pytest.fixture(autouse=True)
def _clean_registry() -> Iterator[None]:
    saved = dict(image_mod.NAMED)
    yield
    image_mod.NAMED.clear()
    image_mod.NAMED.update(saved)


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a\n")
    (root / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (root / "sub" / "run.sh").chmod(0o755)
    return root


def test_steps_return_new_values_and_images_are_frozen_and_hashable() -> None:
    a = BASE.install("curl")
    b = a.run("true")
    assert a.steps != b.steps and len(b.steps) == 2 and BASE.steps == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.start = "x"  # type: ignore[misc]
    assert {a, BASE.install("curl")} == {a}
    assert hash(a) == hash(BASE.install("curl"))


def test_key_is_stable_and_depends_on_step_order_and_parent() -> None:
    one = BASE.install("curl").run("true")
    assert one.key == BASE.install("curl").run("true").key
    assert one.key != BASE.run("true").install("curl").key
    assert one.key != Image("debian-bookworm-minimal").install("curl").run("true").key
    assert Image(BASE).key == BASE.key == get_recipe("debian-bookworm").key()  # aliases key as their parent
    assert BASE.install("curl").key != BASE.key


def test_key_follows_copied_bytes_and_modes_and_not_the_host_path(tmp_path: Path) -> None:
    src = _tree(tmp_path / "site")
    before = BASE.copy(src, "/srv/site")
    assert before.key == BASE.copy(src, "/srv/site").key
    (src / "a.txt").write_text("b\n")
    after_bytes = BASE.copy(src, "/srv/site")
    assert after_bytes.key != before.key
    (src / "sub" / "run.sh").chmod(0o700)
    after_mode = BASE.copy(src, "/srv/site")
    assert after_mode.key != after_bytes.key
    other = _tree(tmp_path / "elsewhere")
    (other / "a.txt").write_text("b\n")
    (other / "sub" / "run.sh").chmod(0o700)
    os.utime(other / "a.txt", (0, 0))  # times are not content
    assert BASE.copy(other, "/srv/site").key == after_mode.key


def test_what_python_and_pytest_write_into_a_copied_tree_is_not_in_the_key(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    key = BASE.copy(tmp_path / "pkg", "/opt/pkg").key
    for junk in ("pkg/__pycache__/mod.cpython-311.pyc", "pkg/.pytest_cache/v/cache/nodeids", "pkg/sub/__pycache__/x"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_bytes(b"written by the host's run")
    assert BASE.copy(tmp_path / "pkg", "/opt/pkg").key != key  # pkg/sub: a new directory
    (tmp_path / "pkg" / "sub" / "__pycache__" / "x").unlink()
    (tmp_path / "pkg" / "sub" / "__pycache__").rmdir()
    (tmp_path / "pkg" / "sub").rmdir()
    assert BASE.copy(tmp_path / "pkg", "/opt/pkg").key == key
    assert BASE.copy(tmp_path / "pkg" / "__pycache__", "/opt/c").key != BASE.copy(tmp_path / "pkg", "/opt/c").key


def test_exclude_leaves_entries_out_at_any_depth_and_out_of_the_key(tmp_path: Path) -> None:
    src = _tree(tmp_path / "site")
    (src / "a.log").write_text("1")
    (src / "sub" / ".git").mkdir()
    (src / "sub" / ".git" / "HEAD").write_text("x")
    image = BASE.copy(src, "/srv", exclude=["*.log", ".git"])
    (src / "a.log").write_text("2")
    (src / "sub" / ".git" / "HEAD").write_text("y")
    assert BASE.copy(src, "/srv", exclude=(".git", "*.log", "*.log")).key == image.key  # order, repeats: the same
    assert BASE.copy(src, "/srv").key != image.key
    (src / "a.txt").write_text("changed")
    assert BASE.copy(src, "/srv", exclude=["*.log", ".git"]).key != image.key
    # A copy without exclude keys as it did before there was one.
    without = BASE.copy(src, "/srv").steps[0]
    assert without.key_data() == {"copy": "/srv", "digest": without.digest}  # type: ignore[union-attr]
    assert "excluding *.log, .git" in image.steps[0].describe()
    for bad in ("*.log", ["a/b"], [""], [1], 5):
        with pytest.raises(SpecError, match=r"^copy\(\): (exclude must be a list|an exclude pattern)"):
            BASE.copy(src, "/srv", exclude=bad)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"^copy\(\): the source is an empty path"):  # not the caller's directory
        BASE.copy("", "/srv")


def test_a_name_that_is_not_utf8_is_hashed_as_its_bytes(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "ok.txt").write_text("x")
    key = BASE.copy(tmp_path / "t", "/srv").key  # a UTF-8 name: the bytes hashed are as before
    (tmp_path / "t" / os.fsdecode(b"caf\xe9.txt")).write_text("x")
    os.symlink(os.fsdecode(b"caf\xe9.txt"), tmp_path / "t" / "link")
    assert BASE.copy(tmp_path / "t", "/srv").key not in (key, BASE.copy(tmp_path / "t", "/x").key)


def test_a_single_files_name_is_in_the_key_it_names_the_file_in_a_directory_dst(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text("same\n")
    (tmp_path / "b.conf").write_text("same\n")
    a, b = BASE.copy(tmp_path / "a.conf", "/etc/app/"), BASE.copy(tmp_path / "b.conf", "/etc/app/")
    assert a.key != b.key and a != b
    (tmp_path / "big").write_bytes(bytes(3 << 20))  # hashed in chunks, same as whole
    assert BASE.copy(tmp_path / "big", "/x").key == BASE.copy(tmp_path / "big", "/x").key
    # A link to a file lands under the link's own name (as put() names it): its key says that name.
    (tmp_path / "c.conf").symlink_to("a.conf")
    c = BASE.copy(tmp_path / "c.conf", "/etc/app/")
    assert c.key != a.key and c != a


def test_install_takes_a_list_and_apts_other_forms() -> None:
    """A list was "['curl', 'jq'] is not a Debian package name"; pkg:arch and pkg/release were refused."""
    assert BASE.install(["curl", "jq"]) == BASE.install("curl", "jq") == BASE.install(("curl",), "jq")
    assert BASE.install("curl", "jq").key == BASE.install(["curl", "jq"]).key
    forms = ("libc6:i386", "nginx/bookworm-backports", "jq=1.6-2.1", "g++-12:amd64=12.2.0-14")
    step = BASE.install(*forms).steps[-1]
    assert isinstance(step, Install) and step.packages == forms
    with pytest.raises(SpecError, match=r"'curl jq' is not a Debian package name \(pkg, pkg:arch"):
        BASE.install("curl jq")


def test_a_child_key_follows_its_parent_and_a_sibling_does_not(tmp_path: Path) -> None:
    f = tmp_path / "conf"
    f.write_text("1")
    parent = BASE.copy(f, "/etc/conf")
    child, sibling = parent.run("true"), BASE.run("true")
    f.write_text("2")
    parent2 = BASE.copy(f, "/etc/conf")
    assert parent2.run("true").key != child.key
    assert BASE.run("true").key == sibling.key


def test_symlinks_inside_a_copied_tree_count_by_their_target_text(tmp_path: Path) -> None:
    src = _tree(tmp_path / "t")
    (src / "link").symlink_to("a.txt")
    k1 = BASE.copy(src, "/x").key
    (src / "link").unlink()
    (src / "link").symlink_to("sub/run.sh")
    assert BASE.copy(src, "/x").key != k1


def test_a_relative_copy_source_is_relative_to_the_calling_file(tmp_path: Path) -> None:
    here = Path(__file__).resolve().parent
    img = BASE.copy("test_derived_image.py", "/x")
    step = img.steps[0]
    assert isinstance(step, image_mod.Copy) and step.src == here / "test_derived_image.py"


def test_a_copy_source_written_with_a_trailing_slash_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "app.conf").write_text("x")
    for src in (f"{tmp_path}/app.conf/", f"{tmp_path}/app.conf/."):  # it copied the file, as put() did
        with pytest.raises(SpecError, match="ends with '/' but is not a directory"):
            BASE.copy(src, "/etc/app.conf")
    assert BASE.copy(f"{tmp_path}/", "/x").key == BASE.copy(tmp_path, "/x").key  # a directory, as ever


def test_write_takes_str_or_bytes_and_a_mode() -> None:
    w = BASE.write("/etc/a", "x=1\n").steps[0]
    assert isinstance(w, image_mod.Write) and w.data == b"x=1\n" and w.mode is None
    assert BASE.write("/etc/a", b"\x00", mode=0o600).key != BASE.write("/etc/a", b"\x00", mode=0o644).key
    for path in ("/", "/etc/a/", "/etc/a/.", "/etc/a/.."):  # a directory's path, as open(2) takes it
        with pytest.raises(SpecError, match="must name a file"):
            BASE.write(path, "x")
    # A lone surrogate was a bare UnicodeEncodeError; every other bad step argument is a SpecError.
    with pytest.raises(SpecError, match=r"write\(\): content is not UTF-8 text \(surrogates not allowed at 2\)"):
        BASE.write("/etc/a", "ab\udcff")


def test_named_registers_and_names_resolve_as_a_start() -> None:
    web = BASE.install("nginx-light").named("web-test")
    assert web.display_name == "web-test" and image_mod.lookup("web-test") is web
    assert BASE.install("nginx-light").named("web-test") is web  # the same steps again: fine
    child = Image("web-test").run("true")
    assert child.parent is web and child.key == web.run("true").key
    assert child.display_name == f"web-test+{child.key[:12]}"
    assert child.root() == "debian-bookworm"


def test_unnamed_images_show_parent_and_key() -> None:
    img = BASE.run("true")
    assert img.display_name == f"debian-bookworm+{img.key[:12]}"
    assert BASE.display_name == "debian-bookworm" and BASE.resolved() == "debian-bookworm"


@pytest.mark.parametrize(
    "make",
    [
        lambda: BASE.install(),
        lambda: BASE.install("Nginx"),
        lambda: BASE.install("nginx; rm -rf /"),
        lambda: BASE.install(""),
        lambda: BASE.copy("/nonexistent/pytest-bottle-src", "/x"),
        lambda: BASE.copy(__file__, "relative/dst"),
        lambda: BASE.copy(5, "/x"),  # type: ignore[arg-type]
        lambda: BASE.write("/", "x"),
        lambda: BASE.write("//", "x"),
        lambda: BASE.write("etc/a", "x"),
        lambda: BASE.write(PurePosixPath("etc/a"), "x"),
        lambda: BASE.write(b"/etc/a", "x"),  # type: ignore[arg-type]
        lambda: BASE.write("/etc/a", "x", mode=0o10000),
        lambda: BASE.write("/etc/a", "x", mode=True),
        lambda: BASE.write("/etc/a", "x", mode="644"),  # type: ignore[arg-type]
        lambda: BASE.write("/etc/a", 3),  # type: ignore[arg-type]
        lambda: BASE.run(""),
        lambda: BASE.run("true", timeout=0),
        lambda: BASE.run("true", timeout=float("nan")),
        lambda: BASE.run("true", timeout=float("inf")),
        lambda: BASE.run("true", timeout=True),
        lambda: BASE.run("true", timeout="5"),  # type: ignore[arg-type]
        lambda: BASE.run("true", env={"A=B": "c"}),
        lambda: BASE.run("true", env={"A": "c\0d"}),  # as exec refuses it, before a build boots
        lambda: BASE.run("true\0false"),
        lambda: BASE.run("true", env=["A"]),  # type: ignore[arg-type]
        lambda: BASE.install(["ok", "no;rm"]),
        lambda: BASE.install([]),
        lambda: BASE.install(b"curl"),  # type: ignore[arg-type]
        lambda: BASE.install({"curl": 1}),
        lambda: BASE.install("curl:"),
        lambda: BASE.install("curl/"),
        lambda: BASE.named("debian-bookworm"),
        lambda: BASE.named("bad name"),
        lambda: BASE.named("web\n"),  # `$` matched before a last newline
        lambda: BASE.install("curl\n"),
    ],
)
def test_bad_steps_raise_spec_error_at_construction(make: object) -> None:
    with pytest.raises(SpecError):
        make()  # type: ignore[operator]


def test_a_guest_path_object_is_its_str() -> None:
    assert BASE.write(PurePosixPath("/etc") / "a", "x").key == BASE.write("/etc/a", "x").key
    assert BASE.copy(__file__, PurePosixPath("/opt/t.py")).key == BASE.copy(__file__, "/opt/t.py").key


def test_a_name_clash_with_other_steps_is_an_error() -> None:
    BASE.run("true").named("clash-test")
    with pytest.raises(SpecError, match="already named 'clash-test'"):
        BASE.run("false").named("clash-test")


def test_an_unknown_start_lists_known_names() -> None:
    with pytest.raises(ImageNotFound) as e:
        Image("no-such-image")
    assert "debian-bookworm" in e.value.known
    for start in (5, None, b"debian-bookworm"):  # the documented SpecError, as for a step's arguments
        with pytest.raises(SpecError, match="an Image starts from an image name or another Image"):
            Image(start)  # type: ignore[arg-type]


def test_a_spec_takes_an_image_or_a_name() -> None:
    from pytest_bottle.spec import resolve

    img = BASE.install("curl")
    assert resolve([("marker", {"image": img})], restricted=1).image is img
    assert resolve([("marker", {"image": "debian-bookworm"})], restricted=1).image == "debian-bookworm"
    with pytest.raises(SpecError, match="name or an Image"):
        resolve([("marker", {"image": 3})], restricted=1)


def test_pull_from_is_not_part_of_the_key_nor_inherited() -> None:
    base = Image("debian-bookworm").install("curl")
    pulled = base.pull_from("https://h/{name}-{key}.tar.gz")
    assert pulled.key == base.key and pulled == base and pulled.pull_url
    assert pulled.install("jq").pull_url is None
    assert get_recipe("debian-bookworm").pull_url is None
    with pytest.raises(SpecError, match="pull_from"):
        base.pull_from("gopher://h/x")


def test_another_process_shows_the_failing_steps_output_not_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build machine's failed log ends with its console; a process of the
    same run that takes the failure shows the step's tail, as the failing one did."""
    from pytest_bottle.images import failures

    monkeypatch.setattr(failures, "_run", "run-1")
    final = tmp_path / "images" / "web-0123456789abcdef"
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / f"{final.name}-failed-{10**18}.log"
    console = [f"[  {i}.0] systemd[1]: console line {i}" for i in range(60)]
    step = ["== step 2/2: run make", "cc -c x.c", "x.c:1: error: expected ';'", "make: *** [x] Error 1"]
    log.write_text("\n".join([*step, "", failures.CONSOLE, *console, ""]))
    failures.record(final, ImageBuildError("web", "step 2/2 (run make) exited with 2", "", str(log)))
    failures._failed.clear()  # as another process of the run sees it
    taken = failures.since(final, tmp_path, 2 * 10**18, "web")  # it did not wait: the run names it
    assert taken is not None and "exited with 2 (it failed earlier in another process of this run)" in taken.reason
    assert taken.log_tail.splitlines() == step and taken.log_path == str(log)


def test_run_takes_an_argv_as_exec_does() -> None:
    step = BASE.run(["touch", "/etc/a file", "$HOME"]).steps[-1]
    assert isinstance(step, Run) and step.command == "touch '/etc/a file' '$HOME'"  # quoted: no shell reading
    assert step.describe() == "run touch '/etc/a file' '$HOME'"
    assert BASE.run(["true"]).key == BASE.run("true").key  # the same command line, the same image
    assert BASE.run(("echo", 3)).steps[-1] == BASE.run("echo 3").steps[-1]  # type: ignore[arg-type]  # str(), as exec
    # What the shell would read as an assignment or as syntax is the program's name, as with exec.
    assert BASE.run(["FOO=bar", "x"]).steps[-1] == BASE.run("'FOO=bar' x").steps[-1]
    assert BASE.run(["if", "true"]).steps[-1] == BASE.run("'if' true").steps[-1]
    assert BASE.run(iter(["echo", "a b"])).steps[-1] == BASE.run("echo 'a b'").steps[-1]  # any iterable, once
    with pytest.raises(SpecError, match=r"^run\(\): an empty list is no command"):
        BASE.run([])
    with pytest.raises(SpecError, match=r"^run\(\): the command must be a non-empty str without NUL"):
        BASE.run(["a\0b"])
    with pytest.raises(SpecError, match=r"^run\(\): the command must be a non-empty str"):
        BASE.run(b"true")  # type: ignore[arg-type]


def test_a_copy_source_changed_while_the_steps_run_stops_the_build_at_that_copy(tmp_path: Path) -> None:
    """It was found after the last step: the build went on with the changed
    bytes, and its progress named the last step, not the copy."""
    from harness import in_process_agent  # the real agent, serving in this process: steps run on this host

    from pytest_bottle.agent.client import AgentClient
    from pytest_bottle.images.provision import _run_steps

    src = _tree(tmp_path / "src")
    image = (
        Image("debian-bookworm-minimal")
        .run(f"echo changed > {src}/a.txt")  # a source edited while the build runs
        .copy(src, str(tmp_path / "dst"))
        .run(f"touch {tmp_path}/third-step-ran")
    )
    notes: list[str] = []
    with in_process_agent() as channel, open(tmp_path / "build.log", "w") as log:
        with pytest.raises(ImageBuildError, match=r"^.*step 2/3 \(copy .*\): the source changed after the Image"):
            _run_steps(image, AgentClient(channel), log, notes.append)
    assert not (tmp_path / "third-step-ran").exists()
    assert notes[-1].startswith("step 2/3: copy ")


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, pytest.fail.Exception])  # the last: pytest-timeout
def test_a_build_stopped_keeps_no_failed_build_log_and_a_failed_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: type[BaseException]
) -> None:
    """A stopped build did not fail (the next request builds again), yet its
    log was kept as ``logs/derived-KEY-failed-NS.log``."""
    from pytest_bottle.images import derived

    outcome: list[BaseException] = [stop()]

    def provision(image: Image, parent: object, cache_dir: Path, tmp: Path, *rest: object) -> bool:
        (tmp / "build.log").write_text("building ...\n")
        raise outcome[0]

    monkeypatch.setattr(derived, "provision", provision)
    image = Image("debian-bookworm-minimal").write("/etc/x", "x")
    final = tmp_path / "images" / f"derived-{image.key}"
    final.parent.mkdir(parents=True)
    with pytest.raises(stop):
        derived._build(image, None, tmp_path, final, None, "tcg")  # type: ignore[arg-type]
    assert not list(tmp_path.glob("logs/*")) and [p.name for p in final.parent.iterdir()] == []
    outcome[0] = ImageBuildError(image.display_name, "step 1/1 (write /etc/x) failed")
    with pytest.raises(ImageBuildError) as failed:
        derived._build(image, None, tmp_path, final, None, "tcg")  # type: ignore[arg-type]
    assert failed.value.log_path is not None and Path(failed.value.log_path).read_text() == "building ...\n"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, pytest.fail.Exception])
def test_a_recipe_build_stopped_keeps_no_failed_build_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: type[BaseException]
) -> None:
    """The root-image half of the rule above: mmdebstrap's build stopped."""
    from pytest_bottle.images import builder, cache

    def build(recipe: object, tmp: Path, progress: object) -> dict[str, object]:
        (tmp / "build.log").write_text("mmdebstrap ...\n")
        raise stop()

    monkeypatch.setattr(builder, "build", build)
    with pytest.raises(stop):
        cache._ensure_recipe("debian-bookworm-minimal", tmp_path, None, None, None)
    assert not list(tmp_path.glob("logs/*")) and not list(tmp_path.glob("images/*"))
