"""An image whose boot never finishes (a oneshot unit that hangs: systemd
gives Type=oneshot no start timeout) is refused with ``BootTimeout``, with
its console, instead of saved half-booted; a seed of it is tried once (in a
process outside pytest: once per process), a cold bottle of it within its
own timeout."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import processes_mentioning

HANG_UNIT = """\
[Unit]
Description=never finishes starting
[Service]
Type=oneshot
ExecStart=/bin/sleep infinity
[Install]
WantedBy=multi-user.target
"""

SCRIPT = f"""
import sys, threading, time
import pytest_bottle
from pytest_bottle import BootTimeout, Image
from pytest_bottle.images import ensure_image
from pytest_bottle.store import seeds

seeds.SEED_SETTLE_TIMEOUT = 40.0  # the real budget is 300 s: the same code, sooner
image = Image("debian-bookworm").write("/etc/systemd/system/hang.service", {HANG_UNIT!r}).run(
    "systemctl enable hang.service"
)
key = ensure_image(image, sys.argv[1]).key  # built first: the cold boot's timeout must not wait for it
out = threading.Lock()

def attempt(kind, **extra):
    started = time.monotonic()
    try:
        with pytest_bottle.launch(image=image, cache_dir=sys.argv[1], **extra):
            line = kind + " started"
    except BootTimeout as e:
        line = " ".join([kind, str(round(time.monotonic() - started)), str(e).replace("\\n", " | ")[:4000]])
    with out:
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

# Both wait out their budgets mostly idle: the cold boot runs beside the seed's two starts.
cold = threading.Thread(target=attempt, args=("cold",), kwargs=dict(boot="cold", timeout=80))
cold.start()
attempt("seed")
attempt("seed again")
cold.join()
import psutil
print("key", key)
print("qemu", len([p for p in psutil.Process().children(recursive=True) if p.name().startswith("qemu")]))
"""


@pytest.mark.slow
def test_a_boot_that_never_finishes_is_a_boot_timeout(warm_cache: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(warm_cache)], capture_output=True, text=True, timeout=1200, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {" ".join(line.split()[:2]) if line.startswith("seed again") else line.split()[0]: line
             for line in r.stdout.splitlines()}  # fmt: skip
    seed, again, cold = lines.get("seed", ""), lines.get("seed again", ""), lines.get("cold", "")
    # the unit that holds the boot up is named (among others still starting)
    assert re.search(r"did not settle within 40 s \(systemd was still starting units: [^)]*\bhang\.service", seed), seed
    assert "seed of debian-bookworm+" in seed and "--- console tail ---" in seed, seed
    # tried once in a process: the second start fails at once, saying so
    assert "not tried again" in again and int(again.split()[2]) < 10, again
    assert re.search(
        r"did not settle within [\d.]+ s \(systemd was still starting units: [^)]*\bhang\.service", cold
    ), cold
    assert int(cold.split()[1]) <= 80 + 15, cold  # within its boot timeout (and the answer's grace)
    # nothing was saved or left of it: no seed, no working directory, no QEMU
    key = lines["key"].split()[1][:12]
    found = [p.name for p in (warm_cache / "seeds").iterdir() if key in p.name]
    markers = [n for n in found if n.endswith(".unsettled")]  # what the run's other processes read
    for name in markers:  # the warm cache is the user's: no litter in it
        (warm_cache / "seeds" / name).unlink()
    assert not [n for n in found if not n.endswith((".lock", ".unsettled"))], found
    assert markers, found
    assert not processes_mentioning(key) and lines["qemu"] == "qemu 0", lines["qemu"]
