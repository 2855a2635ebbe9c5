"""Text from the guest (its output, console lines, error texts, file names)
as a terminal should show it: in reports, error messages and progress lines."""

from __future__ import annotations

import re

# Control characters but tab and newline, C1 included (0x9b starts a CSI too).
_ESCAPED = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if c not in (0x09, 0x0A)}
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # systemd's [FAILED] and the like: readable without


def printable(text: str) -> str:
    """Guest text as the terminal should show it: colours dropped, the other
    escape sequences (a title, a cleared screen, a forged verdict) written out
    as ``\\x1b``, not obeyed."""
    return _COLOUR.sub("", text).translate(_ESCAPED)
