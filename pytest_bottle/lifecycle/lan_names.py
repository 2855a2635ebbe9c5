"""Bottles on a LAN know each other by name, as hosts on a network do: each
one's ``/etc/hosts`` lists its peers (``client.exec(f"curl http://{server.name}/")``).

A newcomer gets a line for each bottle already on the segment, and each of
them gets one for it, through the agent.  Best effort: a peer that is closing
meanwhile, or an ``/etc/hosts`` a test made read-only, costs a warning, not
the start.
"""

from __future__ import annotations

import logging
import time

from ..agent.client import AgentClient
from ..errors import BottleError
from ..net.lan import Lan

log = logging.getLogger(__name__)

# printf repeats its format for each pair of arguments: one line per peer.
APPEND = 'printf "%s\\t%s\\n" "$@" >> /etc/hosts'
TIMEOUT = 30.0
GRACE = 1.0  # past an append's timeout, for the agent's reply
LEAST = 2.0  # what a late append still gets, past the start's deadline


def join(lan: Lan, name: str, ip: str, agent: AgentClient, deadline: float) -> None:
    """``name`` (at ``ip``, reached through ``agent``) is on ``lan`` now, by the
    start's ``deadline`` (``time.monotonic()``): its own lines not written
    fail its start (the agent's error); a peer that does not take its line by
    then, say a hung one, costs a warning, not the newcomer's start."""

    def tell(peer_ip: str, peer: str, by: float) -> None:  # by the deadline of ``peer``'s start
        _append(agent, name, [(peer_ip, peer)], by, f"{name} does not know its LAN peer {peer} by name")

    there, tells = lan.join(name, ip, tell)
    if there:
        _append(agent, name, there, deadline, "", own=True)
    for told in tells:
        told(ip, name, deadline)


def _append(
    agent: AgentClient, name: str, hosts: list[tuple[str, str]], deadline: float, late: str, own: bool = False
) -> None:
    argv = ["/bin/sh", "-c", APPEND, "sh", *(word for pair in hosts for word in pair)]
    budget = min(TIMEOUT, max(LEAST, deadline - time.monotonic()))
    try:
        run = agent.exec(argv, env={}, cwd=None, user=None, timeout=budget - GRACE, stdin=None, cap=4096)
        reply = run.finish(GRACE, argv)
    except BottleError as e:
        if own:
            raise
        if agent.channel.closing or agent.channel.closed.is_set():  # closed or closing while the LAN grew
            log.debug("could not tell %s of its LAN peers: %s", name, e)
        else:  # hung, or too slow for the newcomer's timeout: not worth its start
            log.warning("pytest-bottle: %s: %s", late, e)
        return
    if reply.rc != 0:
        log.warning(
            "pytest-bottle: %s does not know its LAN peers by name (/etc/hosts: %s)",
            name,
            reply.stderr.decode(errors="replace").strip()[:200],
        )
