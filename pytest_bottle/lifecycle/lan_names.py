"""Bottles on a LAN know each other by name, as hosts on a network do: each
one's ``/etc/hosts`` lists its peers (``client.exec(f"curl http://{server.name}/")``).

A newcomer gets a line for each bottle already on the segment, and each of
them gets one for it, through the agent.  Best effort: a peer that is closing
meanwhile, or an ``/etc/hosts`` a test made read-only, costs a warning, not
the start.
"""

from __future__ import annotations

import logging

from ..agent.client import AgentClient
from ..errors import BottleError
from ..net.lan import Lan

log = logging.getLogger(__name__)

# printf repeats its format for each pair of arguments: one line per peer.
APPEND = 'printf "%s\\t%s\\n" "$@" >> /etc/hosts'
TIMEOUT = 30.0
GRACE = 15.0


def join(lan: Lan, name: str, ip: str, agent: AgentClient) -> None:
    """``name`` (at ``ip``, reached through ``agent``) is on ``lan`` now."""

    def tell(peer_ip: str, peer: str) -> None:
        _append(agent, name, [(peer_ip, peer)])

    there, tells = lan.join(name, ip, tell)
    if there:
        _append(agent, name, there)
    for told in tells:
        told(ip, name)


def _append(agent: AgentClient, name: str, hosts: list[tuple[str, str]]) -> None:
    argv = ["/bin/sh", "-c", APPEND, "sh", *(word for pair in hosts for word in pair)]
    try:
        run = agent.exec(argv, env={}, cwd=None, user=None, timeout=TIMEOUT, stdin=None, cap=4096)
        reply = run.finish(GRACE, argv)
    except BottleError as e:  # closed or closing while the LAN grew
        log.debug("could not tell %s of its LAN peers: %s", name, e)
        return
    if reply.rc != 0:
        log.warning(
            "pytest-bottle: %s does not know its LAN peers by name (/etc/hosts: %s)",
            name,
            reply.stderr.decode(errors="replace").strip()[:200],
        )
