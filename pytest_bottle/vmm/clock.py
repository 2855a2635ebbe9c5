"""The TSC frequency a TCG guest should be told instead of measuring it.

Under TCG the guest's TSC is the host's TSC.  A guest kernel measures its
frequency against the emulated PIT during early boot; when the host is busy
(xdist workers, several VMs on two cores) that measurement fails, the kernel
marks the TSC unusable and, on microvm, then hangs waiting for jiffies that
never advance.  Passing ``tsc_early_khz`` skips the measurement.
"""

from __future__ import annotations

import functools
import logging
import re
import subprocess

log = logging.getLogger(__name__)

_DETECTED = re.compile(r"tsc: (?:Refined TSC clocksource calibration: |Detected )(\d+\.\d+) MHz")


def _from_dmesg() -> int | None:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = _DETECTED.findall(out)
    return round(float(found[-1]) * 1000) if found else None


def _from_cpuinfo() -> int | None:
    """``cpu MHz`` is the TSC rate only where the CPU says the TSC is constant and known."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(65536)
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*(\d+\.\d+)", text, re.M)
    if flags and mhz and {"constant_tsc", "nonstop_tsc", "tsc_known_freq"} <= set(flags.group(1).split()):
        return round(float(mhz.group(1)) * 1000)
    return None


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, or None when it cannot be known cheaply."""
    khz = _from_dmesg() or _from_cpuinfo()
    log.debug("host TSC: %s kHz", khz)
    return khz


def tcg_kernel_args() -> tuple[str, ...]:
    # Under TCG the guest TSC is the host's, so it is reliable; without
    # tsc=reliable the clocksource watchdog drops it for jiffies whenever the
    # host is busy.
    khz = host_tsc_khz()
    return ("tsc=reliable",) + ((f"tsc_early_khz={khz}",) if khz else ())
