"""Bottles on a LAN know each other by name, as hosts on a network do: each
one's ``/etc/hosts`` lists its peers (``client.exec(f"curl http://{server.name}/")``).

A newcomer gets a line for each bottle already on the segment, and each of
them gets one for it, through the agent.  Best effort: a peer that is closing
meanwhile, or an ``/etc/hosts`` a test made read-only, costs a warning, not
the start.
"""

from __future__ import annotations

import logging
import threading
import time

from ..agent.client import AgentClient
from ..errors import AgentTimeout, BottleError
from ..net.lan import Lan

log = logging.getLogger(__name__)

# printf repeats its format for each pair of arguments: one line per peer.
APPEND = 'printf "%s\\t%s\\n" "$@" >> /etc/hosts'
GRACE = 1.0  # past an append's timeout, for the agent's reply
LEAST = 5.0  # what telling a peer gets at least, even past the newcomer's deadline


def join(lan: Lan, name: str, ip: str, agent: AgentClient, deadline: float) -> None:
    """``name`` (at ``ip``, reached through ``agent``) is on ``lan`` now, by the
    start's ``deadline`` (``time.monotonic()``): its own lines not written by
    then fail its start (``AgentTimeout``, or the agent's error); the peers are
    told all at once, and one that does not take its line by then (``LEAST``
    s at least), say a hung one, costs a warning, not the newcomer's start."""

    def tell(peer_ip: str, peer: str, by: float) -> None:  # by the deadline of ``peer``'s start
        _append(agent, name, [(peer_ip, peer)], max(by, time.monotonic() + LEAST), peer)

    there, tells = lan.join(name, ip, tell)
    if there:
        _append(agent, name, there, deadline, "")
    threads = [threading.Thread(target=told, args=(ip, name, deadline), daemon=True) for told in tells]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _append(agent: AgentClient, name: str, hosts: list[tuple[str, str]], deadline: float, peer: str) -> None:
    """Append ``hosts`` to the /etc/hosts of ``name`` by ``deadline``: its own
    lines (no ``peer``) raise what fails them; a line of ``peer``'s only warns."""
    argv = ["/bin/sh", "-c", APPEND, "sh", *(word for pair in hosts for word in pair)]
    budget = max(GRACE * 2, deadline - time.monotonic())
    try:
        run = agent.exec(argv, env={}, cwd=None, user=None, timeout=budget - GRACE, stdin=None, cap=4096)
        reply = run.finish(GRACE, argv)
        if reply.timed_out:
            raise AgentTimeout(f"bottle {name}: writing /etc/hosts did not finish within {budget - GRACE:.1f} s")
    except BottleError as e:
        if not peer:
            raise
        if agent.channel.closing or agent.channel.closed.is_set():  # closed or closing while the LAN grew
            log.debug("could not tell %s of its LAN peers: %s", name, e)
        else:  # hung, or too slow for the newcomer's timeout: not worth its start
            log.warning("pytest-bottle: %s does not know its LAN peer %s by name: %s", name, peer, e)
        return
    if reply.rc != 0:
        log.warning(
            "pytest-bottle: %s does not know its LAN peers by name (/etc/hosts: %s)",
            name,
            reply.stderr.decode(errors="replace").strip()[:200],
        )
