"""The host's apt sources for a suite, so builds use whatever mirror the host uses."""

from __future__ import annotations

import re
from pathlib import Path

APT_DIR = Path("/etc/apt")


def _stanzas(text: str) -> list[dict[str, str]]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields:
            out.append(fields)
    return out


def _wanted(suite: str, suites: list[str]) -> list[str]:
    return [s for s in suites if s == suite or s.startswith(suite + "-")]


def host_sources(suite: str, apt_dir: Path = APT_DIR) -> str:
    """deb822 text of the host's ``deb`` entries for ``suite`` and its -updates/-security.

    Entries for other suites or other vendors (a third-party repository) are
    left out: they would not resolve for the image's suite.
    """
    entries: list[str] = []
    files = [apt_dir / "sources.list"] + sorted((apt_dir / "sources.list.d").glob("*"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for st in _stanzas(text):
                if "deb" not in st.get("types", "").split() or st.get("enabled", "yes").lower() == "no":
                    continue
                suites = _wanted(suite, st.get("suites", "").split())
                if not suites or not st.get("uris"):
                    continue
                entry = [
                    "Types: deb",
                    f"URIs: {st['uris']}",
                    f"Suites: {' '.join(suites)}",
                    f"Components: {st.get('components', 'main')}",
                ]
                if st.get("signed-by"):
                    entry.append(f"Signed-By: {st['signed-by']}")
                entries.append("\n".join(entry))
        elif path.suffix == ".list":
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
                if not m or not _wanted(suite, [m.group(3)]):
                    continue
                opts = dict(o.split("=", 1) for o in (m.group(1) or "").strip(" []").split() if "=" in o)
                entry = ["Types: deb", f"URIs: {m.group(2)}", f"Suites: {m.group(3)}", f"Components: {m.group(4)}"]
                if "signed-by" in opts:
                    entry.append(f"Signed-By: {opts['signed-by']}")
                entries.append("\n".join(entry))
    return "\n\n".join(entries) + ("\n" if entries else "")
