"""Text from the guest (its output, console lines, error texts, file names)
as a terminal should show it: in reports, error messages and progress lines."""

from __future__ import annotations

import re

# Control characters but tab and newline, C1 included (0x9b starts a CSI too).
_ESCAPED = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if c not in (0x09, 0x0A)}
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # systemd's [FAILED] and the like: readable without
# A lone surrogate (os.fsdecode of a non-UTF-8 name, Python's surrogateescape)
# cannot be encoded: xdist's channel drops the whole report that carries one.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}"  # the byte it stands for


def printable(text: str) -> str:
    """Guest text as the terminal should show it: colours dropped, the other
    escape sequences (a title, a cleared screen, a forged verdict) written out
    as ``\\x1b``, not obeyed; a lone surrogate as the byte it stands for
    (``\\xe9``) or its code point."""
    return _SURROGATE.sub(_surrogate, _COLOUR.sub("", text).translate(_ESCAPED))
