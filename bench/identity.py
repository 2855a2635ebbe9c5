"""What a clone's identity costs on the restore path (issue 18), in translated blocks.

    .venv/bin/python bench/identity.py [--rounds 3] [--image debian-bookworm]

Restores the image's seed with the clone handshake's ``setup`` call cut down to
some of its values, and counts QEMU's translated blocks (``info jit``) from
restore to the first answered `true`.  Rows: every value (what a bottle does),
none at all (the floor: the wake-up, the first call and the first command),
each value alone, and every value but one.  The rows alternate within each
round, so background drift spreads over all of them.  A bottle made with a
value left out is not a proper clone (it keeps its seed's MAC, hostname, ...);
this is a measurement, nothing here is used by the plugin.  Installs nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from _ab import tb_count
from _util import p50, table

import pytest_bottle
from pytest_bottle.agent import handshake, replies

VALUES = ("entropy", "time_ns", "hostname", "machine_id", "ssh_host_key", "nics")
ROWS: dict[str, frozenset[str] | None] = {
    "every value": None,
    "none (floor)": frozenset(),
    **{f"{v} alone": frozenset({v}) for v in VALUES},
    **{f"all but {v}": frozenset(VALUES) - {v} for v in VALUES},
}
_kept: list[frozenset[str] | None] = [None]
_to_call = handshake.Handshake.to_call
_nic_name = replies.SetupReply.nic_name


def _cut_to_call(self: handshake.Handshake) -> dict[str, Any]:
    out = _to_call(self)
    keep = _kept[0]
    return out if keep is None else {k: v for k, v in out.items() if k in keep}


def _any_nic_name(self: replies.SetupReply, mac: str) -> str:
    try:
        return _nic_name(self, mac)
    except pytest_bottle.AgentError:  # the MAC was not set: only the lazy ARP needs the name
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image", default="debian-bookworm")
    args = ap.parse_args()
    handshake.Handshake.to_call = _cut_to_call  # type: ignore[method-assign]
    replies.SetupReply.nic_name = _any_nic_name  # type: ignore[method-assign]
    with pytest_bottle.launch(image=args.image) as b:  # the image and its seed, made first, untimed
        b.exec(["true"])
    got: dict[str, list[int]] = {row: [] for row in ROWS}
    for _ in range(args.rounds):
        for row, keep in ROWS.items():
            _kept[0] = keep
            with pytest_bottle.launch(image=args.image) as b:
                b.exec(["true"])
                got[row].append(tb_count(b))
    full, floor = p50(got["every value"]), p50(got["none (floor)"])
    rows = [
        [row, f"{p50(v):,.0f}", f"{p50(v) - floor:+,.0f}", f"{p50(v) - full:+,.0f}", " ".join(f"{x:,}" for x in v)]
        for row, v in got.items()
    ]
    table(
        f"translated blocks, restore -> first true, {args.image}, {args.rounds} restores a row (median)",
        ["setup sends", "blocks", "vs floor", "vs every value", "each restore"],
        rows,
    )


if __name__ == "__main__":
    main()
